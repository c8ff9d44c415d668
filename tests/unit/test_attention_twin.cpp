// The CPU attention twin (the reference of the CUDA attention kernels) against
// a naive dense computation written from kernel_types.h: for each query row, a
// visibility predicate over every stored token, a full score vector and a
// double-precision softmax.
#include <gtest/gtest.h>

#include <set>

#include "attention_case.h"
#include "cpu/attention_twin.h"

namespace inferlab::test {
namespace test_attention_twin {

using kernels::DType;
using kernels::KeySelect;
using Select = AttentionSpec::Select;

// Whether row `self` of query head h (kv head g) may read stored token t.
struct Visibility {
  const AttentionCase& c;
  int32_t h, g;
  std::set<int32_t> listed;                   // Pages: logical pages; Tokens: tokens
  std::set<std::pair<int32_t, int32_t>> allowed;  // sparse: (query block, stored token)
  KeySelect mode = KeySelect::All;
  bool sparse = false;

  Visibility(const AttentionCase& c_, int32_t h_) : c(c_), h(h_), g(h_ / (c_.spec.n_heads / c_.spec.n_kv_heads)) {
    if (!c.select.empty()) {
      mode = KeySelect(c.select[size_t(g)]);
      const int32_t bit = h % (c.spec.n_heads / c.spec.n_kv_heads);
      for (int32_t j = c.select_indptr[size_t(g)]; j < c.select_indptr[size_t(g) + 1]; ++j)
        if (c.select_heads.empty() || ((c.select_heads[size_t(j)] >> bit) & 1u) != 0)  // this head's entries
          listed.insert(c.select_index[size_t(j)]);
    }
    sparse = !c.sparse_heads.empty() && c.sparse_heads[size_t(h)].block_size > 0;
    if (sparse) {
      const kernels::SparseHead& head = c.sparse_heads[size_t(h)];
      for (int32_t i = 0; i < head.n_blocks; ++i) {
        const int32_t b = head.at + i, qb = head.first_block + i;
        for (int32_t j = c.range_begin[size_t(b)]; j < c.range_end[size_t(b)]; ++j)
          for (int32_t t = c.ranges[size_t(2 * j)]; t < c.ranges[size_t(2 * j + 1)]; ++t) allowed.insert({qb, t});
        for (int32_t j = c.column_begin[size_t(b)]; j < c.column_end[size_t(b)]; ++j) allowed.insert({qb, c.columns[size_t(j)]});
      }
    }
  }

