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

namespace inferlab::test {

// Retention per sequence (SpAtten's cascade): one score per position summed
// over layers and kv heads, every kv head of a layer keeping the same tokens, a
// token dropped at layer l gone from every later layer. Engine-side
// (kHookRetention, RetentionScope::PerSequence) or kept here from on_attention
// and carried out through evict: the host-side reference.
class SequenceRetentionMethod final : public Method {
 public:
  SequenceRetentionMethod(bool engine_side, std::vector<RetentionBudget> per_layer,
                          RetentionScore score = RetentionScore::AccumulatedMass)
      : engine_side_(engine_side), per_layer_(std::move(per_layer)), score_(score) {}

  uint32_t hooks() const { return engine_side_ ? kHookRetention : kHookAttentionFeedback | kHookEviction; }

  void begin_sequence(const ModelShape& shape) override {
    shape_ = shape;
    score_by_position_.clear();
    dropped_at_.clear();
  }

  RetentionPolicy retention_policy() const override { return {score_, RetentionScope::PerSequence}; }
  RetentionBudget retention_budget(const StepInfo&, int32_t layer, int32_t) override {
    return per_layer_[size_t(layer)];
  }

  void on_attention(const StepInfo& step, const KvView& kv, const AttentionStats& stats) override {
    const int32_t end = step.first_position + step.n_tokens;
    if (score_by_position_.size() < size_t(end)) {
      score_by_position_.resize(size_t(end), 0.0f);
      dropped_at_.resize(size_t(end), 0);
    }
    if (stats.layer == 0 && stats.kv_head == 0) {  // a new call: its tokens are new at their positions
      for (int32_t p = step.first_position; p < end; ++p) score_by_position_[size_t(p)] = 0, dropped_at_[size_t(p)] = 0;
      if (score_ == RetentionScore::LastMass) std::fill(score_by_position_.begin(), score_by_position_.end(), 0.0f);
    }
    const auto positions = kv.positions(stats.layer, stats.kv_head);
    for (size_t t = 0; t < positions.size(); ++t) score_by_position_[size_t(positions[t])] += stats.key_mass[t];
  }

  void evict(const StepInfo&, const KvView& kv, int32_t layer, int32_t kv_head, std::vector<int32_t>& drop) override {
    if (kv_head == 0) layer_drop_ = choose(kv.positions(layer, 0), layer);
    drop = layer_drop_;
  }

 private:
  std::vector<int32_t> choose(std::span<const int32_t> positions, int32_t layer) {
    std::vector<int32_t> candidates, out;
    std::vector<std::pair<float, int32_t>> ranked;  // (score, candidate index)
    for (int32_t t = 0; t < int32_t(positions.size()); ++t) {
      const int32_t mark = dropped_at_[size_t(positions[size_t(t)])];
      if (mark > 0 && mark <= layer) continue;
      candidates.push_back(t);
    }
    std::vector<uint8_t> stays(positions.size(), 0);
    for (int32_t t : candidates) stays[size_t(t)] = 1;
    const RetentionBudget& b = per_layer_[size_t(layer)];
    const int32_t n = int32_t(candidates.size());
    if (b.heavy >= 0 && n > b.sink + b.recent + b.heavy) {
      for (int32_t i = b.sink; i < n - b.recent; ++i) {
        const float s = score_by_position_[size_t(positions[size_t(candidates[size_t(i)])])];
        ranked.emplace_back(std::isnan(s) ? -std::numeric_limits<float>::infinity() : s, i);
      }
      std::stable_sort(ranked.begin(), ranked.end(), [](const auto& a, const auto& c) { return a.first > c.first; });
      for (size_t j = size_t(b.heavy); j < ranked.size(); ++j) {
        const int32_t t = candidates[size_t(ranked[j].second)];
        stays[size_t(t)] = 0;
        dropped_at_[size_t(positions[size_t(t)])] = layer + 1;
      }
    }
    for (int32_t t = 0; t < int32_t(positions.size()); ++t)
      if (stays[size_t(t)] == 0) out.push_back(t);
    return out;
  }

  bool engine_side_;
  std::vector<RetentionBudget> per_layer_;
  RetentionScore score_;
  ModelShape shape_;
  std::vector<float> score_by_position_;
  std::vector<int32_t> dropped_at_;  // 1 + the layer that dropped the position, 0 while stored
  std::vector<int32_t> layer_drop_;
};

}  // namespace inferlab::test
