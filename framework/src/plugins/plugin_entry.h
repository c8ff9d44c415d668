// A plugin as the host found it: what the config parser checks a method
// against and `inferlab plugins` lists.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "inferlab/params.h"

namespace inferlab {

// A plugin as the host describes it to the config parser and `inferlab plugins`.
struct PluginEntry {
  std::string name;
  std::string version;
  std::string description;
  uint32_t hooks = 0;  // PluginHook bits (inferlab/plugin.h)
  std::vector<ParamSpec> params;
  std::string path;    // the shared library it came from
};

}  // namespace inferlab
