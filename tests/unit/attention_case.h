// Random attention cases over a paged KV pool in host memory, shared by the
// CPU twin's unit tests and the CUDA kernels' GPU tests: one spec builds the
// same inputs for both. Unused page slots hold NaN, so a kernel that reads a
// token it should not read shows up as NaN output.
#pragma once

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <ostream>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "cpu/half_convert.h"
#include "kernel_types.h"

namespace inferlab::test {

struct AttentionSpec {
  enum class Select { None, All, Pages, Tokens, Mixed };  // Mixed: heads cycle All, Pages, Tokens

  int32_t n_rows = 1;
  int32_t n_heads = 1;
  int32_t n_kv_heads = 1;
  int32_t head_dim = 16;
  int32_t page_size = 16;
  int32_t n_cached = 0;     // kv head g holds n_cached + g * cached_step tokens before the call
  int32_t cached_step = 0;
  kernels::DType dtype = kernels::DType::F32;
  Select select = Select::None;
  bool head_selects = false;  // each listed entry is read by a random non-empty subset of its group (select_heads)
  bool head_mask = false;
  bool block_sparse = false;  // even query heads get a random sparse plan (ranges and columns per query block)
  int32_t block_size = 4;
  double block_density = 0.5;  // chance of each candidate range and column
  bool stats = false;
  uint64_t seed = 1;

  std::string name() const {
    static const char* selects[] = {"", "_all", "_pages", "_tokens", "_mixed"};
    return fmt::format("h{}kv{}_d{}_ps{}_rows{}_cached{}{}{}{}_{}{}{}{}", n_heads, n_kv_heads, head_dim, page_size,
                       n_rows, n_cached, cached_step != 0 ? fmt::format("step{}", cached_step) : "",
                       selects[int(select)], head_selects ? "_heads" : "", kernels::dtype_name(dtype),
                       block_sparse ? fmt::format("_sparse{}", block_size) : "", head_mask ? "_mask" : "",
                       stats ? "_stats" : "");
  }
};

inline void PrintTo(const AttentionSpec& s, std::ostream* os) { *os << s.name(); }

// Host buffers of one attention call, and the call that points at them.
struct AttentionCase {
  AttentionSpec spec;
  int32_t pages_per_chunk = 5;
  std::vector<std::vector<uint32_t>> chunks;  // raw words; elements of spec.dtype
  std::vector<void*> chunk_base;
  std::vector<int32_t> table;      // (n_kv_heads, table_stride) physical page of each logical page
  int32_t table_stride = 0;
  std::vector<int32_t> n_cached;   // (n_kv_heads)
  int32_t max_stored = 0;
  std::vector<float> k, v;         // (n_kv_heads, max_stored, head_dim) stored values, as decoded
  std::vector<float> q, out;       // (n_rows, n_heads * head_dim)
  std::vector<uint8_t> select;     // (n_kv_heads) KeySelect, empty: none
  std::vector<int32_t> select_indptr, select_index;
  std::vector<uint32_t> select_heads;  // beside select_index, empty: none
  std::vector<uint8_t> head_active;   // (n_heads), empty: none
  std::vector<kernels::SparseHead> sparse_heads;  // (n_heads), empty: none
  std::vector<int32_t> range_begin, range_end, ranges, column_begin, column_end, columns;
  std::vector<float> key_mass;     // (n_kv_heads, mass_stride), empty: no stats
  int32_t mass_stride = 0;

  template <typename T>
  static const T* ptr(const std::vector<T>& v) { return v.empty() ? nullptr : v.data(); }

