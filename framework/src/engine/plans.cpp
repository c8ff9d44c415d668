#include "engine/plans.h"

#include <algorithm>
#include <climits>
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

BlockPlan make_block_plan(const std::vector<std::optional<PrefillPattern>>& patterns, int32_t stored) {
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

// Index of (head, qb) in the per-block arrays, or -1 when the plan has no such block.
int64_t SparsePlan::block_index(int32_t head, int32_t qb) const {
  const Head& h = heads[size_t(head)];
  if (h.block_size == 0 || qb < h.first_block || qb >= h.first_block + h.n_blocks) return -1;
  return int64_t(h.at) + qb - h.first_block;
}

std::span<const int32_t> SparsePlan::block_ranges(int32_t head, int32_t qb) const {
  const int64_t b = block_index(head, qb);
  if (b < 0) return {};
  return {ranges.data() + 2 * range_indptr[size_t(b)], size_t(2 * (range_indptr[size_t(b) + 1] - range_indptr[size_t(b)]))};
}

std::span<const int32_t> SparsePlan::block_columns(int32_t head, int32_t qb) const {
  const int64_t b = block_index(head, qb);
  if (b < 0) return {};
  return {columns.data() + column_indptr[size_t(b)], size_t(column_indptr[size_t(b) + 1] - column_indptr[size_t(b)])};
}

SparsePlanBuilder::SparsePlanBuilder(int32_t n_heads) { plan_.heads.resize(size_t(n_heads)); }

void SparsePlanBuilder::begin_head(int32_t head, int32_t block_size, int32_t row_begin, int32_t row_end) {
  if (plan_.range_indptr.empty()) {
    plan_.range_indptr.push_back(0);
    plan_.column_indptr.push_back(0);
  }
  head_ = head;
  row_begin_ = row_begin;
  row_end_ = row_end;
  SparsePlan::Head& h = plan_.heads[size_t(head)];
  h.block_size = block_size;
  h.first_block = row_begin / block_size;
  h.n_blocks = (row_end - 1) / block_size - h.first_block + 1;
  h.at = int32_t(plan_.range_indptr.size()) - 1;
  next_block_ = h.first_block;
}

void SparsePlanBuilder::add_block(std::vector<std::pair<int32_t, int32_t>>& ranges, std::span<const int32_t> columns) {
  const int32_t bs = plan_.heads[size_t(head_)].block_size;
  const int32_t q0 = next_block_ * bs, q1 = std::min(q0 + bs, row_end_);
  ++next_block_;
  for (auto& [b, e] : ranges) {
    b = std::max(b, 0);
    e = std::min(e, q1);
  }
  std::erase_if(ranges, [](const auto& r) { return r.first >= r.second; });
  std::sort(ranges.begin(), ranges.end());
  const size_t first = plan_.ranges.size();
  for (const auto& [b, e] : ranges) {
    const size_t n = plan_.ranges.size();
    if (n > first && b <= plan_.ranges[n - 1])
      plan_.ranges[n - 1] = std::max(plan_.ranges[n - 1], e);
    else
      plan_.ranges.insert(plan_.ranges.end(), {b, e});
  }
  plan_.range_indptr.push_back(int32_t(plan_.ranges.size() / 2));
  // Keys read by the block's rows [r0, r1): a range [b, e) gives row r
  // min(r + 1, e) - b keys when r >= b; a column c one key when r >= c.
  const int64_t r0 = std::max(q0, row_begin_), r1 = q1;
  auto rows_reading = [&](int64_t b, int64_t e) {  // sum over rows of max(0, min(r + 1, e) - b)
    int64_t sum = 0;
    const int64_t lo = std::max(r0, b), hi = std::min(r1, e - 1);  // rows b <= r < e - 1 read r + 1 - b
    if (hi > lo) sum += (hi - lo) * (lo + hi + 1 - 2 * b) / 2;
    return sum + std::max<int64_t>(0, r1 - std::max(r0, e - 1)) * (e - b);
  };
  for (size_t i = first; i < plan_.ranges.size(); i += 2) plan_.keys_read += rows_reading(plan_.ranges[i], plan_.ranges[i + 1]);
  size_t at = first;
  for (const int32_t c : columns) {
    if (c < 0) continue;
    if (c >= q1) break;
    while (at < plan_.ranges.size() && plan_.ranges[at + 1] <= c) at += 2;
    if (at < plan_.ranges.size() && plan_.ranges[at] <= c) continue;  // inside a range
    plan_.columns.push_back(c);
    plan_.keys_read += std::max<int64_t>(0, r1 - std::max<int64_t>(r0, c));
  }
  plan_.column_indptr.push_back(int32_t(plan_.columns.size()));
  for (int64_t r = r0; r < r1; ++r) plan_.keys_causal += r + 1;
}

SparsePlan SparsePlanBuilder::finish() { return std::move(plan_); }

void pattern_block_ranges(const PrefillPattern& p, int32_t qb, std::vector<std::pair<int32_t, int32_t>>& ranges) {
  const int32_t bs = p.block_size, q0 = qb * bs;
  if (p.kind == PrefillPattern::Kind::AShape) {
    ranges.emplace_back(0, p.sink);
    ranges.emplace_back(q0 - p.local, q0 + bs);
    return;
  }
  auto it = std::lower_bound(p.blocks.begin(), p.blocks.end(), std::pair<int32_t, int32_t>{qb, INT32_MIN});
  for (; it != p.blocks.end() && it->first == qb; ++it) ranges.emplace_back(it->second * bs, it->second * bs + bs);
}

void slash_ranges(std::span<const int32_t> diagonals, int32_t q0, int32_t q1,
                  std::vector<std::pair<int32_t, int32_t>>& ranges) {
  for (const int32_t d : diagonals) ranges.emplace_back(q0 - d, q1 - d);
}

bool StepPlan::any_bound(int32_t layer) const {
  const auto& b = budgets[size_t(layer)];
  return std::any_of(b.begin(), b.end(), [](int32_t x) { return x > 0; });
}

}  // namespace inferlab
