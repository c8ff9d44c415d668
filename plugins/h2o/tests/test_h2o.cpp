// H2O: dense when its budget covers everything; the rule and the budgets it
// gives the engine's retention (the mechanism: tests/unit/test_retention.cpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "inferlab/testing.h"

namespace inferlab {
namespace test_h2o {

// The project's small GQA test model (2 layers, 4 query heads, 2 kv heads).
std::shared_ptr<Model> model() { return test::gqa_test_model("kv-plugins", 1); }

TEST(H2o, KeepingEverythingIsDense) {
  EXPECT_DENSE_EQUIVALENT(model(), "h2o", test::params({{"heavy", int64_t{100000}}, {"recent", int64_t{100000}}}));
  EXPECT_DENSE_EQUIVALENT(model(), "h2o", test::params({{"recent_ratio", 1.0}}));
}

// H2O's policy is the engine's retention (tests/unit/test_retention.cpp); the
// plugin names the rule and the budgets, per layer and kv head.
TEST(H2o, H2oAsksTheEngineToKeepHeavyHittersAndTheRecentWindow) {
  MethodHandle h2o = test::make_method("h2o", test::params({{"heavy", int64_t{2}}, {"recent", int64_t{2}}}));
  ASSERT_NE(h2o.get(), nullptr);
  const RetentionPolicy policy = h2o->retention_policy();
  EXPECT_EQ(policy.score, RetentionScore::AccumulatedMass);
  EXPECT_EQ(policy.scope, RetentionScope::PerHead);
  const RetentionBudget b = h2o->retention_budget(StepInfo{0, 0, 8}, 0, 0);
  EXPECT_EQ(b.sink, 0);
  EXPECT_EQ(b.recent, 2);
  EXPECT_EQ(b.heavy, 2);
}

TEST(H2o, H2oBudgetsByRatioAndPerLayerAndHead) {
  MethodHandle h2o = test::make_method("h2o", test::params({{"heavy", int64_t{2}}, {"recent", int64_t{2}}, {"overrides", std::string("1=1:1;1.1=3:0")}}));
  ASSERT_NE(h2o.get(), nullptr);
  auto kept = [&](Method& m, int32_t layer, int32_t head) {
    const RetentionBudget b = m.retention_budget(StepInfo{0, 0, 8}, layer, head);
    return b.sink + b.recent + b.heavy;
  };
  EXPECT_EQ(kept(*h2o.get(), 0, 0), 4);
  EXPECT_EQ(kept(*h2o.get(), 1, 0), 2);
  EXPECT_EQ(kept(*h2o.get(), 1, 1), 3);
  MethodHandle ratio = test::make_method("h2o", test::params({{"heavy_ratio", 0.25}, {"recent_ratio", 0.125}}));
  EXPECT_EQ(kept(*ratio.get(), 0, 0), 3);  // ceil(0.25 * 8) + ceil(0.125 * 8) of the 8 tokens seen
  EXPECT_EQ(kept(*ratio.get(), 0, 0), 3);
  EXPECT_EQ(ratio->retention_budget(StepInfo{5, 99, 1}, 0, 0).heavy, 25);  // 100 tokens seen after the call
  auto bad = test::plugin_registry().create("h2o", test::params({{"overrides", std::string("1=x")}}));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("1=x"), std::string::npos) << bad.message();
}

// dense_layers: the first layers keep every token (heavy < 0 asks the engine
// to keep everything); the others keep their budget as before.
TEST(H2o, H2oDenseLayersKeepEveryToken) {
  const auto with = [](int64_t dense_layers) {
    return test::params({{"heavy", int64_t{2}}, {"recent", int64_t{2}}, {"dense_layers", dense_layers}});
  };
  // Every layer dense, and a count past the model's 2 layers, give dense logits at a budget of 4 tokens.
  EXPECT_DENSE_EQUIVALENT(model(), "h2o", with(2));
  EXPECT_DENSE_EQUIVALENT(model(), "h2o", with(5));

  MethodHandle h2o = test::make_method("h2o", with(1));
  ASSERT_NE(h2o.get(), nullptr);
  EXPECT_LT(h2o->retention_budget(StepInfo{0, 0, 8}, 0, 1).heavy, 0);
  const RetentionBudget b = h2o->retention_budget(StepInfo{0, 0, 8}, 1, 1);
  EXPECT_EQ(b.recent, 2);
  EXPECT_EQ(b.heavy, 2);

  // In the engine: 20 prompt tokens, then 2 decode steps; tokens stored per (layer, kv head).
  for (int64_t dense_layers : {0, 1}) {
    auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
    ASSERT_TRUE(engine.ok());
    test::ActiveMethod active = test::activate_method(**engine, "h2o", with(dense_layers));
    ASSERT_NE(active.handle.get(), nullptr);
    active.handle->begin_sequence((*engine)->shape());
    auto seq = (*engine)->new_sequence();
    ASSERT_TRUE((*engine)->prefill(*seq, test::random_tokens(100, 20, 1)).ok());
    ASSERT_TRUE((*engine)->decode(*seq, 5).ok());
    ASSERT_TRUE((*engine)->decode(*seq, 6).ok());
    std::vector<int32_t> all(22);
    std::iota(all.begin(), all.end(), 0);
    for (int32_t g = 0; g < 2; ++g) {
      if (dense_layers == 1) {
        EXPECT_EQ(seq->table(0, g).positions, all);
      } else {
        EXPECT_EQ(seq->table(0, g).n_tokens(), 4);
      }
      EXPECT_EQ(seq->table(1, g).n_tokens(), 4);
    }
    // Per evicting (layer, kv head): 16 after the prompt, 1 per decode step.
    EXPECT_EQ((*engine)->counters().tokens_evicted, (2 - dense_layers) * 2 * (16 + 2));
  }
}

TEST(H2o, BatchInvariance) {
  EXPECT_BATCH_INVARIANT(model(), "h2o", test::params({{"heavy", int64_t{3}}, {"recent", int64_t{4}}}));
}

}  // namespace test_h2o
}  // namespace inferlab
