// The project's tests use the author's kit (framework/testing).
#pragma once

#include "inferlab/testing/plugins.h"
#include "naive_reference.h"
