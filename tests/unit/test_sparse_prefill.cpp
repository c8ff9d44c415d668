// Sparse prefill (PrefillPattern kinds beyond explicit blocks): the plan's
// ranges and columns, the estimation kernels against double-precision
// references, and the engine end to end against the naive forward with each
// kind's keys computed from the SDK's definition (estimated from the
// reference's own queries and keys).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <numeric>
#include <random>
#include <set>

#include "cpu/sparse_prefill.h"
#include "engine/engine.h"
#include "engine/plans.h"
#include "inferlab/plugin.h"
#include "naive_reference.h"

namespace inferlab {
namespace test_sparse_prefill {

using Kind = PrefillPattern::Kind;
using Ranges = std::vector<std::pair<int32_t, int32_t>>;

std::vector<int32_t> as_vector(std::span<const int32_t> s) { return {s.begin(), s.end()}; }

TEST(SparsePlan, RangesAreClippedSortedAndMergedAndColumnsInsideThemDropped) {
  SparsePlanBuilder builder(3);
  builder.begin_head(1, 8, 5, 21);  // rows 5..20: blocks 0, 1, 2 (the last partial: rows 16..20)
  Ranges r0 = {{-3, 2}, {4, 9}, {1, 3}};  // block 0 = [0, 8): clip to [0, 2), [1, 3) merge; [4, 9) clips to [4, 8)
  const int32_t c0[] = {2, 3, 5, 7, 9};  // 2 is inside [0, 3); 3 stays; 5, 7 inside [4, 8); 9 >= q1
  builder.add_block(r0, c0);
  Ranges r1 = {{10, 12}, {12, 14}};  // adjacent: merged into [10, 14)
  builder.add_block(r1, {});
  Ranges r2 = {{18, 30}};  // block 2's rows end at 20: [18, 21)
  const int32_t c2[] = {0, 17};
  builder.add_block(r2, c2);
  const SparsePlan plan = builder.finish();
  ASSERT_TRUE(plan.active());
  EXPECT_FALSE(plan.sparse(0));
  EXPECT_TRUE(plan.sparse(1));
  EXPECT_EQ(plan.heads[1].first_block, 0);
  EXPECT_EQ(plan.heads[1].n_blocks, 3);
  EXPECT_EQ(as_vector(plan.block_ranges(1, 0)), (std::vector<int32_t>{0, 3, 4, 8}));
  EXPECT_EQ(as_vector(plan.block_columns(1, 0)), (std::vector<int32_t>{3}));
  EXPECT_EQ(as_vector(plan.block_ranges(1, 1)), (std::vector<int32_t>{10, 14}));
  EXPECT_EQ(as_vector(plan.block_ranges(1, 2)), (std::vector<int32_t>{18, 21}));
  EXPECT_EQ(as_vector(plan.block_columns(1, 2)), (std::vector<int32_t>{0, 17}));
  EXPECT_TRUE(plan.block_ranges(1, 3).empty());

  // The counts against the definition: row t reads the listed keys <= t.
  int64_t read = 0, causal = 0;
  for (int32_t t = 5; t < 21; ++t) {
    const int32_t qb = t / 8;
    const auto r = plan.block_ranges(1, qb);
    for (size_t i = 0; i < r.size(); i += 2) read += std::max(0, std::min(t + 1, r[i + 1]) - r[i]);
    for (int32_t c : plan.block_columns(1, qb)) read += c <= t;
    causal += t + 1;
  }
  EXPECT_EQ(plan.keys_read, read);
  EXPECT_EQ(plan.keys_causal, causal);
}

TEST(SparsePlan, SlashesBecomeBlockWideRangesAlongTheDiagonal) {
  Ranges ranges;
  const int32_t diagonals[] = {0, 3, 40};
  slash_ranges(diagonals, 64, 128, ranges);
  EXPECT_EQ(ranges, (Ranges{{64, 128}, {61, 125}, {24, 88}}));
  PrefillPattern a;
  a.kind = Kind::AShape;
  a.block_size = 16;
  a.sink = 4;
  a.local = 10;
  ranges.clear();
  pattern_block_ranges(a, 3, ranges);
  EXPECT_EQ(ranges, (Ranges{{0, 4}, {38, 64}}));
}

TEST(SparseEstimation, TopKKeepsTheBestWithTiesToTheLowerIndexAndNanLowest) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  const float s[] = {1.0f, nan, 3.0f, 3.0f, inf, 0.5f, 3.0f};
  std::vector<int32_t> out;
  kernels::cpu::top_k_ascending(s, 7, 3, out);
  EXPECT_EQ(out, (std::vector<int32_t>{2, 3, 4}));
  kernels::cpu::top_k_ascending(s, 7, 6, out);
  EXPECT_EQ(out, (std::vector<int32_t>{0, 2, 3, 4, 5, 6}));
  kernels::cpu::top_k_ascending(s, 7, 9, out);
  EXPECT_EQ(out.size(), 7u);
  kernels::cpu::top_k_ascending(s, 7, 0, out);
  EXPECT_TRUE(out.empty());
}

TEST(SparseEstimation, VerticalAndSlashScoresMatchTheDoubleReference) {
  const int64_t hd = 16, n_keys = 37, rows = 6;
  std::mt19937 rng(5);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<float> k(size_t(n_keys * hd)), v(k.size()), q(size_t(rows * hd));
  for (auto* a : {&k, &v, &q})
    for (float& x : *a) x = normal(rng);
  // Pages of 5 keys, the last partial.
  std::vector<kernels::cpu::KvPageRef> pages;
  for (int64_t t = 0; t < n_keys; t += 5)
    pages.push_back({&k[size_t(t * hd)], &v[size_t(t * hd)], int32_t(std::min<int64_t>(5, n_keys - t))});
  const int32_t self[] = {31, 32, 33, 34, 35, 36};
  std::vector<float> vertical(size_t(n_keys), 0.0f), slash(size_t(n_keys), 0.0f), scratch;
  const float scale = 0.25f;
  kernels::cpu::vertical_slash_scores(q.data(), rows, hd, self, pages.data(), int64_t(pages.size()), hd, scale,
                                      vertical.data(), slash.data(), scratch);
  std::vector<double> want_v(size_t(n_keys), 0.0), want_s(size_t(n_keys), 0.0);
  for (int64_t i = 0; i < rows; ++i) {
    std::vector<double> p(size_t(self[i] + 1));
    for (int32_t j = 0; j <= self[i]; ++j) {
      double dot = 0;
      for (int64_t d = 0; d < hd; ++d) dot += double(q[size_t(i * hd + d)]) * k[size_t(j * hd + d)];
      p[size_t(j)] = dot * scale;
    }
    const double m = *std::max_element(p.begin(), p.end());
    double sum = 0;
    for (double& x : p) sum += (x = std::exp(x - m));
    for (int32_t j = 0; j <= self[i]; ++j) {
      want_v[size_t(j)] += p[size_t(j)] / sum;
      want_s[size_t(self[i] - j)] += p[size_t(j)] / sum;
    }
  }
  for (int64_t j = 0; j < n_keys; ++j) {
    EXPECT_NEAR(vertical[size_t(j)], want_v[size_t(j)], 1e-5) << "column " << j;
    EXPECT_NEAR(slash[size_t(j)], want_s[size_t(j)], 1e-5) << "diagonal " << j;
  }
}

TEST(SparseEstimation, MeanPoolingOfKeysAndOfTheCallsRows) {
  const int64_t hd = 2;
  std::vector<float> k = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};  // 5 keys
  const kernels::cpu::KvPageRef pages[] = {{k.data(), k.data(), 3}, {k.data() + 6, k.data() + 6, 2}};
  std::vector<float> out(3 * hd);
  kernels::cpu::mean_pool_keys(pages, 2, 5, hd, 2, out.data());
  EXPECT_EQ(out, (std::vector<float>{2, 3, 6, 7, 9, 10}));
  // Rows at positions 3..7 in blocks of 4: block 0 holds row 3 only, block 1 rows 4..7.
  std::vector<float> q = {1, 1, 2, 2, 4, 4, 6, 6, 8, 8};
  std::vector<float> pooled(2 * hd);
  kernels::cpu::mean_pool_rows(q.data(), 5, hd, 3, hd, 4, pooled.data());
  EXPECT_EQ(pooled, (std::vector<float>{1, 1, 5, 5}));
}

