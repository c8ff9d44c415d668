// StreamingLLM (Xiao et al., "Efficient Streaming Language Models with
// Attention Sinks", ICLR 2024): keep the first `sink_tokens` tokens and the
// most recent `window` tokens; evict the rest as tokens arrive, in prefill and
// decode. By default RoPE positions are indices in the cache, as in the paper,
// so a sequence can stream past the model's context length. The first
// `dense_layers` layers evict nothing (for comparisons with Quest, which keeps
// its first layers dense).
#include <algorithm>
#include <limits>

#include "inferlab/plugin_export.h"

namespace {

using namespace inferlab;

class StreamingLlm final : public Method {
 public:
  StreamingLlm(int32_t sinks, int32_t window, bool cache_positions, int32_t dense_layers)
      : sinks_(sinks), window_(window), cache_positions_(cache_positions), dense_layers_(dense_layers) {}

  KvPositions kv_positions() const override {
    return cache_positions_ ? KvPositions::Cache : KvPositions::Original;
  }

  void evict(const StepInfo&, const KvView& kv, int32_t layer, int32_t kv_head, std::vector<int32_t>& drop) override {
    if (layer < dense_layers_) return;  // max_tokens_kept stays the bound of the layers that evict
    const int32_t n = kv.n_tokens(layer, kv_head);
    kept_max_ = std::max<double>(kept_max_, std::min(n, sinks_ + window_));
    if (n <= sinks_ + window_) return;
    for (int32_t i = sinks_; i < n - window_; ++i) drop.push_back(i);
  }

  std::map<std::string, double> counters() const override { return {{"max_tokens_kept", kept_max_}}; }

 private:
  int32_t sinks_, window_;
  bool cache_positions_;
  int32_t dense_layers_;
  double kept_max_ = 0;
};

class StreamingLlmPlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    return {"streamingllm",
            "1.0.0",
            "attention sinks + recent window; evicts as tokens arrive (Xiao et al. 2024)",
            hooks_of<StreamingLlm>(),
            {ParamSpec::integer("sink_tokens", 4, 0, 1 << 20, "first tokens always kept (attention sinks)"),
             ParamSpec::integer("window", 256, 1, 1 << 24, "most recent tokens kept"),
             ParamSpec::string("positions", "cache", {"cache", "original"},
                               "RoPE positions: indices in the cache (paper) or original positions"),
             ParamSpec::dense_layers(0)}};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    // Past the model's layer count means every layer dense, as in Quest; clamped so int32 cannot wrap.
    const auto dense_layers =
        int32_t(std::min<int64_t>(p.get_int("dense_layers"), std::numeric_limits<int32_t>::max()));
    return std::unique_ptr<Method>(std::make_unique<StreamingLlm>(
        int32_t(p.get_int("sink_tokens")), int32_t(p.get_int("window")), p.get_string("positions") == "cache",
        dense_layers));
  }
};

}  // namespace

INFERLAB_PLUGIN(StreamingLlmPlugin)
