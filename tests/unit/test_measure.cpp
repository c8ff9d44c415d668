// measure_run leaves the engine dense on every way out: after a finished run,
// after a method that fails mid-sample, and after a dense reference.
#include <gtest/gtest.h>

#include "adapter_method.h"
#include "experiment/measure.h"
#include "plugin_test_support.h"

namespace inferlab {
namespace {

class HandMadeTask final : public Task {
 public:
  const std::string& name() const override { return name_; }
  TaskKind kind() const override { return TaskKind::Generation; }
  Result<std::vector<TaskSample>> samples(const Tokenizer&, int32_t, uint64_t) const override {
    return std::vector<TaskSample>{};
  }

 private:
  std::string name_ = "hand-made";
};

TEST(MeasureRun, LeavesTheEngineDenseOnEveryWayOut) {
  auto engine_or = Engine::create(test::gqa_test_model("measure", 2), EngineOptions{8, 0, 0});
  ASSERT_TRUE(engine_or.ok());
  Engine& engine = **engine_or;
  const ModelConfig& c = engine.config();
  HandMadeTask task;
  TaskParams params;
  std::vector<TaskSample> samples(2);
  for (size_t i = 0; i < samples.size(); ++i) {
    samples[i].id = "s" + std::to_string(i);
    samples[i].prompt_tokens = test::random_tokens(c.n_vocab, 12, 40 + i);
    samples[i].expected = {"x"};
    samples[i].max_new_tokens = 3;
  }
  DenseCache dense;
  auto measure = [&](test::AdapterMethod* method) {
    WeightOverrides overrides;
    if (method != nullptr) {
      const PluginEntry entry{"adapters", "1", "", kHookLoad, {}, ""};
      EXPECT_TRUE(load_method(*method, entry, engine, test::temp_path("artifacts"), &overrides).ok());
    }
    MeasureContext ctx;
    ctx.engine = &engine;
    ctx.method = method;
    ctx.hooks = method != nullptr ? method->hooks() : 0;
    ctx.method_name = "adapters";
    ctx.overrides = &overrides;
    ctx.task = &task;
    ctx.task_params = &params;
    ctx.samples = &samples;
    ctx.task_key = "hand-made";
    ctx.dense = &dense;
    return measure_run(ctx);
  };
  // A method that fails in its first forward call (an unmerged adapter under a neuron subset).
  test::AdapterMethod failing({{"ffn_up", 0, test::random_adapter(c.n_ff, c.n_embd, 2, 1, 1.0f)}}, false, 2);
  auto failed = measure(&failing);
  ASSERT_FALSE(failed.ok());
  EXPECT_NE(failed.message().find("sample 0 (s0)"), std::string::npos) << failed.message();
  EXPECT_FALSE(engine.has_method());
  // A method that runs to the end, and the dense baseline.
  test::AdapterMethod working({{"ffn_up", 0, test::random_adapter(c.n_ff, c.n_embd, 2, 1, 1.0f)}});
  auto finished = measure(&working);
  ASSERT_TRUE(finished.ok()) << finished.message();
  EXPECT_EQ(finished->samples.size(), 2u);
  EXPECT_FALSE(engine.has_method());
  ASSERT_TRUE(measure(nullptr).ok());
  EXPECT_FALSE(engine.has_method());
}

}  // namespace
}  // namespace inferlab
