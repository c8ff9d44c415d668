// A template method plugin: keep only the most recent `window` tokens of every
// layer and KV head (a sliding window, StreamingLLM without its sinks). It shows
// the three parts of a plugin: the method (hooks the engine calls), the plugin
// (name, version, parameters) and the export macro. The engine does the work:
// the method only names the tokens to drop, and the engine evicts them and
// frees their pages. See the inferlab README, "Adding a method plugin".
#include <algorithm>

#include "inferlab/plugin_export.h"

namespace {

using namespace inferlab;

class RecentWindow final : public Method {
 public:
  explicit RecentWindow(int32_t window) : window_(window) {}

  // After each layer's attention, for every KV head: which stored tokens to evict.
  void evict(const StepInfo&, const KvView& kv, int32_t layer, int32_t kv_head, std::vector<int32_t>& drop) override {
    const int32_t n = kv.n_tokens(layer, kv_head);
    for (int32_t i = 0; i < n - window_; ++i) drop.push_back(i);
    evicted_ += std::max(0, n - window_);
  }

  // Recorded with every run as plugin.<name> metrics.
  std::map<std::string, double> counters() const override { return {{"tokens_dropped", double(evicted_)}}; }

 private:
  int32_t window_;
  int64_t evicted_ = 0;
};

class RecentWindowPlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    return {"recent_window",
            "0.1.0",  // enters every run's hash: raise it when results change
            "keeps the most recent tokens (template plugin)",
            hooks_of<RecentWindow>(),
            {ParamSpec::integer("window", 64, 1, 1 << 24, "most recent tokens kept per layer and KV head")}};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    return std::unique_ptr<Method>(std::make_unique<RecentWindow>(int32_t(p.get_int("window"))));
  }
};

}  // namespace

INFERLAB_PLUGIN(RecentWindowPlugin)