// --- end to end --------------------------------------------------------------

// Gives every query head `base` with a per-head twist (budgets vary by head),
// and leaves `dense_head` dense.
class PatternMethod final : public Method {
 public:
  PatternMethod(PrefillPattern base, int32_t dense_head, bool twist = true)
      : base_(std::move(base)), dense_head_(dense_head), twist_(twist) {}
  bool prefill_pattern(const StepInfo&, int32_t layer, int32_t head, PrefillPattern& p) override {
    if (head == dense_head_) return false;
    p = twist_ ? pattern_of(base_, layer, head) : base_;
    return true;
  }
  // With kHookAttentionFeedback: the key mass of each call, per (layer, kv head).
  void on_attention(const StepInfo&, const KvView&, const AttentionStats& stats) override {
    mass[{stats.layer, stats.kv_head}].emplace_back(stats.key_mass.begin(), stats.key_mass.end());
  }
  std::map<std::pair<int32_t, int32_t>, std::vector<std::vector<float>>> mass;
  static PrefillPattern pattern_of(const PrefillPattern& base, int32_t layer, int32_t head) {
    PrefillPattern p = base;
    const int32_t twist = (layer + head) % 3;
    p.verticals = std::max(0, p.verticals - twist);
    p.slashes = std::max(0, p.slashes + twist);
    p.top_k = std::max(1, p.top_k - twist % 2);
    p.local += twist;
    return p;
  }

