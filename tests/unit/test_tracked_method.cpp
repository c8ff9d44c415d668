// The runner wraps every plugin's method in a TrackedMethod (it names the hook
// under way for runs that die): it must forward every call and declaration
// the engine reads, or the engine silently runs a method without what it
// declared. When Method gains a virtual, add it to TrackedMethod and here.
#include <gtest/gtest.h>

#include "experiment/tracked_method.h"
#include "experiment/worker.h"

namespace inferlab {
namespace test_tracked_method {

class Declares final : public Method {
 public:
  ValuePruning value_pruning() const override { return {0.25, true}; }
  KvQuantization kv_quantization() const override { return {6, 4, 0.125}; }
  ActivationSparsity activation_sparsity() const override {
    ActivationSparsity a;
    a.input_threshold = {{0.5f, -1, -1, -1, -1, -1, 0.25f}};
    a.gate_threshold = {0.125f};
    return a;
  }
  ComponentPredictors component_predictors() const override {
    ComponentPredictors p;
    p.neurons.resize(1);
    p.neurons[0].keep = 3;
    return p;
  }
  uint32_t unused_hooks() const override { return kHookComponentMask; }
  RetentionPolicy retention_policy() const override {
    return {RetentionScore::LastMass, RetentionScope::PerSequence};
  }
  BoundScope bound_scope() const override { return BoundScope::QueryHead; }
  KvPageFormat kv_page_format() const override { return KvPageFormat::BF16; }
  KvPositions kv_positions() const override { return KvPositions::Cache; }
  bool dense_prefill() const override { return true; }
  Speculation speculation() const override { return {3, 5}; }
  std::map<std::string, double> counters() const override { return {{"declared", 1.0}}; }
};

TEST(TrackedMethod, ForwardsEveryDeclarationTheEngineReads) {
  Declares inner;
  TrackedMethod tracked(inner, worker_state());
  EXPECT_DOUBLE_EQ(tracked.value_pruning().keep, 0.25);
  EXPECT_TRUE(tracked.value_pruning().renormalize);
  EXPECT_EQ(tracked.kv_quantization().msb_bits, 6);
  EXPECT_EQ(tracked.kv_quantization().lsb_bits, 4);
  EXPECT_DOUBLE_EQ(tracked.kv_quantization().requant_threshold, 0.125);
  const ActivationSparsity sparsity = tracked.activation_sparsity();
  ASSERT_EQ(sparsity.input_threshold.size(), 1u);
  EXPECT_EQ(sparsity.input_threshold[0][0], 0.5f);
  EXPECT_EQ(sparsity.input_threshold[0][6], 0.25f);
  EXPECT_EQ(sparsity.gate_threshold, std::vector<float>{0.125f});
  EXPECT_EQ(tracked.retention_policy().score, RetentionScore::LastMass);
  EXPECT_EQ(tracked.retention_policy().scope, RetentionScope::PerSequence);
  EXPECT_EQ(tracked.bound_scope(), BoundScope::QueryHead);
  EXPECT_EQ(tracked.kv_page_format(), KvPageFormat::BF16);
  EXPECT_EQ(tracked.kv_positions(), KvPositions::Cache);
  EXPECT_TRUE(tracked.dense_prefill());
  EXPECT_EQ(tracked.counters(), (std::map<std::string, double>{{"declared", 1.0}}));
  EXPECT_STREQ(hook_call_name(int32_t(HookCall::value_pruning)), "value_pruning");
  EXPECT_STREQ(hook_call_name(int32_t(HookCall::kv_quantization)), "kv_quantization");
  EXPECT_STREQ(hook_call_name(int32_t(HookCall::activation_sparsity)), "activation_sparsity");
  EXPECT_EQ(tracked.component_predictors().neurons.at(0).keep, 3);
  EXPECT_EQ(tracked.unused_hooks(), kHookComponentMask);
  EXPECT_STREQ(hook_call_name(int32_t(HookCall::component_predictors)), "component_predictors");
  EXPECT_STREQ(hook_call_name(int32_t(HookCall::unused_hooks)), "unused_hooks");
  EXPECT_EQ(tracked.speculation().exit_layer, 3);
  EXPECT_EQ(tracked.speculation().draft_length, 5);
  EXPECT_STREQ(hook_call_name(int32_t(HookCall::speculation)), "speculation");
  EXPECT_EQ(worker_state().hook.load(), -1);  // no call under way after them
}

}  // namespace test_tracked_method
}  // namespace inferlab
