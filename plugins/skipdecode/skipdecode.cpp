// SkipDecode (Del Corro et al., 2023, "SkipDecode: Autoregressive Skip
// Decoding with Batching and Caching for Efficient LLM Inference"): every
// decode token runs a budget of layers (its exit point) that decays linearly
// with the generated position, from `max_exit` at the first generated token to
// `min_exit` after `schedule_length` generated tokens, clamped there. A token
// runs the bottom `warmup_layers` layers and then the TOP layers of its
// budget, skipping the middle. Because budgets never grow, every layer a
// later token runs was run by every earlier token, so no key or value is ever
// missing and nothing is recomputed: skipped layers store no KV
// (SkippedLayerKv::None). The prompt runs every layer.
//
// The budget at each generated index and the layers it runs:
// inferlab/skipdecode_schedule.h (fine-tuning applies the same schedule);
// the paper's linear exit point rounded up, in integers.
#include <algorithm>
#include <string>

#include "inferlab/plugin_export.h"
#include "inferlab/prompt_end.h"
#include "inferlab/skipdecode_schedule.h"

namespace {

using namespace inferlab;

class SkipDecode final : public Method {
 public:
  SkipDecode(int32_t max_exit, int32_t min_exit, int32_t warmup, int32_t schedule_length)
      : max_param_(max_exit), min_param_(min_exit), warmup_(warmup), schedule_length_(schedule_length) {}

  Status on_load(const LoadContext& ctx) override {
    const int32_t n = ctx.shape.n_layers;
    const auto all = [n](int32_t v) { return v == 0 ? n : v; };
    const auto named = [n](const char* key, int32_t v) {
      return std::string(key) + " = " + std::to_string(v) + (v == 0 ? " (all " + std::to_string(n) + " layers)" : "");
    };
    if (max_param_ > n)
      return Error{"skipdecode: max_exit = " + std::to_string(max_param_) + " is past the model's " +
                   std::to_string(n) + " layers"};
    if (min_param_ > n)
      return Error{"skipdecode: min_exit = " + std::to_string(min_param_) + " is past the model's " +
                   std::to_string(n) + " layers"};
    if (warmup_ > n)
      return Error{"skipdecode: warmup_layers = " + std::to_string(warmup_) + " is past the model's " +
                   std::to_string(n) + " layers"};
    if (all(min_param_) > all(max_param_))
      return Error{"skipdecode: min_exit must not exceed max_exit (" + named("min_exit", min_param_) + ", " +
                   named("max_exit", max_param_) + ")"};
    if (warmup_ > all(min_param_))
      return Error{"skipdecode: warmup_layers = " + std::to_string(warmup_) + " exceeds " +
                   named("min_exit", min_param_) + ": every token runs its warm-up layers"};
    n_layers_ = n;
    max_exit_ = all(max_param_);
    min_exit_ = all(min_param_);
    schedule_ = SkipDecodeSchedule{n, max_exit_, min_exit_, warmup_, schedule_length_};
    decode_tokens_ = 0;
    layers_run_ = 0;
    last_budget_ = max_exit_;
    return ok_status();
  }

  std::unique_ptr<SequenceState> new_sequence_state(const ModelShape&) override {
    return std::make_unique<PromptEnd>();
  }

  bool plan_layers(const StepInfo& step, LayerPlan& plan) override {
    const std::optional<int64_t> g = PromptEnd::generated(step);
    if (!g) return false;  // the prompt (or any multi-token call) runs every layer
    const int32_t b = schedule_.budget(*g);
    ++decode_tokens_;
    layers_run_ += b;
    last_budget_ = b;
    if (b >= n_layers_) return false;
    for (int32_t l = 0; l < n_layers_; ++l) plan.run[size_t(l)] = schedule_.runs(l, b) ? 1 : 0;
    plan.kv_fill = SkippedLayerKv::None;
    return true;
  }

  std::map<std::string, double> counters() const override {
    const double avg = decode_tokens_ > 0 ? double(layers_run_) / double(decode_tokens_) : double(n_layers_);
    return {{"decode_tokens", double(decode_tokens_)},
            {"avg_layers_per_decode_token", avg},
            {"layer_speedup", avg > 0 ? double(n_layers_) / avg : 0.0},
            {"last_budget", double(last_budget_)},
            {"max_exit", double(max_exit_)},
            {"min_exit", double(min_exit_)}};
  }

 private:
  int32_t max_param_, min_param_, warmup_, schedule_length_;
  int32_t n_layers_ = 0, max_exit_ = 0, min_exit_ = 0;
  SkipDecodeSchedule schedule_;
  int64_t decode_tokens_ = 0, layers_run_ = 0;
  int32_t last_budget_ = 0;
};

class SkipDecodePlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    return {"skipdecode",
            "1.0.0",
            "position-wise layer budget decaying linearly, warm-up + top layers, no KV fill (Del Corro et al. 2023)",
            hooks_of<SkipDecode>(),
            {ParamSpec::integer("max_exit", 0, 0, 1 << 16, "layers run at the first generated token (0: all)"),
             ParamSpec::integer("min_exit", 0, 0, 1 << 16,
                                "layers run from the end of the schedule on (0: all)"),
             ParamSpec::integer("warmup_layers", 1, 0, 1 << 16, "bottom layers every decode token runs"),
             ParamSpec::integer("schedule_length", 256, 1, 1 << 24,
                                "generated tokens over which the budget decays from max_exit to min_exit")}};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    const auto max_exit = int32_t(p.get_int("max_exit")), min_exit = int32_t(p.get_int("min_exit"));
    const auto warmup = int32_t(p.get_int("warmup_layers"));
    // What can be checked without the model (0 means all layers: checked at on_load).
    if (max_exit > 0 && min_exit > max_exit)
      return Error{"skipdecode: min_exit = " + std::to_string(min_exit) + " exceeds max_exit = " +
                   std::to_string(max_exit)};
    if (min_exit > 0 && warmup > min_exit)
      return Error{"skipdecode: warmup_layers = " + std::to_string(warmup) + " exceeds min_exit = " +
                   std::to_string(min_exit) + ": every token runs its warm-up layers"};
    return std::unique_ptr<Method>(
        std::make_unique<SkipDecode>(max_exit, min_exit, warmup, int32_t(p.get_int("schedule_length"))));
  }
};

}  // namespace

INFERLAB_PLUGIN(SkipDecodePlugin)
