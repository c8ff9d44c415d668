// libFuzzer target: an experiment config (TOML) as a user writes it, checked
// against the real task catalog and plugin entries with every parameter type.
#include <cstddef>
#include <cstdint>
#include <string_view>

#include "experiment/config.h"
#include "datasets/tasks.h"

namespace {

inferlab::Catalog make_catalog() {
  using namespace inferlab;
  Catalog c;
  c.tasks = task_catalog();
  PluginEntry method;
  method.name = "quest";
  method.version = "1.0.0";
  method.params = {ParamSpec::integer("token_budget", 256, 1, 1 << 24, "budget"),
                   ParamSpec::real("ratio", 0.5, 0.0, 1.0, "ratio"),
                   ParamSpec::boolean("flag", false, "flag"),
                   ParamSpec::string("positions", "cache", {"cache", "original"}, "choice"),
                   ParamSpec::schedule("schedule", "", 0, 1 << 20, "per-layer schedule"),
                   ParamSpec::int_list("layers", {}, 0, 1024, "list"),
                   ParamSpec::dense_layers(2)};
  PluginEntry dense;
  dense.name = "dense";
  dense.version = "1.0.0";
  c.plugins = {method, dense};
  return c;
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const inferlab::Catalog catalog = make_catalog();
  const std::string_view text(reinterpret_cast<const char*>(data), size);
  (void)inferlab::parse_experiment(text, "fuzz.toml", catalog);
  return 0;
}
