// The one check of a parameter value against its spec (type, range, choices,
// schedule grammar), with one wording for plugin, task and config values; the
// config parser adds where (file:line:column: key).
#pragma once

#include <string>

#include "inferlab/params.h"

namespace inferlab {

bool value_has_type(const ParamValue& value, ParamType type);
// Why `value` does not fit `spec`; empty when it fits. The type is checked first.
std::string param_problem(const ParamSpec& spec, const ParamValue& value);
// A value as messages quote it: strings in quotes, the rest canonical.
std::string describe_value(const ParamValue& value);

}  // namespace inferlab
