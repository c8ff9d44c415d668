#include "engine/plans.h"

#include <algorithm>
#include <numeric>

namespace inferlab {

bool KeyPlan::any_selected() const {
  return std::any_of(mode.begin(), mode.end(), [](kernels::KeySelect m) { return m != kernels::KeySelect::All; });
}

bool KeyPlan::any_by_bound() const {
  return std::any_of(budget.begin(), budget.end(), [](int32_t b) { return b > 0; });
}

HeadTraffic head_traffic(const KeyPlan& plan, int32_t g, int32_t ps) {
  const int32_t cached = plan.cached[size_t(g)];
  const int64_t all_pages = (cached + ps - 1) / ps;
  switch (plan.mode[size_t(g)]) {
    case kernels::KeySelect::All:
      return {cached, all_pages};
    case kernels::KeySelect::Pages: {
      const int32_t budget = plan.budget[size_t(g)];
      if (budget > 0 && !plan.by_bound_per_head)  // full pages, then the last one
        return {int64_t(budget - 1) * ps + (cached - (all_pages - 1) * ps), budget};
      HeadTraffic t;
      for (int32_t p : plan.head(g)) {
        if (p < 0) continue;  // an unused slot of a per-query-head union
        t.keys += std::min(ps, cached - p * ps);
        ++t.pages;
      }
      return t;
    }
    case kernels::KeySelect::Tokens: {
      HeadTraffic t;
      int32_t last_page = -1;
      for (int32_t x : plan.head(g)) {
        if (x < 0) continue;
        ++t.keys;
        t.pages += x / ps != last_page;
        last_page = x / ps;
      }
      return t;
    }
  }
  return {};
}

std::span<const int32_t> BlockPlan::key_blocks(int32_t head, int32_t self) const {
  const int32_t qb = self / block_size;
  if (!active() || sparse[size_t(head)] == 0 || qb >= n_query_blocks) return {};
  const size_t row = size_t(head) * size_t(n_query_blocks + 1) + size_t(qb);
  return {keys.data() + indptr[row], size_t(indptr[row + 1] - indptr[row])};
}

BlockPlan make_block_plan(const std::vector<std::optional<BlockPattern>>& patterns, int32_t stored) {
  BlockPlan plan;
  int32_t size = 0;
  for (const auto& p : patterns)
    if (p) size = std::gcd(size, p->block_size);
  if (size == 0) return plan;
  // A pattern at block size f * size is the same pattern at `size` with each
  // pair split into f x f finer pairs (causality still applies inside blocks);
  // finer key blocks past their query block hold only future keys: dropped.
  plan.block_size = size;
  plan.n_query_blocks = (stored + size - 1) / size;
  const int32_t n_qb = plan.n_query_blocks;
  plan.sparse.assign(patterns.size(), 0);
  std::vector<std::vector<int32_t>> rows(static_cast<size_t>(n_qb));
  for (size_t h = 0; h < patterns.size(); ++h) {
    const auto& p = patterns[h];
    plan.sparse[h] = p.has_value();
    for (auto& r : rows) r.clear();
    if (p) {
      const int32_t f = p->block_size / size;
      for (const auto& [qb, kb] : p->blocks)
        for (int32_t qs = qb * f; qs < std::min(n_qb, qb * f + f); ++qs)
          for (int32_t ks = kb * f; ks < kb * f + f && ks <= qs; ++ks) rows[size_t(qs)].push_back(ks);
    }
    for (int32_t qs = 0; qs <= n_qb; ++qs) {
      plan.indptr.push_back(int32_t(plan.keys.size()));
      if (qs == n_qb) break;
      auto& r = rows[size_t(qs)];
      std::sort(r.begin(), r.end());
      r.erase(std::unique(r.begin(), r.end()), r.end());
      plan.keys.insert(plan.keys.end(), r.begin(), r.end());
    }
  }
  return plan;
}

bool StepPlan::any_bound(int32_t layer) const {
  const auto& b = budgets[size_t(layer)];
  return std::any_of(b.begin(), b.end(), [](int32_t x) { return x > 0; });
}

}  // namespace inferlab
