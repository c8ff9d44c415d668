// LoRA (Hu et al., 2021): a frozen model plus low-rank adapters,
// y = W x + s * B (A x). The method only names the adapters and how to apply
// them; the engine reads them (a PEFT folder or a llama.cpp GGUF adapter, with
// the scales their files give: alpha / r, or alpha / sqrt(r) with rsLoRA) and
// runs them, merged into this run's copy of the weights (no extra work per
// call) or unmerged (two skinny GEMMs after each targeted projection). Several
// adapters can be active at once; their effects add up.
#include "inferlab/plugin_export.h"

namespace {

using namespace inferlab;

struct Adapter {
  std::string path;
  float scale = 1;
};

class Lora final : public Method {
 public:
  Lora(std::vector<Adapter> adapters, bool merge) : adapters_(std::move(adapters)), merge_(merge) {}

  Status on_load(const LoadContext& ctx) override {
    if (ctx.overrides == nullptr) return Error{"lora: the engine offers no weight editor"};
    for (const Adapter& a : adapters_)
      if (auto s = ctx.overrides->load_adapter(a.path, a.scale, merge_); !s) return s;
    return ok_status();
  }

 private:
  std::vector<Adapter> adapters_;
  bool merge_;
};

class LoraPlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    return {"lora", "1.0.0", "LoRA: PEFT or llama.cpp adapters on the frozen model, merged or unmerged",
            hooks_of<Lora>(),
            {ParamSpec::path_list("adapter", "PEFT adapter folders (adapter_config.json + adapter_model.safetensors) "
                                             "or llama.cpp GGUF adapters, all active at once; at least one"),
             ParamSpec::real("scale", 1.0, -1000.0, 1000.0, "multiplies every adapter's own scale (alpha / r)"),
             ParamSpec::float_list("adapter_scales", {}, -1000.0, 1000.0,
                                   "one factor per adapter on top of `scale` (empty: 1 for each)"),
             ParamSpec::boolean("merge", false,
                                "fold s * B A into this run's weights once (no cost per call) instead of running "
                                "the adapters beside each projection")}};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    const auto& paths = p.get_path_list("adapter");
    const auto& factors = p.get_float_list("adapter_scales");
    if (paths.empty()) return Error{"adapter: required (PEFT folders or GGUF adapter files)"};
    if (!factors.empty() && factors.size() != paths.size())
      return Error{"adapter_scales: " + std::to_string(factors.size()) + " factors for " +
                   std::to_string(paths.size()) + " adapters"};
    std::vector<Adapter> adapters;
    for (size_t i = 0; i < paths.size(); ++i)
      adapters.push_back({paths[i], float(p.get_float("scale") * (factors.empty() ? 1.0 : factors[i]))});
    return std::unique_ptr<Method>(std::make_unique<Lora>(std::move(adapters), p.get_bool("merge")));
  }
};

}  // namespace

INFERLAB_PLUGIN(LoraPlugin)
