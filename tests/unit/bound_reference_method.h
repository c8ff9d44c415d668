// A method that reads `budget` KV pages per (layer, kv head) at each decode
// step, chosen by Quest's key bound, either through the engine's mechanism
// (kHookPageBudget) or by computing the bounds itself from the KvView and
// returning the pages through select_kv: the reference the engine's
// mechanism is checked against, on either backend. It can also evict listed
// positions in one forward call, which makes the engine rebuild its bounds.
// per_head: each query head selects its own pages (BoundScope::QueryHead; the
// reference returns their union with each page's heads).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <numeric>
#include <set>
#include <span>
#include <vector>

#include "inferlab/plugin.h"

namespace inferlab::test {

class BoundMethod final : public Method {
 public:
  // warp_order: sum each page's score in the order of the CUDA scoring kernel
  // (32 lanes over strided channels, heads inside, then a butterfly sum) so a
  // reference on the CUDA backend rounds exactly as the device does and a near
  // tie at the selection cut cannot fall differently; otherwise in the CPU
  // twin's order (heads, then channels).
  BoundMethod(bool engine_side, int32_t budget, std::set<int32_t> evict_positions = {}, int64_t evict_step = -1,
              bool warp_order = false, bool per_head = false)
      : engine_side_(engine_side),
        budget_(budget),
        evict_(std::move(evict_positions)),
        evict_step_(evict_step),
        warp_order_(warp_order),
        per_head_(per_head) {}

  uint32_t hooks() const { return (engine_side_ ? kHookPageBudget : kHookDecodeSelection) | kHookEviction; }
  BoundScope bound_scope() const override { return per_head_ ? BoundScope::QueryHead : BoundScope::KvHead; }

  int32_t page_budget(const StepInfo& step, const KvView&, int32_t, int32_t) override {
    return step.decode() ? budget_ : 0;
  }

  bool select_kv(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head, std::span<const float> q,
                 KvSelection& selection) override {
    if (!step.decode()) return false;
    const int32_t n = kv.n_tokens(layer, kv_head), ps = kv.page_size(), pages = (n + ps - 1) / ps;
    if (pages <= budget_) return false;
    const int32_t gs = shape_.group_size(), hd = int32_t(q.size()) / gs;
    std::vector<float> lo(size_t(pages - 1) * size_t(hd), std::numeric_limits<float>::infinity());
    std::vector<float> hi(size_t(pages - 1) * size_t(hd), -std::numeric_limits<float>::infinity());
    for (int32_t p = 0; p + 1 < pages; ++p)
      for (int32_t t = p * ps; t < std::min(n, (p + 1) * ps); ++t) {
        const float* k = kv.key(layer, kv_head, t);
        for (int32_t i = 0; i < hd; ++i) {
          lo[size_t(p * hd + i)] = std::min(lo[size_t(p * hd + i)], k[i]);
          hi[size_t(p * hd + i)] = std::max(hi[size_t(p * hd + i)], k[i]);
        }
      }
    // The best budget - 1 pages by the bound of query heads [h0, h1), then the last.
    auto select = [&](int32_t h0, int32_t h1) {
      std::vector<float> score(static_cast<size_t>(pages - 1));
      for (int32_t p = 0; p + 1 < pages; ++p) {
        const std::span<const float> plo(&lo[size_t(p * hd)], size_t(hd)), phi(&hi[size_t(p * hd)], size_t(hd));
        score[size_t(p)] = warp_order_ ? warp_score(q, plo, phi, hd, h0, h1) : twin_score(q, plo, phi, hd, h0, h1);
      }
      std::vector<int32_t> order(static_cast<size_t>(pages - 1));
      std::iota(order.begin(), order.end(), 0);
      std::stable_sort(order.begin(), order.end(),
                       [&](int32_t a, int32_t b) { return score[size_t(a)] > score[size_t(b)]; });
      order.resize(size_t(budget_ - 1));
      std::sort(order.begin(), order.end());
      order.push_back(pages - 1);
      return order;
    };
    selection.unit = KvSelection::Unit::Pages;
    if (!per_head_) {
      selection.indices = select(0, gs);
      return true;
    }
    std::vector<uint32_t> heads(static_cast<size_t>(pages), 0u);
    for (int32_t h = 0; h < gs; ++h)
      for (int32_t p : select(h, h + 1)) heads[size_t(p)] |= 1u << h;
    for (int32_t p = 0; p < pages; ++p)
      if (heads[size_t(p)] != 0) {
        selection.indices.push_back(p);
        selection.heads.push_back(heads[size_t(p)]);
      }
    return true;
  }

  void evict(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head,
             std::vector<int32_t>& drop) override {
    if (step.step != evict_step_) return;
    const auto positions = kv.positions(layer, kv_head);
    for (int32_t i = 0; i < int32_t(positions.size()); ++i)
      if (evict_.count(positions[size_t(i)]) != 0) drop.push_back(i);
  }

  void begin_sequence(const ModelShape& shape) override { shape_ = shape; }

 private:
  float twin_score(std::span<const float> q, std::span<const float> lo, std::span<const float> hi, int32_t hd,
                   int32_t h0, int32_t h1) const {
    float s = 0;
    for (int32_t h = h0; h < h1; ++h)
      for (int32_t i = 0; i < hd; ++i) {
        const float qi = q[size_t(h * hd + i)];
        s += std::max(qi * lo[size_t(i)], qi * hi[size_t(i)]);
      }
    return s;
  }
  float warp_score(std::span<const float> q, std::span<const float> lo, std::span<const float> hi, int32_t hd,
                   int32_t h0, int32_t h1) const {
    float lane[32];
    for (int32_t l = 0; l < 32; ++l) {
      float s = 0;
      for (int32_t i = l; i < hd; i += 32)
        for (int32_t h = h0; h < h1; ++h) {
          const float qi = q[size_t(h * hd + i)];
          s += std::fmax(qi * lo[size_t(i)], qi * hi[size_t(i)]);
        }
      lane[l] = s;
    }
    for (int32_t offset = 16; offset > 0; offset >>= 1) {
      float next[32];
      for (int32_t l = 0; l < 32; ++l) next[l] = lane[l] + lane[l ^ offset];
      std::copy(next, next + 32, lane);
    }
    return lane[0];
  }

  bool engine_side_;
  int32_t budget_;
  std::set<int32_t> evict_;
  int64_t evict_step_;
  bool warp_order_;
  bool per_head_;
  ModelShape shape_;
};

}  // namespace inferlab::test