  kernels::AttentionCall call() {
    kernels::AttentionCall c;
    c.n_rows = spec.n_rows;
    c.n_heads = spec.n_heads;
    c.n_kv_heads = spec.n_kv_heads;
    c.head_dim = spec.head_dim;
    c.scale = 1.0f / std::sqrt(float(spec.head_dim));
    c.q = q.data();
    c.out = out.data();
    c.n_cached = n_cached.data();
    c.kv = {chunk_base.data(), pages_per_chunk, spec.page_size, spec.head_dim, spec.dtype};
    c.table = {table.data(), table_stride};
    c.select = ptr(select);
    c.select_indptr = ptr(select_indptr);
    c.select_index = ptr(select_index);
    c.select_heads = ptr(select_heads);
    c.head_active = ptr(head_active);
    c.sparse = {ptr(sparse_heads), ptr(range_begin), ptr(range_end), ptr(ranges),
                ptr(column_begin), ptr(column_end), ptr(columns)};
    c.key_mass = key_mass.empty() ? nullptr : key_mass.data();
    c.mass_stride = mass_stride;
    return c;
  }

  // Bound on the keys any kv head reads (cached selection + new rows).
  int32_t max_keys() const { return max_stored; }
};

namespace attention_case_detail {

inline float round_to(kernels::DType t, float x) {
  using namespace kernels::cpu;
  if (t == kernels::DType::F16) return f16_to_float(float_to_f16(x));
  if (t == kernels::DType::BF16) return bf16_to_float(float_to_bf16(x));
  return x;
}

inline void store(kernels::DType t, std::vector<uint32_t>& chunk, int64_t i, float x) {
  using namespace kernels::cpu;
  if (t == kernels::DType::F32) {
    std::memcpy(&chunk[size_t(i)], &x, 4);
    return;
  }
  const uint16_t bits = t == kernels::DType::F16 ? float_to_f16(x) : float_to_bf16(x);
  std::memcpy(reinterpret_cast<uint16_t*>(chunk.data()) + i, &bits, 2);
}

// Logical pages of a Pages selection: a random subset of the cached pages,
// always the one that holds new tokens too (its slots >= n_cached are skipped)
// and sometimes one beyond the cached tokens (skipped entirely).
inline void select_pages(std::mt19937_64& rng, int32_t cached, int32_t n_pages, int32_t ps, std::vector<int32_t>& out) {
  std::bernoulli_distribution pick(0.5);
  const int32_t cached_pages = (cached + ps - 1) / ps;
  for (int32_t p = 0; p < cached_pages; ++p)
    if (pick(rng) || (p == cached_pages - 1 && cached % ps != 0)) out.push_back(p);
  if (cached_pages < n_pages && pick(rng)) out.push_back(cached_pages);
}

inline void select_tokens(std::mt19937_64& rng, int32_t cached, std::vector<int32_t>& out) {
  std::bernoulli_distribution pick(0.4);
  for (int32_t t = 0; t < cached; ++t)
    if (pick(rng)) out.push_back(t);
  if (pick(rng)) out.push_back(cached);  // a new token: skipped
}

inline void fill_selection(AttentionCase& c, std::mt19937_64& rng) {
  using Select = AttentionSpec::Select;
  const AttentionSpec& s = c.spec;
  if (s.select == Select::None) return;
  c.select_indptr.push_back(0);
  for (int32_t g = 0; g < s.n_kv_heads; ++g) {
    auto mode = s.select == Select::Mixed ? kernels::KeySelect(g % 3)
                : s.select == Select::All ? kernels::KeySelect::All
                : s.select == Select::Pages ? kernels::KeySelect::Pages
                                            : kernels::KeySelect::Tokens;
    c.select.push_back(uint8_t(mode));
    const int32_t n_pages = (c.n_cached[size_t(g)] + s.n_rows + s.page_size - 1) / s.page_size;
    // Odd heads list indices below the cache too (skipped, as those past it are).
    if (g % 2 == 1 && mode == kernels::KeySelect::Pages) c.select_index.push_back(-2);
    if (g % 2 == 1 && mode == kernels::KeySelect::Tokens) c.select_index.insert(c.select_index.end(), {-3, -1});
    if (mode == kernels::KeySelect::Pages) select_pages(rng, c.n_cached[size_t(g)], n_pages, s.page_size, c.select_index);
    if (mode == kernels::KeySelect::Tokens) select_tokens(rng, c.n_cached[size_t(g)], c.select_index);
    c.select_indptr.push_back(int32_t(c.select_index.size()));
  }
}

// Sparse plans on the even query heads: per query block of the call, up to
// three key ranges at any offset (overlaps merged) and up to six single
// columns outside them, each with probability block_density; query head 0's
// first query block lists nothing, so its first rows see no key. Each block's
// ranges and columns are followed by a poison entry (every key, or a column
// not listed) that a kernel reading past a block's end would take.
inline void fill_sparse_plan(AttentionCase& c, std::mt19937_64& rng) {
  const AttentionSpec& s = c.spec;
  if (!s.block_sparse) return;
  const int32_t bs = s.block_size, group = s.n_heads / s.n_kv_heads;
  std::bernoulli_distribution pick(s.block_density);
  int32_t blocks = 0;
  for (int32_t h = 0; h < s.n_heads; ++h) {
    kernels::SparseHead head;
    if (h % 2 == 0) {
      const int32_t cached = c.n_cached[size_t(h / group)], stored = cached + s.n_rows;
      head = {bs, cached / bs, (stored - 1) / bs - cached / bs + 1, blocks};
      for (int32_t i = 0; i < head.n_blocks; ++i) {
        const int32_t q0 = (head.first_block + i) * bs, q1 = std::min(q0 + bs, stored);
        std::vector<std::pair<int32_t, int32_t>> r;
        std::vector<int32_t> cols;
        if (!(h == 0 && i == 0)) {
          for (int k = 0; k < 3; ++k)
            if (pick(rng)) {
              const int32_t b = std::uniform_int_distribution<int32_t>(0, q1 - 1)(rng);
              r.emplace_back(b, std::min(q1, b + std::uniform_int_distribution<int32_t>(1, 2 * bs + 3)(rng)));
            }
          std::sort(r.begin(), r.end());
          std::vector<std::pair<int32_t, int32_t>> merged;
          for (const auto& x : r)
            if (!merged.empty() && x.first <= merged.back().second) merged.back().second = std::max(merged.back().second, x.second);
            else merged.push_back(x);
          r = merged;
          for (int k = 0; k < 6; ++k)
            if (pick(rng)) {
              const int32_t t = std::uniform_int_distribution<int32_t>(0, q1 - 1)(rng);
              if (std::none_of(r.begin(), r.end(), [&](const auto& x) { return x.first <= t && t < x.second; }))
                cols.push_back(t);
            }
          std::sort(cols.begin(), cols.end());
          cols.erase(std::unique(cols.begin(), cols.end()), cols.end());
        }
        c.range_begin.push_back(int32_t(c.ranges.size() / 2));
        for (const auto& x : r) c.ranges.insert(c.ranges.end(), {x.first, x.second});
        c.range_end.push_back(int32_t(c.ranges.size() / 2));
        c.ranges.insert(c.ranges.end(), {0, 1 << 30});  // poison
        c.column_begin.push_back(int32_t(c.columns.size()));
        c.columns.insert(c.columns.end(), cols.begin(), cols.end());
        c.column_end.push_back(int32_t(c.columns.size()));
        int32_t poison = 0;
        while (poison < q1 && (std::count(cols.begin(), cols.end(), poison) != 0 ||
                               std::any_of(r.begin(), r.end(), [&](const auto& x) { return x.first <= poison && poison < x.second; })))
          ++poison;
        c.columns.push_back(poison);
      }
      blocks += head.n_blocks;
    }
    c.sparse_heads.push_back(head);
  }
}

}  // namespace attention_case_detail

inline AttentionCase make_attention_case(const AttentionSpec& s) {
  using namespace attention_case_detail;
  AttentionCase c;
  c.spec = s;
  std::mt19937_64 rng(s.seed);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int64_t hd = s.head_dim;
  for (int32_t g = 0; g < s.n_kv_heads; ++g) c.n_cached.push_back(s.n_cached + g * s.cached_step);
  c.max_stored = *std::max_element(c.n_cached.begin(), c.n_cached.end()) + s.n_rows;
  c.table_stride = (c.max_stored + s.page_size - 1) / s.page_size;

  // Physical pages: every head's logical pages, shuffled, plus two unused ones.
  int32_t n_phys = 2;
  for (int32_t g = 0; g < s.n_kv_heads; ++g) n_phys += (c.n_cached[size_t(g)] + s.n_rows + s.page_size - 1) / s.page_size;
  std::vector<int32_t> phys(static_cast<size_t>(n_phys));
  std::iota(phys.begin(), phys.end(), 0);
  std::shuffle(phys.begin(), phys.end(), rng);
  const int64_t page_elems = 2 * int64_t(s.page_size) * hd;
  const int64_t chunk_words = (c.pages_per_chunk * page_elems * kernels::dtype_bytes(s.dtype) + 3) / 4;
  for (int32_t i = 0; i < (n_phys + c.pages_per_chunk - 1) / c.pages_per_chunk; ++i) {
    c.chunks.emplace_back(size_t(chunk_words));
    for (int64_t e = 0; e < c.pages_per_chunk * page_elems; ++e)
      store(s.dtype, c.chunks.back(), e, std::numeric_limits<float>::quiet_NaN());
  }
  for (auto& chunk : c.chunks) c.chunk_base.push_back(chunk.data());

  c.table.assign(size_t(s.n_kv_heads) * size_t(c.table_stride), -1);
  c.k.assign(size_t(s.n_kv_heads) * size_t(c.max_stored) * size_t(hd), 0.0f);
  c.v = c.k;
  size_t next_phys = 0;
  for (int32_t g = 0; g < s.n_kv_heads; ++g) {
    const int32_t stored = c.n_cached[size_t(g)] + s.n_rows;
    for (int32_t t = 0; t < stored; ++t) {
      if (t % s.page_size == 0) c.table[size_t(g * c.table_stride + t / s.page_size)] = phys[next_phys++];
      const int32_t page = c.table[size_t(g * c.table_stride + t / s.page_size)];
      auto& chunk = c.chunks[size_t(page / c.pages_per_chunk)];
      const int64_t k_at = int64_t(page % c.pages_per_chunk) * page_elems + int64_t(t % s.page_size) * hd;
      for (int64_t d = 0; d < hd; ++d) {
        const size_t at = (size_t(g) * size_t(c.max_stored) + size_t(t)) * size_t(hd) + size_t(d);
        c.k[at] = round_to(s.dtype, normal(rng));
        c.v[at] = round_to(s.dtype, normal(rng));
        store(s.dtype, chunk, k_at + d, c.k[at]);
        store(s.dtype, chunk, k_at + int64_t(s.page_size) * hd + d, c.v[at]);
      }
    }
  }
  c.q.resize(size_t(s.n_rows) * size_t(s.n_heads) * size_t(hd));
  for (float& x : c.q) x = 1.5f * normal(rng);  // peakier softmax than unit variance
  c.out.assign(c.q.size(), std::numeric_limits<float>::quiet_NaN());

  fill_selection(c, rng);
  if (s.head_selects) {
    const uint32_t group = s.n_heads / s.n_kv_heads;
    std::uniform_int_distribution<uint32_t> subset(1u, (1u << group) - 1u);
    for (size_t j = 0; j < c.select_index.size(); ++j) c.select_heads.push_back(subset(rng));
  }
  if (s.head_mask) {
    std::bernoulli_distribution on(0.6);
    for (int32_t h = 0; h < s.n_heads; ++h) c.head_active.push_back(h == 0 ? 0 : h == 1 ? 1 : on(rng) ? 1 : 0);
  }
  fill_sparse_plan(c, rng);
  if (s.stats) {
    c.mass_stride = c.max_stored + 3;
    c.key_mass.assign(size_t(s.n_kv_heads) * size_t(c.mass_stride), 0.0f);
  }
  return c;
}

}  // namespace inferlab::test