 private:
  PrefillPattern base_;
  int32_t dense_head_;
  bool twist_;
};

// The keys row t of (layer, head) may read under `p`, for a call holding rows
// [begin, end), from the reference's queries and keys (after RoPE), per the
// SDK's definition of each kind.
class ReferencePatterns {
 public:
  ReferencePatterns(const ModelConfig& c, PrefillPattern base, int32_t dense_head, std::vector<int64_t> calls)
      : c_(c), base_(std::move(base)), dense_head_(dense_head), calls_(std::move(calls)) {}

  void estimate(int32_t l, const std::vector<std::vector<double>>& q, const std::vector<std::vector<double>>& k) {
    const int64_t hd = c_.head_dim;
    for (int32_t h = 0; h < c_.n_heads; ++h) {
      if (h == dense_head_) continue;
      const PrefillPattern p = PatternMethod::pattern_of(base_, l, h);
      const int64_t g = h / c_.group_size();
      for (size_t call = 0; call + 1 < calls_.size(); ++call) {
        const int64_t begin = calls_[call], end = calls_[call + 1];
        auto dot = [&](const std::vector<double>& a, int64_t ao, const std::vector<double>& b, int64_t bo) {
          double s = 0;
          for (int64_t d = 0; d < hd; ++d) s += a[size_t(ao + d)] * b[size_t(bo + d)];
          return s;
        };
        auto& allowed = allowed_[{l, h, int32_t(call)}];
        allowed.clear();
        if (p.kind == Kind::VerticalSlash) {
          std::vector<double> vertical(size_t(end), 0.0), slash(size_t(end), 0.0);
          for (int64_t t = std::max(begin, end - p.last_q); t < end; ++t) {
            std::vector<double> s(size_t(t + 1));
            for (int64_t j = 0; j <= t; ++j) s[size_t(j)] = dot(q[size_t(t)], h * hd, k[size_t(j)], g * hd) / std::sqrt(double(hd));
            const double m = *std::max_element(s.begin(), s.end());
            double sum = 0;
            for (double& x : s) sum += (x = std::exp(x - m));
            for (int64_t j = 0; j <= t; ++j) {
              vertical[size_t(j)] += s[size_t(j)] / sum;
              slash[size_t(t - j)] += s[size_t(j)] / sum;
            }
          }
          const double inf = std::numeric_limits<double>::infinity();
          for (int64_t j = 0; j < std::min<int64_t>(p.keep_first_columns, end); ++j) vertical[size_t(j)] = inf;
          for (int64_t d = 0; d < std::min<int64_t>(p.keep_last_diagonals, end); ++d) slash[size_t(d)] = inf;
          const auto columns = best(vertical, p.verticals), diagonals = best(slash, p.slashes);
          for (int64_t t = begin; t < end; ++t) {
            const int64_t q0 = t / p.block_size * p.block_size, q1 = q0 + p.block_size;
            for (int64_t j = 0; j <= t; ++j) {
              bool ok = columns.count(j) > 0;
              for (int64_t d : diagonals) ok = ok || (j >= q0 - d && j < q1 - d);
              if (ok) allowed.insert({t, j});
            }
          }
        } else if (p.kind == Kind::BlockTopK) {
          const int64_t bs = p.block_size;
          auto pooled = [&](const std::vector<std::vector<double>>& rows, int64_t off, int64_t lo, int64_t hi) {
            std::vector<double> m(size_t(hd), 0.0);
            for (int64_t t = lo; t < hi; ++t)
              for (int64_t d = 0; d < hd; ++d) m[size_t(d)] += rows[size_t(t)][size_t(off + d)] / double(hi - lo);
            return m;
          };
          for (int64_t qb = begin / bs; qb * bs < end; ++qb) {
            const auto pq = pooled(q, h * hd, std::max(begin, qb * bs), std::min(end, qb * bs + bs));
            std::vector<double> scores;
            for (int64_t kb = 0; kb <= qb; ++kb)
              scores.push_back(dot(pq, 0, pooled(k, g * hd, kb * bs, std::min(end, kb * bs + bs)), 0));
            const auto chosen = best(scores, p.top_k);
            for (int64_t t = std::max(begin, qb * bs); t < std::min(end, qb * bs + bs); ++t)
              for (int64_t j = 0; j <= t; ++j)
                if (chosen.count(j / bs)) allowed.insert({t, j});
          }
        } else if (p.kind == Kind::AShape) {
          for (int64_t t = begin; t < end; ++t)
            for (int64_t j = 0; j <= t; ++j)
              if (j < p.sink || j >= t / p.block_size * p.block_size - p.local) allowed.insert({t, j});
        }
      }
    }
  }

