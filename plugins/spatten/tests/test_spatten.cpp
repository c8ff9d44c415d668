// SpAtten: dense when it keeps everything; its schedules (given and default)
// as token budgets and head counts; the cascade on the engine (tokens and rows
// gone from deeper layers, heads pruned in every deeper layer and every later
// step, kv heads not read once their query heads are all pruned). The engine
// mechanisms themselves: tests/unit/test_retention.cpp (retention per
// sequence against the double-precision reference) and tests/unit/test_plugin_hooks.cpp.
#include <gtest/gtest.h>

#include <cmath>
#include <string>
#include <vector>

#include "inferlab/testing.h"

namespace inferlab {
namespace test_spatten {

// The project's small GQA test model (2 layers, 4 query heads, 2 kv heads).
std::shared_ptr<Model> model() { return test::gqa_test_model("spatten", 3); }

TEST(SpAtten, KeepingEverythingIsDense) {
  EXPECT_DENSE_EQUIVALENT(model(), "spatten",
                          test::params({{"keep", std::string("0-1=1.0")}, {"head_keep", std::string("0-1=1.0")},
                                        {"value_keep", 1.0}}));
  EXPECT_DENSE_EQUIVALENT(model(), "spatten",
                          test::params({{"prune_tokens", false}, {"prune_heads", false}, {"prune_values", false}}));
  // Quantization is off by default (its pages are the engine's bit planes).
  EXPECT_FALSE(test::make_method("spatten", test::params({}))->kv_quantization().active());
}

ModelShape deep_shape() {
  ModelShape s = test::tiny_shape();
  s.n_layers = 30;
  return s;
}

TEST(SpAtten, TheDefaultScheduleKeepsAllEarlyAndKeepMinLate) {
  MethodHandle m = test::make_method("spatten", test::params({}));
  ASSERT_NE(m.get(), nullptr);
  m->begin_sequence(deep_shape());
  EXPECT_EQ(m->retention_policy().scope, RetentionScope::PerSequence);
  EXPECT_EQ(m->retention_policy().score, RetentionScore::AccumulatedMass);
  const StepInfo prompt{0, 0, 100};
  EXPECT_LT(m->retention_budget(prompt, 0, 0).heavy, 0);  // first third: everything stays
  EXPECT_LT(m->retention_budget(prompt, 9, 0).heavy, 0);
  const RetentionBudget middle = m->retention_budget(prompt, 15, 0);  // halfway from 1.0 to 0.3
  EXPECT_EQ(middle.sink, 0);
  EXPECT_EQ(middle.recent, 1);
  EXPECT_EQ(middle.recent + middle.heavy, 65);
  const RetentionBudget last = m->retention_budget(prompt, 29, 0);
  EXPECT_EQ(last.recent + last.heavy, 30);  // ceil(0.3 * 100)
  // The fraction is of every token seen so far: a later step keeps more.
  const RetentionBudget later = m->retention_budget(StepInfo{1, 100, 1}, 29, 0);
  EXPECT_EQ(later.recent + later.heavy, int32_t(std::ceil(0.3 * 101)));
}

TEST(SpAtten, AGivenScheduleOverridesTheShape) {
  MethodHandle m = test::make_method("spatten", test::params({{"keep", std::string("2-4=0.5; 20=0.1")}, {"recent", int64_t{4}}}));
  ASSERT_NE(m.get(), nullptr);
  m->begin_sequence(deep_shape());
  const StepInfo prompt{0, 0, 40};
  EXPECT_LT(m->retention_budget(prompt, 1, 0).heavy, 0);  // not named: 1.0
  EXPECT_EQ(m->retention_budget(prompt, 3, 0).heavy, 20 - 4);
  EXPECT_EQ(m->retention_budget(prompt, 20, 0).heavy, 0);  // ceil(0.1 * 40) = 4: the recent window alone
  EXPECT_LT(m->retention_budget(prompt, 25, 0).heavy, 0);
}

TEST(SpAtten, FractionsOutsideTheRangeAreRefusedNamingTheKey) {
  for (const auto& [key, value] : {std::pair{"keep", "0-1=0"}, std::pair{"head_keep", "1=1.5"}, std::pair{"keep", "0-1"}}) {
    auto made = test::plugin_registry().create("spatten", test::params({{key, std::string(value)}}));
    ASSERT_FALSE(made.ok()) << key << " = " << value;
    EXPECT_NE(made.message().find(std::string("plugin spatten: ") + key + ": schedule"), std::string::npos)
        << made.message();
  }
}

TEST(SpAtten, BitWidthsOutsideTheSupportedRangeAreRefusedNamingTheKey) {
  for (const auto& [key, value] : {std::pair{"msb_bits", int64_t{9}}, std::pair{"msb_bits", int64_t{1}},
                                   std::pair{"lsb_bits", int64_t{9}}, std::pair{"lsb_bits", int64_t{-1}}}) {
    auto made = test::plugin_registry().create("spatten", test::params({{"quantize", true}, {key, value}}));
    ASSERT_FALSE(made.ok()) << key << " = " << value;
    EXPECT_NE(made.message().find(std::string("plugin spatten: ") + key), std::string::npos) << made.message();
  }
  auto threshold = test::plugin_registry().create("spatten", test::params({{"requant_threshold", 1.5}}));
  ASSERT_FALSE(threshold.ok());
  EXPECT_NE(threshold.message().find("requant_threshold"), std::string::npos) << threshold.message();
}

struct Traced {
  EngineCounters counters;
  std::vector<std::vector<int32_t>> positions;  // per layer, kv head 0, after the run
};

// A 40-token prompt (logits of its last row), then 8 decode steps.
Traced run(const ParamValues& params) {
  Traced out;
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4});
  EXPECT_TRUE(engine.ok());
  test::ActiveMethod active = test::activate_method(**engine, "spatten", params);
  if (active.handle.get() == nullptr) return out;
  active.handle->begin_sequence((*engine)->shape());
  auto seq = (*engine)->new_sequence();
  const auto tokens = test::random_tokens(model()->config().n_vocab, 48, 5);
  EXPECT_TRUE((*engine)->forward(*seq, std::span(tokens.data(), 40), 39, nullptr).ok());
  for (size_t t = 40; t < tokens.size(); ++t) EXPECT_TRUE((*engine)->forward(*seq, std::span(&tokens[t], 1), 0, nullptr).ok());
  for (int32_t l = 0; l < model()->config().n_layers; ++l) out.positions.push_back(seq->table(l, 0).positions);
  out.counters = (*engine)->counters();
  return out;
}

