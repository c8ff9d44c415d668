// H2O (Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative
// Inference of Large Language Models", NeurIPS 2023): keep the tokens with the
// largest accumulated attention ("heavy hitters") plus a window of recent
// tokens, evicting the rest after every forward call, prefill included.
// Attention mass is summed over the query heads of a KV group (GQA). The
// engine's retention mechanism keeps the scores and evicts (kHookRetention);
// this plugin picks the rule and the budgets, any per layer and kv head. The
// first `dense_layers` layers keep every token.
#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>

#include "inferlab/plugin_export.h"

namespace {

using namespace inferlab;

struct Budget {
  double heavy = 0, recent = 0;  // token counts, or fractions of the sequence when `ratio`
  bool ratio = false;
};

// Overrides "KEY=heavy:recent;..." where KEY is a layer ("3") or a layer and
// kv head ("3.1"). Values are token counts, or fractions when the base budget is a ratio.
Result<std::map<std::pair<int32_t, int32_t>, Budget>> parse_overrides(const std::string& text, bool ratio) {
  std::map<std::pair<int32_t, int32_t>, Budget> out;
  std::stringstream items(text);
  for (std::string item; std::getline(items, item, ';');) {
    if (item.empty()) continue;
    int32_t layer = -1, head = -1;
    double heavy = 0, recent = 0;
    char sep = 0;
    std::istringstream in(item);
    bool ok = static_cast<bool>(in >> layer);
    if (ok && in.peek() == '.') ok = static_cast<bool>(in.get(sep) >> head);
    ok = ok && in.get(sep) && sep == '=' && (in >> heavy) && in.get(sep) && sep == ':' && (in >> recent);
    if (!ok || !(in >> std::ws).eof() || layer < 0 || heavy < 0 || recent < 0)
      return Error{"overrides: cannot read \"" + item + "\"; write LAYER=heavy:recent or LAYER.KVHEAD=heavy:recent"};
    out[{layer, head}] = Budget{heavy, recent, ratio};
  }
  return out;
}

class H2o final : public Method {
 public:
  H2o(Budget base, std::map<std::pair<int32_t, int32_t>, Budget> overrides, int32_t dense_layers)
      : base_(base), overrides_(std::move(overrides)), dense_layers_(dense_layers) {}

  // The engine keeps every token's accumulated attention mass beside its K/V
  // (on the GPU for the CUDA backend) and evicts after every call, prefill
  // included; the plugin only says how many tokens stay.
  RetentionPolicy retention_policy() const override {
    return {RetentionScore::AccumulatedMass, RetentionScope::PerHead};
  }

  RetentionBudget retention_budget(const StepInfo& step, int32_t layer, int32_t kv_head) override {
    ++budgets_asked_;
    if (layer < dense_layers_) return RetentionBudget{};  // heavy < 0: the engine keeps everything
    const int32_t seen = step.first_position + step.n_tokens;  // tokens of the sequence after this call
    const auto [heavy, recent] = budget(layer, kv_head, seen);
    return RetentionBudget{0, recent, heavy};
  }

  std::map<std::string, double> counters() const override { return {{"budgets_asked", budgets_asked_}}; }

 private:
  std::pair<int32_t, int32_t> budget(int32_t layer, int32_t kv_head, int32_t seen) const {
    Budget b = base_;
    if (auto it = overrides_.find({layer, -1}); it != overrides_.end()) b = it->second;
    if (auto it = overrides_.find({layer, kv_head}); it != overrides_.end()) b = it->second;
    if (!b.ratio) return {int32_t(b.heavy), int32_t(b.recent)};
    return {int32_t(std::ceil(b.heavy * seen)), int32_t(std::ceil(b.recent * seen))};
  }

  Budget base_;
  std::map<std::pair<int32_t, int32_t>, Budget> overrides_;
  int32_t dense_layers_;
  double budgets_asked_ = 0;
};

class H2oPlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    return {"h2o",
            "1.1.0",
            "heavy hitters by accumulated attention + recent window (Zhang et al. 2023)",
            hooks_of<H2o>(),
            {ParamSpec::integer("heavy", 64, 0, 1 << 24, "heavy-hitter tokens kept (when heavy_ratio is 0)"),
             ParamSpec::integer("recent", 64, 0, 1 << 24, "recent tokens kept (when recent_ratio is 0)"),
             ParamSpec::real("heavy_ratio", 0.0, 0.0, 1.0, "heavy hitters as a fraction of the sequence so far"),
             ParamSpec::real("recent_ratio", 0.0, 0.0, 1.0, "recent window as a fraction of the sequence so far"),
             ParamSpec::string("overrides", "", {},
                               "per layer / kv head budgets: \"LAYER=heavy:recent;LAYER.KVHEAD=heavy:recent\" "
                               "(fractions when the ratios are used); layers below dense_layers stay dense"),
             ParamSpec::dense_layers(0)}};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    const bool ratio = p.get_float("heavy_ratio") > 0 || p.get_float("recent_ratio") > 0;
    const Budget base = ratio ? Budget{p.get_float("heavy_ratio"), p.get_float("recent_ratio"), true}
                              : Budget{double(p.get_int("heavy")), double(p.get_int("recent")), false};
    auto overrides = parse_overrides(p.get_string("overrides"), ratio);
    if (!overrides) return overrides.error();
    // Past the model's layer count means every layer dense, as in Quest; clamped so int32 cannot wrap.
    const auto dense_layers =
        int32_t(std::min<int64_t>(p.get_int("dense_layers"), std::numeric_limits<int32_t>::max()));
    return std::unique_ptr<Method>(std::make_unique<H2o>(base, std::move(*overrides), dense_layers));
  }
};

}  // namespace

INFERLAB_PLUGIN(H2oPlugin)