  bool visible(int32_t l, int32_t h, int64_t t, int64_t j) const {
    if (h == dense_head_) return true;
    const int32_t call = int32_t(std::upper_bound(calls_.begin(), calls_.end(), t) - calls_.begin()) - 1;
    return allowed_.at({l, h, call}).count({t, j}) > 0;
  }
  int64_t keys_read() const {
    int64_t n = 0;
    for (const auto& [key, set] : allowed_) n += int64_t(set.size());
    return n;
  }

 private:
  // The k best scores' indices (ties to the lower index).
  static std::set<int64_t> best(const std::vector<double>& s, int64_t k) {
    std::vector<int64_t> order(s.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return s[size_t(a)] > s[size_t(b)]; });
    order.resize(size_t(std::min<int64_t>(k, int64_t(order.size()))));
    return {order.begin(), order.end()};
  }

  const ModelConfig& c_;
  PrefillPattern base_;
  int32_t dense_head_;
  std::vector<int64_t> calls_;
  std::map<std::tuple<int32_t, int32_t, int32_t>, std::set<std::pair<int64_t, int64_t>>> allowed_;
};

struct EndToEndCase {
  const char* name;
  PrefillPattern pattern;
  std::vector<int64_t> calls;  // prefill call boundaries
  friend void PrintTo(const EndToEndCase& c, std::ostream* os) { *os << c.name; }
};

PrefillPattern make(Kind kind, int32_t bs) {
  PrefillPattern p;
  p.kind = kind;
  p.block_size = bs;
  return p;
}

std::vector<EndToEndCase> end_to_end_cases() {
  std::vector<EndToEndCase> out;
  PrefillPattern vs = make(Kind::VerticalSlash, 8);
  vs.verticals = 6;
  vs.slashes = 3;
  vs.last_q = 5;
  vs.keep_first_columns = 2;
  vs.keep_last_diagonals = 1;
  out.push_back({"vertical_slash", vs, {0, 45}});
  out.push_back({"vertical_slash_two_calls", vs, {0, 21, 45}});  // block 2 spans both calls
  PrefillPattern bt = make(Kind::BlockTopK, 4);
  bt.top_k = 3;
  out.push_back({"block_top_k", bt, {0, 45}});
  out.push_back({"block_top_k_two_calls", bt, {0, 18, 45}});
  PrefillPattern a = make(Kind::AShape, 8);
  a.sink = 3;
  a.local = 5;
  out.push_back({"a_shape", a, {0, 45}});
  return out;
}

