// The project's tests use the author's kit helpers (framework/testing).
#pragma once

#include "inferlab/testing/support.h"
