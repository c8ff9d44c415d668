// H2O: dense when its budget covers everything; the rule and the budgets it
// gives the engine's retention (the mechanism: tests/unit/test_retention.cpp).
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "inferlab/testing.h"

namespace inferlab {
namespace {

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

}  // namespace
}  // namespace inferlab