class SparsePrefillEndToEnd : public testing::TestWithParam<EndToEndCase> {};

TEST_P(SparsePrefillEndToEnd, MatchesTheNaiveForwardWithTheDefinitionsKeys) {
  const EndToEndCase& tc = GetParam();
  auto model = test::gqa_test_model("sparse-prefill", 3);
  ASSERT_TRUE(model);
  const ModelConfig& c = model->config();
  const int32_t dense_head = 2;
  const auto tokens = test::random_tokens(c.n_vocab, int(tc.calls.back()), 17);
  ReferencePatterns ref(c, tc.pattern, dense_head, tc.calls);
  test::NaivePolicy policy;
  policy.on_queries_keys = [&](int32_t l, const auto& q, const auto& k) { ref.estimate(l, q, k); };
  policy.key_visible = [&](int32_t l, int32_t h, int64_t t, int64_t j) { return ref.visible(l, h, t, j); };
  // The reference's key mass per (layer, kv head), per call, per key position.
  std::map<std::pair<int32_t, int32_t>, std::vector<std::vector<double>>> want_mass;
  policy.on_probability = [&](int32_t l, int32_t h, int64_t t, int64_t j, double p) {
    auto& calls = want_mass[{l, h / c.group_size()}];
    calls.resize(tc.calls.size() - 1);
    const size_t call = size_t(std::upper_bound(tc.calls.begin(), tc.calls.end(), t) - tc.calls.begin()) - 1;
    calls[call].resize(size_t(tc.calls[call + 1]), 0.0);
    calls[call][size_t(j)] += p;
  };
  const auto want = test::naive_forward(*model, tokens, policy);

  // Without statistics (the tiled kernel), then with them (the exact kernel
  // and each key's probability).
  for (const bool statistics : {false, true}) {
    SCOPED_TRACE(statistics ? "with statistics" : "without statistics");
    auto engine = Engine::create(model, EngineOptions{.page_size = 4});
    ASSERT_TRUE(engine.ok());
    PatternMethod method(tc.pattern, dense_head);
    ASSERT_TRUE(
        (*engine)->set_method(&method, kHookPrefillPattern | (statistics ? kHookAttentionFeedback : 0u)).ok());
    auto seq = (*engine)->new_sequence();
    std::vector<float> logits;
    for (size_t call = 0; call + 1 < tc.calls.size(); ++call) {
      const auto part =
          std::span(tokens).subspan(size_t(tc.calls[call]), size_t(tc.calls[call + 1] - tc.calls[call]));
      ASSERT_TRUE((*engine)->forward(*seq, part, 0, [&](int64_t, std::span<const float> row) {
        logits.insert(logits.end(), row.begin(), row.end());
      }).ok());
    }
    ASSERT_EQ(logits.size(), want.size());
    double worst = 0;
    for (size_t i = 0; i < want.size(); ++i) worst = std::max(worst, std::abs(double(logits[i]) - want[i]));
    EXPECT_LT(worst, 2e-3);
    const auto& counters = (*engine)->counters();
    EXPECT_EQ(counters.sparse_prefill_heads, int64_t(c.n_layers) * (c.n_heads - 1) * int64_t(tc.calls.size() - 1));
    EXPECT_EQ(counters.sparse_prefill_keys_read, ref.keys_read());
    EXPECT_LT(counters.sparse_prefill_keys_read, counters.sparse_prefill_keys_causal);
    if (!statistics) continue;
    ASSERT_EQ(method.mass.size(), size_t(c.n_layers * c.n_kv_heads));
    for (const auto& [key, calls] : method.mass) {
      const auto& ref_calls = want_mass.at(key);
      ASSERT_EQ(calls.size(), ref_calls.size());
      for (size_t call = 0; call < calls.size(); ++call) {
        ASSERT_EQ(calls[call].size(), ref_calls[call].size());
        for (size_t j = 0; j < calls[call].size(); ++j)
          ASSERT_NEAR(calls[call][j], ref_calls[call][j], 2e-5 + 1e-4 * ref_calls[call][j])
              << "layer " << key.first << ", kv head " << key.second << ", call " << call << ", key " << j;
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Kinds, SparsePrefillEndToEnd, testing::ValuesIn(end_to_end_cases()),
                         [](const auto& info) { return std::string(info.param.name); });

// Budgets that cover every key give the dense model's logits.
TEST(SparsePrefill, BudgetsCoveringEveryKeyAreDense) {
  auto model = test::gqa_test_model("sparse-prefill", 3);
  ASSERT_TRUE(model);
  const auto tokens = test::random_tokens(model->config().n_vocab, 70, 23);
  auto run = [&](Method* method) {
    auto engine = Engine::create(model, EngineOptions{.page_size = 4});
    EXPECT_TRUE(engine.ok());
    if (method != nullptr) {
      EXPECT_TRUE((*engine)->set_method(method, kHookPrefillPattern).ok());
    }
    auto seq = (*engine)->new_sequence();
    std::vector<float> out;
    EXPECT_TRUE((*engine)->forward(*seq, tokens, 0, [&](int64_t, std::span<const float> row) {
      out.insert(out.end(), row.begin(), row.end());
    }).ok());
    EXPECT_EQ((*engine)->counters().sparse_prefill_keys_read, (*engine)->counters().sparse_prefill_keys_causal);
    return out;
  };
  const auto dense = run(nullptr);
  PrefillPattern vs = make(Kind::VerticalSlash, 16);
  vs.verticals = 70;
  vs.slashes = 70;
  PrefillPattern bt = make(Kind::BlockTopK, 16);
  bt.top_k = 6;  // 5 blocks; the per-head twist takes one off some heads
  PrefillPattern a = make(Kind::AShape, 16);
  a.sink = 1;
  a.local = 70;
  PrefillPattern only_diagonals = make(Kind::VerticalSlash, 8);  // every diagonal, no column
  only_diagonals.keep_first_columns = 0;
  only_diagonals.keep_last_diagonals = 0;
  only_diagonals.slashes = 70;
  for (const PrefillPattern& p : {vs, bt, a, only_diagonals}) {
    PatternMethod method(p, -1);
    const auto sparse = run(&method);
    ASSERT_EQ(sparse.size(), dense.size());
    for (size_t i = 0; i < dense.size(); ++i) ASSERT_NEAR(sparse[i], dense[i], 1e-4) << "kind " << int(p.kind);
  }
}

TEST(SparsePrefill, BadPatternsAreRefusedWithTheirLayerAndHead) {
  auto model = test::gqa_test_model("sparse-prefill", 3);
  ASSERT_TRUE(model);
  const auto tokens = test::random_tokens(model->config().n_vocab, 20, 3);
  PrefillPattern negative = make(Kind::VerticalSlash, 8);
  negative.verticals = -1;
  PrefillPattern no_rows = make(Kind::VerticalSlash, 8);
  no_rows.last_q = 0;
  PrefillPattern bad_top = make(Kind::BlockTopK, 8);
  bad_top.top_k = -2;
  PrefillPattern bad_shape = make(Kind::AShape, 8);
  bad_shape.local = -1;
  PrefillPattern bad_kind = make(Kind(9), 8);
  for (const PrefillPattern& p : {negative, no_rows, bad_top, bad_shape, bad_kind}) {
    PatternMethod method(p, -1, false);
    auto engine = Engine::create(model, EngineOptions{.page_size = 4});
    ASSERT_TRUE(engine.ok());
    ASSERT_TRUE((*engine)->set_method(&method, kHookPrefillPattern).ok());
    auto seq = (*engine)->new_sequence();
    const Status s = (*engine)->forward(*seq, tokens, 0, nullptr);
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.message().find("prefill pattern of (layer 0, head 0)"), std::string::npos) << s.message();
  }
}

}  // namespace test_sparse_prefill
}  // namespace inferlab
