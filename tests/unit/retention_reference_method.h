// A method that keeps, per (layer, kv head), the first `sink` tokens, the last
// `recent` and the `heavy` best-scoring others, either through the engine's
// retention mechanism (kHookRetention) or by keeping the scores itself from
// the attention statistics (on_attention) and evicting (evict): the host-side
// reference the engine's mechanism is checked against, on either backend.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <span>
#include <utility>
#include <vector>

#include "engine/engine.h"
#include "engine/kv_cache.h"
#include "inferlab/plugin.h"
#include "naive_reference.h"

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

namespace inferlab::test {

// Retention per sequence (SpAtten's cascade) through the engine: one score
// per position summed over layers and kv heads, every kv head of a layer
// keeping the same tokens, a token dropped at layer l gone from every later
// layer, per-layer budgets. CascadeTrace below says what each query then reads.
class SequenceRetentionMethod final : public Method {
 public:
  explicit SequenceRetentionMethod(std::vector<RetentionBudget> per_layer,
                                   RetentionScore score = RetentionScore::AccumulatedMass)
      : per_layer_(std::move(per_layer)), score_(score) {}

  uint32_t hooks() const { return kHookRetention; }
  RetentionPolicy retention_policy() const override { return {score_, RetentionScope::PerSequence}; }
  RetentionBudget retention_budget(const StepInfo&, int32_t layer, int32_t) override {
    return per_layer_[size_t(layer)];
  }

 private:
  std::vector<RetentionBudget> per_layer_;
  RetentionScore score_;
};

// The cache's tables around each forward call of a run under retention per
// sequence, and what they imply each query read (for the naive reference): at
// layer l, query t of a call read key j <= t when j was stored at layer l
// before the call or is one of the call's rows, and (l > 0) layer l - 1 still
// held j after the call: a token dropped at a shallower layer leaves before
// the deeper layers' attention, a pruned row stops at the layer that dropped it.
struct CascadeTrace {
  using Tables = std::vector<std::vector<int32_t>>;  // per layer: kv head 0's positions
  std::vector<int32_t> starts;  // each call's first position
  std::vector<Tables> before, after;

  static Tables snapshot(const KvSequence& seq) {
    Tables t;
    for (int32_t l = 0; l < seq.pool().shape().n_layers; ++l) t.push_back(seq.table(l, 0).positions);
    return t;
  }
  static bool holds(const std::vector<int32_t>& positions, int64_t p) {
    return std::binary_search(positions.begin(), positions.end(), int32_t(p));
  }
  void begin_call(const KvSequence& seq) {
    starts.push_back(seq.n_past());
    before.push_back(snapshot(seq));
  }
  void end_call(const KvSequence& seq) { after.push_back(snapshot(seq)); }
  bool visible(int32_t layer, int64_t t, int64_t j) const {
    const size_t k = size_t(std::upper_bound(starts.begin(), starts.end(), int32_t(t)) - starts.begin()) - 1;
    const bool stored_or_new = j >= starts[k] || holds(before[k][size_t(layer)], j);
    return stored_or_new && (layer == 0 || holds(after[k][size_t(layer - 1)], j));
  }
  // `tokens` fed to `engine` as a prompt of `prefill` tokens (its last row's
  // logits) then one token per call, recording the tables around each call;
  // `positions` and `logits` get each returned row.
  Status run(Engine& engine, KvSequence& seq, const std::vector<int32_t>& tokens, int32_t prefill,
             std::vector<int64_t>& positions, std::vector<float>& logits) {
    for (int32_t p0 = 0; p0 < int32_t(tokens.size()); p0 += p0 == 0 ? prefill : 1) {
      const int32_t n = p0 == 0 ? prefill : 1;
      begin_call(seq);
      auto sink = [&](int64_t row, std::span<const float> l) {
        positions.push_back(p0 + row);
        logits.insert(logits.end(), l.begin(), l.end());
      };
      if (auto s = engine.forward(seq, std::span<const int32_t>(&tokens[size_t(p0)], size_t(n)), n - 1, sink); !s)
        return s;
      end_call(seq);
    }
    return ok_status();
  }
  NaivePolicy policy() const {
    NaivePolicy p;
    p.key_visible = [this](int32_t layer, int32_t, int64_t t, int64_t j) { return visible(layer, t, j); };
    return p;
  }
};

}  // namespace inferlab::test
