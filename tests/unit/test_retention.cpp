// Engine-side retention (kHookRetention): the host reference on crafted
// scores, and the CPU backend's mechanism (scores in a slot plane beside the
// K/V rows, moved with them) against a method that keeps the same scores
// itself through on_attention and evict: identical logits and cache contents.
#include <gtest/gtest.h>

#include <cmath>
#include <fmt/format.h>

#include <algorithm>
#include <limits>

#include "cpu/cpu_twins.h"
#include "plugin_test_support.h"
#include "naive_reference.h"
#include "retention_reference_method.h"

namespace inferlab {
namespace test_retention {

std::vector<int32_t> drops_of(const std::vector<float>& score, RetentionBudget b) {
  std::vector<int32_t> drop;
  kernels::cpu::retention_drops(score.data(), int32_t(score.size()), b.sink, b.recent, b.heavy, drop);
  return drop;
}

TEST(Retention, ReferenceKeepsSinksTheRecentWindowAndTheBestScores) {
  const std::vector<float> s = {0.1f, 5.0f, 0.2f, 3.0f, 0.1f, 0.1f, 0.1f, 0.1f};
  EXPECT_EQ(drops_of(s, {0, 2, 2}), (std::vector<int32_t>{0, 2, 4, 5}));  // keeps 1, 3 (heavy), 6, 7 (recent)
  EXPECT_EQ(drops_of(s, {1, 2, 1}), (std::vector<int32_t>{2, 3, 4, 5}));  // sink 0, heavy 1, recent 6 and 7
  EXPECT_EQ(drops_of(s, {0, 0, 0}), (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
  EXPECT_TRUE(drops_of(s, {0, 2, -1}).empty());   // heavy < 0: keep everything
  EXPECT_TRUE(drops_of(s, {2, 2, 4}).empty());    // the budget covers the head
  // Ties go to the earlier token; a NaN score ranks last.
  const std::vector<float> ties = {1, 1, 1, std::numeric_limits<float>::quiet_NaN(), 1, 0};
  EXPECT_EQ(drops_of(ties, {0, 1, 2}), (std::vector<int32_t>{2, 3, 4}));
  const std::vector<float> inf = {-std::numeric_limits<float>::infinity(), std::numeric_limits<float>::quiet_NaN(), 0};
  EXPECT_EQ(drops_of(inf, {0, 0, 1}), (std::vector<int32_t>{0, 1}));
}

std::shared_ptr<Model> gqa_model() { return test::gqa_test_model("retention", 11); }

struct Traced {
  std::vector<float> logits;
  std::vector<std::vector<int32_t>> positions;  // per (layer, kv head) after the run
  int64_t evicted = 0;
};

// A prompt in chunks (eviction between them), then decode steps.
Traced trace(test::RetentionMethod& method, const std::vector<int32_t>& tokens, int32_t page_size) {
  Traced out;
  auto engine = Engine::create(gqa_model(), EngineOptions{page_size, 0, 0});
  EXPECT_TRUE(engine.ok());
  EXPECT_TRUE((*engine)->set_method(&method, method.hooks()).ok());
  method.begin_sequence((*engine)->shape());
  auto seq = (*engine)->new_sequence();
  auto sink = [&](int64_t, std::span<const float> l) { out.logits.insert(out.logits.end(), l.begin(), l.end()); };
  for (size_t at = 0; at < 40; at += 20)
    EXPECT_TRUE((*engine)->forward(*seq, std::span<const int32_t>(tokens.data() + at, 20), 0, sink).ok());
  for (size_t at = 40; at < tokens.size(); ++at)
    EXPECT_TRUE((*engine)->forward(*seq, std::span<const int32_t>(&tokens[at], 1), 0, sink).ok());
  for (int32_t l = 0; l < 2; ++l)
    for (int32_t g = 0; g < 2; ++g) out.positions.push_back(seq->table(l, g).positions);
  out.evicted = (*engine)->counters().tokens_evicted;
  return out;
}

class RetentionOnCpu : public ::testing::TestWithParam<std::tuple<RetentionBudget, RetentionScore, int32_t>> {};

TEST_P(RetentionOnCpu, MatchesAMethodKeepingTheScoresItself) {
  const auto [budget, score, page_size] = GetParam();
  const auto tokens = test::random_tokens(gqa_model()->config().n_vocab, 64, 5);
  test::RetentionMethod engine_side(true, budget, score), reference(false, budget, score);
  const Traced got = trace(engine_side, tokens, page_size), want = trace(reference, tokens, page_size);
  EXPECT_EQ(got.positions, want.positions);
  EXPECT_GT(got.evicted, 0);
  EXPECT_EQ(got.evicted, want.evicted);
  ASSERT_EQ(got.logits.size(), want.logits.size());
  EXPECT_EQ(got.logits, want.logits);  // the same float sums in the same order: bit for bit
}

INSTANTIATE_TEST_SUITE_P(
    Budgets, RetentionOnCpu,
    ::testing::Values(std::tuple{RetentionBudget{0, 8, 8}, RetentionScore::AccumulatedMass, 4},
                      std::tuple{RetentionBudget{2, 5, 6}, RetentionScore::AccumulatedMass, 7},
                      std::tuple{RetentionBudget{4, 4, 0}, RetentionScore::AccumulatedMass, 16},
                      std::tuple{RetentionBudget{0, 6, 10}, RetentionScore::LastMass, 4},
                      std::tuple{RetentionBudget{1, 0, 12}, RetentionScore::LastMass, 5}),
    [](const auto& info) {
      const RetentionBudget& b = std::get<0>(info.param);
      return fmt::format("sink{}_recent{}_heavy{}_{}_page{}", b.sink, b.recent, b.heavy,
                         std::get<1>(info.param) == RetentionScore::LastMass ? "last" : "accumulated",
                         std::get<2>(info.param));
    });

// A retained sequence copied (as a saved prefill is) keeps its scores: the
// copy then evicts exactly as the original does.
TEST(Retention, ScoresAreCopiedWithTheirPages) {
  const auto tokens = test::random_tokens(gqa_model()->config().n_vocab, 50, 9);
  test::RetentionMethod method(true, RetentionBudget{0, 6, 6});
  auto engine = Engine::create(gqa_model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  ASSERT_TRUE((*engine)->set_method(&method, method.hooks()).ok());
  method.begin_sequence((*engine)->shape());
  auto seq = (*engine)->new_sequence();
  ASSERT_TRUE((*engine)->prefill(*seq, std::vector<int32_t>(tokens.begin(), tokens.begin() + 30)).ok());
  auto copy = seq->clone();
  for (size_t i = 30; i < tokens.size(); ++i) {
    auto a = (*engine)->decode(*seq, tokens[i]);
    auto b = (*engine)->decode(*copy, tokens[i]);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ(*a, *b) << "step " << i;
  }
  EXPECT_EQ(seq->table(1, 1).positions, copy->table(1, 1).positions);
}

// Retention per sequence (SpAtten's cascade): one score per position, the
// same tokens in every kv head of a layer, a token dropped at layer l gone from
// every later layer: before a deeper layer's attention, and, inside a prefill
// call, as a row (no query, FFN or deeper K/V). Against the double-precision
// reference told what each query may read: at layer l, a key stored before the
// call (or one of the call's rows) that layer l held before the call and that
// layer l - 1 still holds after it.
class SequenceRetentionOnCpu
    : public ::testing::TestWithParam<std::tuple<std::vector<RetentionBudget>, RetentionScore, int32_t>> {};

TEST_P(SequenceRetentionOnCpu, QueriesReadWhatTheCascadeLeftThem) {
  const auto& [budgets, score, page_size] = GetParam();
  auto model = gqa_model();
  const ModelConfig& c = model->config();
  const auto tokens = test::random_tokens(c.n_vocab, 48, 7);
  const int32_t prefill = 30;
  test::SequenceRetentionMethod method(budgets, score);
  auto engine = Engine::create(model, EngineOptions{page_size, 0, 0});
  ASSERT_TRUE(engine.ok());
  ASSERT_TRUE((*engine)->set_method(&method, method.hooks()).ok());
  auto seq = (*engine)->new_sequence();
  test::CascadeTrace trace;
  std::vector<float> got;
  std::vector<double> want_rows;
  std::vector<int64_t> rows;  // positions whose logits came back
  ASSERT_TRUE(trace.run(**engine, *seq, tokens, prefill, rows, got).ok());
  for (int32_t l = 0; l < c.n_layers; ++l)  // every kv head holds the same tokens
    for (int32_t g = 1; g < c.n_kv_heads; ++g) EXPECT_EQ(seq->table(l, g).positions, seq->table(l, 0).positions);
  for (const auto& after : trace.after)  // after every call, a deeper layer holds a subset
    for (int32_t l = 1; l < c.n_layers; ++l)
      for (int32_t p : after[size_t(l)]) EXPECT_TRUE(test::CascadeTrace::holds(after[size_t(l - 1)], p)) << l << " " << p;
  const EngineCounters& counters = (*engine)->counters();
  EXPECT_GT(counters.tokens_evicted, 0);
  if (budgets[0].heavy >= 0) {
    EXPECT_GT(counters.rows_pruned, 0) << "the prefill call pruned no row";
  }
  const auto want = test::naive_forward(*model, tokens, trace.policy());
  const size_t v = size_t(c.n_vocab);
  ASSERT_EQ(rows.size(), trace.starts.size());  // the prefill's last row, then every decode step
  for (int64_t p : rows) want_rows.insert(want_rows.end(), want.begin() + long(size_t(p) * v), want.begin() + long(size_t(p + 1) * v));
  EXPECT_LT(test::normalized_max_error(got, want_rows), 1e-4);
}

TEST(SequenceRetention, AllLogitsOfAPrunedCallAreRefusedByRow) {
  auto engine = Engine::create(gqa_model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  test::SequenceRetentionMethod method({{0, 4, 4}, {0, 4, 4}});
  ASSERT_TRUE((*engine)->set_method(&method, method.hooks()).ok());
  auto seq = (*engine)->new_sequence();
  const auto tokens = test::random_tokens(gqa_model()->config().n_vocab, 20, 3);
  const Status s = (*engine)->forward(*seq, tokens, 0, [](int64_t, std::span<const float>) {});
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("retention per sequence pruned row "), std::string::npos) << s.message();
  EXPECT_NE(s.message().find(" of this 20-token call before its logits; score such a method token by token"),
            std::string::npos)
      << s.message();
}

INSTANTIATE_TEST_SUITE_P(
    Budgets, SequenceRetentionOnCpu,
    ::testing::Values(
        std::tuple{std::vector<RetentionBudget>{{2, 4, 10}, {2, 4, 4}}, RetentionScore::AccumulatedMass, 4},
        std::tuple{std::vector<RetentionBudget>{{0, 8, 8}, {0, 8, 8}}, RetentionScore::AccumulatedMass, 7},
        std::tuple{std::vector<RetentionBudget>{{4, 4, -1}, {1, 3, 2}}, RetentionScore::LastMass, 16},
        std::tuple{std::vector<RetentionBudget>{{1, 2, 3}, {0, 1, 2}}, RetentionScore::AccumulatedMass, 4}),
    [](const auto& info) {
      const auto& b = std::get<0>(info.param);
      return fmt::format("layer0_{}_{}_{}_layer1_{}_{}_{}_{}_page{}", b[0].sink, b[0].recent, b[0].heavy < 0 ? 99 : b[0].heavy,
                         b[1].sink, b[1].recent, b[1].heavy,
                         std::get<1>(info.param) == RetentionScore::LastMass ? "last" : "accumulated",
                         std::get<2>(info.param));
    });

}  // namespace test_retention
}  // namespace inferlab