TEST(SpAtten, PrunedTokensLeaveTheDeeperLayersAndTheirRowsTheCall) {
  const Traced dense = run(test::params({{"prune_tokens", false}, {"prune_heads", false}, {"prune_values", false}}));
  const Traced got =
      run(test::params({{"keep", std::string("0=0.5; 1=0.25")}, {"prune_heads", false}, {"prune_values", false}}));
  ASSERT_EQ(got.positions.size(), 2u);
  // After the prompt each layer kept ceil(keep * 40), and every step keeps ceil(keep * seen).
  EXPECT_EQ(got.positions[0].size(), size_t(std::ceil(0.5 * 48)));
  EXPECT_EQ(got.positions[1].size(), size_t(std::ceil(0.25 * 48)));
  for (int32_t p : got.positions[1])
    EXPECT_TRUE(std::binary_search(got.positions[0].begin(), got.positions[0].end(), p)) << p;
  // 20 prompt rows pruned at layer 0 were not computed in layer 1.
  EXPECT_EQ(got.counters.rows_pruned, 20);
  EXPECT_LT(got.counters.decode_kv_bytes_read * 2, dense.counters.decode_kv_bytes_read);
  EXPECT_EQ(dense.counters.rows_pruned, 0);
}

TEST(SpAtten, PrunedHeadsStayPrunedInDeeperLayersAndLaterSteps) {
  const Traced got = run(
      test::params({{"prune_tokens", false}, {"prune_values", false}, {"head_keep", std::string("0=0.5; 1=0.25")}}));
  // Every call: 2 heads pruned in layer 0, 3 in layer 1 (the 2, then one more).
  EXPECT_EQ(got.counters.heads_skipped, int64_t(9) * (2 + 3));
  // 3 of 4 heads in 2 groups of 2: one kv head is not read at all in layer 1, in every decode step.
  EXPECT_GE(got.counters.kv_heads_skipped, 8);
  EXPECT_EQ(got.counters.tokens_evicted, 0);
}

TEST(SpAtten, ValuePruningLeavesTheSkippedValuesUnread) {
  MethodHandle m = test::make_method("spatten", test::params({{"value_keep", 0.25}, {"renormalize", true}}));
  ASSERT_NE(m.get(), nullptr);
  EXPECT_DOUBLE_EQ(m->value_pruning().keep, 0.25);
  EXPECT_TRUE(m->value_pruning().renormalize);
  MethodHandle off = test::make_method("spatten", test::params({{"prune_values", false}}));
  EXPECT_FALSE(off->value_pruning().active());
  const Traced values = run(test::params({{"prune_tokens", false}, {"prune_heads", false}, {"value_keep", 0.25}}));
  const Traced dense = run(test::params({{"prune_tokens", false}, {"prune_heads", false}, {"prune_values", false}}));
  EXPECT_EQ(values.counters.decode_keys_read, dense.counters.decode_keys_read);  // every key scored
  EXPECT_GT(values.counters.decode_values_skipped, 0);
  EXPECT_LT(values.counters.decode_kv_bytes_read, dense.counters.decode_kv_bytes_read);
}

// Progressive quantization: the pages are bit planes (a third of f32's bytes
// at 6+4 bits and head_dim 16), every row is checked, and the LSB planes are
// read only by rows whose largest probability is below the threshold.
TEST(SpAtten, QuantizationReadsTheMsbPlanesAndRefetchesFlatRows) {
  const ParamValues plain = test::params({{"prune_tokens", false}, {"prune_heads", false}, {"prune_values", false}});
  const Traced dense = run(plain);
  const auto quantized = [](double threshold) {
    return test::params({{"prune_tokens", false}, {"prune_heads", false}, {"prune_values", false},
                         {"quantize", true}, {"requant_threshold", threshold}});
  };
  const Traced msb = run(quantized(0.0));
  const Traced flat = run(quantized(0.5));
  EXPECT_EQ(msb.counters.decode_keys_read, dense.counters.decode_keys_read);
  const auto rate = [](const Traced& t) { return t.counters.as_map().at("requant_refetch_rate"); };
  EXPECT_EQ(rate(msb), 0.0);
  EXPECT_GT(rate(flat), 0.0);
  EXPECT_EQ(msb.counters.decode_lsb_keys_read, 0);
  EXPECT_GT(flat.counters.decode_lsb_keys_read, 0);
  // head_dim 16: a row is 4 + 12 + 8 bytes (64 in f32); the MSB pass reads 16 of them.
  EXPECT_EQ(msb.counters.decode_kv_bytes_read * 4, dense.counters.decode_kv_bytes_read);
  EXPECT_GT(flat.counters.decode_kv_bytes_read, msb.counters.decode_kv_bytes_read);
}

TEST(SpAtten, BatchInvariance) { EXPECT_BATCH_INVARIANT(model(), "spatten", test::params({})); }

}  // namespace test_spatten
}  // namespace inferlab
