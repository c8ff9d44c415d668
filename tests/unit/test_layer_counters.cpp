// Layer plans and early exits as the engine counts them: layers a generated
// token ran, K/V propagated from the hidden state into skipped layers, and
// the layer after which a method ended each call. A plan-only method has no
// exit hook (its hidden state is never read back); a method that exits has.
#include <gtest/gtest.h>

#include "engine/engine.h"
#include "test_support.h"

namespace inferlab {
namespace test_layer_counters {

// Decode steps skip layer 1, its K/V filled from the hidden state.
struct SkipsLayerOne final : Method {
  bool plan_layers(const StepInfo& step, LayerPlan& plan) override {
    if (!step.decode()) return false;
    plan.run[1] = 0;
    plan.kv_fill = SkippedLayerKv::FromHidden;
    return true;
  }
};

// Decode steps end after layer 0 (the rest skipped with FromHidden fills).
struct ExitsAfterLayerZero final : Method {
  bool exit_after_layer(const StepInfo& step, int32_t layer, std::span<const float>) override {
    return step.decode() && layer == 0;
  }
};

static_assert((hooks_of<SkipsLayerOne>() & kHookLayerExit) == 0, "a plan-only method has no exit hook");
static_assert(hooks_of<ExitsAfterLayerZero>() == (kHookLayerPlan | kHookLayerExit));

EngineCounters run(Method& method, uint32_t hooks, int decode_steps) {
  auto engine = Engine::create(test::gqa_test_model("layer-counters", 9), EngineOptions{4, 0, 0});
  EXPECT_TRUE(engine.ok());
  if (!engine.ok()) return {};
  EXPECT_TRUE((*engine)->set_method(&method, hooks).ok());
  auto seq = (*engine)->new_sequence();
  const auto prompt = test::random_tokens((*engine)->config().n_vocab, 12, 4);
  EXPECT_TRUE((*engine)->prefill(*seq, prompt).ok());
  for (int i = 0; i < decode_steps; ++i) EXPECT_TRUE((*engine)->decode(*seq, prompt[size_t(i)]).ok());
  return (*engine)->counters();
}

TEST(LayerCounters, APlanCountsTheLayersEachGeneratedTokenRan) {
  SkipsLayerOne method;
  const EngineCounters c = run(method, hooks_of<SkipsLayerOne>(), 5);
  const int32_t L = test::gqa_test_model("layer-counters", 9)->config().n_layers;
  ASSERT_GE(L, 2);
  EXPECT_EQ(c.decode_steps, 5);
  EXPECT_EQ(c.decode_layers_run, 5 * (L - 1));
  EXPECT_EQ(c.layers_skipped, 5);
  EXPECT_EQ(c.kv_fills_propagated, 5);  // one row, one skipped layer, per step
  EXPECT_TRUE(c.exits_after_layer.empty());
  const auto map = c.as_map();
  EXPECT_DOUBLE_EQ(map.at("layers_per_decode_token"), double(L - 1));
  EXPECT_EQ(map.count("early_exits"), 0u);
}

TEST(LayerCounters, AnExitCountsWhereItHappenedAndThePropagatedFills) {
  ExitsAfterLayerZero method;
  const EngineCounters c = run(method, hooks_of<ExitsAfterLayerZero>(), 4);
  const int32_t L = test::gqa_test_model("layer-counters", 9)->config().n_layers;
  EXPECT_EQ(c.decode_layers_run, 4);
  EXPECT_EQ(c.kv_fills_propagated, 4 * (L - 1));
  ASSERT_EQ(c.exits_after_layer.size(), size_t(L));
  EXPECT_EQ(c.exits_after_layer[0], 4);
  const auto map = c.as_map();
  EXPECT_DOUBLE_EQ(map.at("early_exits"), 4.0);
  EXPECT_DOUBLE_EQ(map.at("exits_after_layer.layer00"), 4.0);
  EXPECT_DOUBLE_EQ(map.at("layers_per_decode_token"), 1.0);
}

}  // namespace test_layer_counters
}  // namespace inferlab
