// A method that keeps, per (layer, kv head), the first `sink` tokens, the last
// `recent` and the `heavy` best-scoring others, either through the engine's
// retention mechanism (kHookRetention) or by keeping the scores itself from
// the attention statistics (on_attention) and evicting (evict): the host-side
// reference the engine's mechanism is checked against, on either backend.
#pragma once

#include <algorithm>
#include <cstdint>
#include <numeric>
#include <vector>

#include "inferlab/plugin.h"

namespace inferlab::test {

class RetentionMethod final : public Method {
 public:
  RetentionMethod(bool engine_side, RetentionBudget budget, RetentionScore score = RetentionScore::AccumulatedMass)
      : engine_side_(engine_side), budget_(budget), score_(score) {}

  uint32_t hooks() const { return engine_side_ ? kHookRetention : kHookAttentionFeedback | kHookEviction; }

  void begin_sequence(const ModelShape& shape) override {
    shape_ = shape;
    scores_.assign(size_t(shape.n_layers) * size_t(shape.n_kv_heads), {});
  }

  RetentionPolicy retention_policy() const override { return {score_, RetentionScope::PerHead}; }
  RetentionBudget retention_budget(const StepInfo&, int32_t, int32_t) override { return budget_; }

  void on_attention(const StepInfo&, const KvView&, const AttentionStats& stats) override {
    std::vector<float>& s = scores(stats.layer, stats.kv_head);
    s.resize(stats.key_mass.size(), 0.0f);  // new tokens start with no score
    for (size_t i = 0; i < s.size(); ++i)
      s[i] = score_ == RetentionScore::LastMass ? stats.key_mass[i] : s[i] + stats.key_mass[i];
  }

  void evict(const StepInfo&, const KvView& kv, int32_t layer, int32_t kv_head, std::vector<int32_t>& drop) override {
    const int32_t n = kv.n_tokens(layer, kv_head);
    const RetentionBudget& b = budget_;
    if (b.heavy < 0 || n <= b.sink + b.recent + b.heavy) return;
    std::vector<float>& s = scores(layer, kv_head);
    std::vector<int32_t> order(size_t(n - b.recent - b.sink));
    std::iota(order.begin(), order.end(), b.sink);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t c) { return s[size_t(a)] > s[size_t(c)]; });
    drop.assign(order.begin() + b.heavy, order.end());
    std::sort(drop.begin(), drop.end());
    std::vector<float> kept;  // scores follow the engine's compaction
    for (int32_t i = 0, d = 0; i < n; ++i) {
      if (d < int32_t(drop.size()) && drop[size_t(d)] == i) {
        ++d;
        continue;
      }
      kept.push_back(s[size_t(i)]);
    }
    s = std::move(kept);
  }

 private:
  std::vector<float>& scores(int32_t layer, int32_t kv_head) {
    return scores_[size_t(layer) * size_t(shape_.n_kv_heads) + size_t(kv_head)];
  }

  bool engine_side_;
  RetentionBudget budget_;
  RetentionScore score_;
  ModelShape shape_;
  std::vector<std::vector<float>> scores_;  // per (layer, kv head), per stored token
};

}  // namespace inferlab::test