  bool operator()(int32_t self, int32_t t) const {
    const int32_t cached = c.n_cached[size_t(g)], bs = c.spec.block_size;
    if (t > self) return false;
    if (sparse) return allowed.count({self / bs, t}) != 0;
    if (t >= cached) return true;
    if (mode == KeySelect::Pages) return listed.count(t / c.spec.page_size) != 0;
    if (mode == KeySelect::Tokens) return listed.count(t) != 0;
    return true;
  }
};

struct NaiveResult {
  std::vector<float> out, key_mass;
};

NaiveResult naive_attention(const AttentionCase& c) {
  const AttentionSpec& s = c.spec;
  const int64_t hd = s.head_dim;
  NaiveResult r{std::vector<float>(c.q.size(), 0.0f), std::vector<float>(c.key_mass.size(), 0.0f)};
  for (int32_t h = 0; h < s.n_heads; ++h) {
    if (!c.head_active.empty() && c.head_active[size_t(h)] == 0) continue;
    const Visibility visible(c, h);
    const int32_t g = visible.g, cached = c.n_cached[size_t(g)];
    for (int32_t i = 0; i < s.n_rows; ++i) {
      const float* q = &c.q[size_t((int64_t(i) * s.n_heads + h) * hd)];
      std::vector<double> p(size_t(cached + s.n_rows), 0.0);
      double max_s = -1e300, sum = 0;
      for (int32_t t = 0; t < cached + s.n_rows; ++t) {
        if (!visible(cached + i, t)) continue;
        double dot = 0;
        for (int64_t d = 0; d < hd; ++d) dot += double(q[d]) * c.k[size_t((int64_t(g) * c.max_stored + t) * hd + d)];
        p[size_t(t)] = dot / std::sqrt(double(hd));
        max_s = std::max(max_s, p[size_t(t)]);
      }
      for (int32_t t = 0; t < cached + s.n_rows; ++t)
        if (visible(cached + i, t)) sum += (p[size_t(t)] = std::exp(p[size_t(t)] - max_s));
      for (int32_t t = 0; t < cached + s.n_rows && sum > 0; ++t) {
        if (!visible(cached + i, t)) continue;
        const double w = p[size_t(t)] / sum;
        for (int64_t d = 0; d < hd; ++d)
          r.out[size_t((int64_t(i) * s.n_heads + h) * hd + d)] += float(w * c.v[size_t((int64_t(g) * c.max_stored + t) * hd + d)]);
        if (!r.key_mass.empty()) r.key_mass[size_t(g * c.mass_stride + t)] += float(w);
      }
    }
  }
  return r;
}

double max_abs_diff(const std::vector<float>& a, const std::vector<float>& b) {
  double m = a.size() == b.size() ? 0.0 : 1e30;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::abs(double(a[i]) - double(b[i])));
  return m;
}

// Rows with at least one visible key, summed over active heads: each adds 1 to the mass.
double expected_total_mass(const AttentionCase& c) {
  double total = 0;
  for (int32_t h = 0; h < c.spec.n_heads; ++h) {
    if (!c.head_active.empty() && c.head_active[size_t(h)] == 0) continue;
    const Visibility visible(c, h);
    const int32_t cached = c.n_cached[size_t(visible.g)];
    for (int32_t i = 0; i < c.spec.n_rows; ++i)
      for (int32_t t = 0; t <= cached + i; ++t)
        if (visible(cached + i, t)) {
          total += 1;
          break;
        }
  }
  return total;
}

void check_twin(const AttentionSpec& spec) {
  AttentionCase c = make_attention_case(spec);
  kernels::cpu::attention_twin(c.call());
  const NaiveResult ref = naive_attention(c);
  ASSERT_LT(max_abs_diff(c.out, ref.out), 1e-5) << spec.name();
  if (!spec.stats) return;
  // Float sums over many rows: relative to the largest mass.
  double largest = 1.0;
  for (float m : ref.key_mass) largest = std::max(largest, double(m));
  ASSERT_LT(max_abs_diff(c.key_mass, ref.key_mass), 1e-5 * largest) << spec.name();
  double total = 0;
  for (float m : c.key_mass) total += m;
  EXPECT_NEAR(total, expected_total_mass(c), 1e-4) << spec.name();
}

std::vector<AttentionSpec> twin_specs() {
  std::vector<AttentionSpec> specs;
  const std::pair<int32_t, int32_t> ratios[] = {{2, 2}, {6, 2}, {8, 2}};  // GQA 1, 3, 4
  const DType dtypes[] = {DType::F32, DType::F16, DType::BF16};
  uint64_t seed = 1;
  for (auto [heads, kv] : ratios)
    for (int32_t ps : {1, 16, 5})
      for (Select sel : {Select::None, Select::Pages, Select::Tokens, Select::Mixed})
        for (int32_t rows : {1, 9}) {
          AttentionSpec s;
          s.n_heads = heads;
          s.n_kv_heads = kv;
          s.page_size = ps;
          s.select = sel;
          s.n_rows = rows;
          s.n_cached = 37;
          s.cached_step = 6;
          s.dtype = dtypes[seed % 3];
          s.head_mask = seed % 3 == 0;
          s.stats = seed % 2 == 0;
          s.seed = seed++;
          specs.push_back(s);
        }
  return specs;
}

// Each query head reads its own part of the kv head's selection (select_heads).
std::vector<AttentionSpec> head_select_specs() {
  std::vector<AttentionSpec> specs;
  uint64_t seed = 50;
  for (auto [heads, kv] : {std::pair{6, 2}, std::pair{8, 2}, std::pair{2, 2}})
    for (Select sel : {Select::Pages, Select::Tokens, Select::Mixed})
      for (int32_t rows : {1, 9}) {
        AttentionSpec s;
        s.n_heads = heads;
        s.n_kv_heads = kv;
        s.page_size = 5;
        s.select = sel;
        s.head_selects = true;
        s.n_rows = rows;
        s.n_cached = 37;
        s.cached_step = 6;
        s.dtype = seed % 2 == 0 ? DType::F16 : DType::F32;
        s.head_mask = seed % 3 == 0;
        s.stats = seed % 2 == 1;
        s.seed = seed++;
        specs.push_back(s);
      }
  return specs;
}

std::vector<AttentionSpec> sparse_specs() {
  std::vector<AttentionSpec> specs;
  uint64_t seed = 100;
  for (int32_t bs : {1, 4, 16, 64})
    for (auto [rows, cached] : {std::pair{40, 0}, std::pair{23, 19}, std::pair{150, 37}}) {
      AttentionSpec s;
      s.n_heads = 4;
      s.n_kv_heads = 2;
      s.n_rows = rows;
      s.n_cached = cached;
      s.page_size = 5;
      s.block_sparse = true;
      s.block_size = bs;
      s.stats = true;
      s.head_mask = seed % 2 == 1;
      s.dtype = seed % 2 == 0 ? DType::F16 : DType::F32;
      s.seed = seed++;
      specs.push_back(s);
    }
  return specs;
}

class AttentionTwin : public testing::TestWithParam<AttentionSpec> {};

TEST_P(AttentionTwin, MatchesNaiveDense) { check_twin(GetParam()); }

INSTANTIATE_TEST_SUITE_P(HeadSelects, AttentionTwin, testing::ValuesIn(head_select_specs()),
                         [](const auto& info) { return info.param.name(); });
INSTANTIATE_TEST_SUITE_P(Dense, AttentionTwin, testing::ValuesIn(twin_specs()),
                         [](const auto& info) { return info.param.name(); });
INSTANTIATE_TEST_SUITE_P(Sparse, AttentionTwin, testing::ValuesIn(sparse_specs()),
                         [](const auto& info) { return info.param.name(); });

TEST(AttentionTwinCases, NoCachedTokensPrefill) {
  AttentionSpec s;
  s.n_heads = 9;
  s.n_kv_heads = 3;
  s.head_dim = 64;
  s.n_rows = 50;
  s.stats = true;
  check_twin(s);
}

TEST(AttentionTwinCases, EmptySparseRowsOutputZeros) {
  AttentionSpec s;
  s.n_rows = 12;
  s.block_sparse = true;
  s.block_size = 4;
  AttentionCase c = make_attention_case(s);
  kernels::cpu::attention_twin(c.call());
  // Query block 0 of head 0 lists nothing: rows 0..3 are zeros, others not.
  for (int32_t i = 0; i < 4; ++i)
    for (int32_t d = 0; d < s.head_dim; ++d) EXPECT_EQ(c.out[size_t(i * s.head_dim + d)], 0.0f);
  for (float x : c.out) EXPECT_FALSE(std::isnan(x));
}

TEST(AttentionTwinCases, MaskedHeadOutputsZerosAndNoMass) {
  AttentionSpec s;
  s.n_heads = 2;
  s.n_kv_heads = 2;
  s.n_rows = 3;
  s.n_cached = 10;
  s.head_mask = true;  // head 0 off, head 1 on
  s.stats = true;
  AttentionCase c = make_attention_case(s);
  kernels::cpu::attention_twin(c.call());
  for (int32_t i = 0; i < s.n_rows; ++i)
    for (int32_t d = 0; d < s.head_dim; ++d) EXPECT_EQ(c.out[size_t(i * 2 * s.head_dim + d)], 0.0f);
  for (int32_t t = 0; t < c.mass_stride; ++t) EXPECT_EQ(c.key_mass[size_t(t)], 0.0f);
  double head1 = 0;
  for (int32_t t = 0; t < c.mass_stride; ++t) head1 += c.key_mass[size_t(c.mass_stride + t)];
  EXPECT_NEAR(head1, s.n_rows, 1e-5);
}

TEST(AttentionTwinCases, PagesSelectionSkipsSlotsOfNewTokens) {
  AttentionSpec s;
  s.n_rows = 2;
  s.n_cached = 7;
  s.page_size = 4;  // page 1 holds cached tokens 4..6 and new token 7
  s.select = Select::Pages;
  AttentionCase c = make_attention_case(s);
  const auto tokens = kernels::cpu::selected_cached_tokens(c.call(), 0);
  for (int32_t t : tokens) EXPECT_LT(t, 7);
  EXPECT_TRUE(std::is_sorted(tokens.begin(), tokens.end()));
  EXPECT_TRUE(std::find(tokens.begin(), tokens.end(), 6) != tokens.end());  // the partial page is always listed
  check_twin(s);
}

}  // namespace test_attention_twin
}  // namespace inferlab::test
