#include "engine/plans.h"

#include <algorithm>
#include <climits>
#include <numeric>

namespace inferlab {

void RequantTally::add(int32_t group_size, int64_t n_rows, std::span<const uint8_t> computed,
                       std::span<const uint8_t> refetched_rows, std::span<const int64_t> keys,
                       std::span<const int64_t> values) {
  const auto n_heads = int32_t(computed.size());
  for (int32_t h = 0; h < n_heads; ++h) {
    if (computed[size_t(h)] == 0) continue;
    rows += n_rows;
    for (int64_t i = 0; i < n_rows; ++i) refetched += refetched_rows[size_t(h * n_rows + i)];
  }
  for (int32_t g = 0; g < n_heads / group_size; ++g)
    for (int64_t i = 0; i < n_rows; ++i) {
      int64_t k = 0, v = 0;
      for (int32_t h = g * group_size; h < (g + 1) * group_size; ++h) {
        k = std::max(k, keys[size_t(h * n_rows + i)]);
        v = std::max(v, values[size_t(h * n_rows + i)]);
      }
      lsb_key_rows += k;
      lsb_value_rows += v;
    }
}

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
  for (size_t i = first; i < plan_.ranges.size(); i += 2)
    plan_.keys_read += kernels::sparse_range_reads(r0, r1, plan_.ranges[i], plan_.ranges[i + 1]);
  size_t at = first;
  for (const int32_t c : columns) {
    if (c < 0) continue;
    if (c >= q1) break;
    while (at < plan_.ranges.size() && plan_.ranges[at + 1] <= c) at += 2;
    if (at < plan_.ranges.size() && plan_.ranges[at] <= c) continue;  // inside a range
    plan_.columns.push_back(c);
    plan_.keys_read += kernels::sparse_range_reads(r0, r1, c, c + 1);
  }
  plan_.column_indptr.push_back(int32_t(plan_.columns.size()));
  for (int64_t r = r0; r < r1; ++r) plan_.keys_causal += r + 1;
}

void SparsePlanBuilder::add_fixed_head(int32_t head, const PrefillPattern& p, int32_t row_begin, int32_t row_end) {
  begin_head(head, p.block_size, row_begin, row_end);
  std::vector<std::pair<int32_t, int32_t>> ranges;
  for (int32_t qb = row_begin / p.block_size; qb * p.block_size < row_end; ++qb) {
    ranges.clear();
    pattern_block_ranges(p, qb, ranges);
    add_block(ranges, {});
  }
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
