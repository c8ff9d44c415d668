// measure_run leaves the engine dense on every way out: after a finished run,
// after a method that fails mid-sample, and after a dense reference. The
// teacher-forced answer metrics and the decoded-question protocol.
#include <gtest/gtest.h>

#include <cmath>

#include "adapter_method.h"
#include "experiment/measure.h"
#include "plugin_test_support.h"
#include "speculation_methods.h"

namespace inferlab {
namespace test_measure {

// A task whose samples the test writes itself.
class HandMadeTask final : public Task {
 public:
  explicit HandMadeTask(TaskKind kind = TaskKind::Generation) : kind_(kind) {}
  const std::string& name() const override { return name_; }
  TaskKind kind() const override { return kind_; }
  Result<std::vector<TaskSample>> samples(const Tokenizer&, int32_t, uint64_t) const override {
    return std::vector<TaskSample>{};
  }

 private:
  TaskKind kind_;
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

const MetricValue* find_metric(const RunMeasurements& m, const std::string& name) {
  for (const MetricValue& v : m.metrics)
    if (v.name == name) return &v;
  return nullptr;
}

// Dense runs of hand-made samples on a synthetic model, under either question protocol.
struct DenseBench {
  std::unique_ptr<Engine> engine;
  HandMadeTask task;
  TaskParams params;
  std::vector<TaskSample> samples;
  DenseCache dense;

  explicit DenseBench(int32_t question_tokens) {
    auto e = Engine::create(test::gqa_test_model("answers", 2), EngineOptions{8, 0, 0});
    EXPECT_TRUE(e.ok());
    engine = std::move(e).value();
    const ModelConfig& c = engine->config();
    samples.resize(3);
    for (size_t i = 0; i < samples.size(); ++i) {
      samples[i].id = "s" + std::to_string(i);
      samples[i].prompt_tokens = test::random_tokens(c.n_vocab, 20, 70 + i);
      samples[i].expected = {"x"};
      samples[i].max_new_tokens = 4;
      samples[i].question_tokens = question_tokens;
      samples[i].answer = " 4711";
    }
  }
  Result<RunMeasurements> run() {
    MeasureContext ctx;
    ctx.engine = engine.get();
    ctx.task = &task;
    ctx.task_params = &params;
    ctx.samples = &samples;
    ctx.task_key = "answers";
    ctx.dense = &dense;
    return measure_run(ctx);
  }
};

TEST(MeasureRun, AnswerLogprobIsTheTeacherForcedLogProbabilityOfTheAnswer) {
  DenseBench bench(0);
  Engine& engine = *bench.engine;
  const Tokenizer& tok = engine.model().tokenizer();
  const std::vector<int32_t> answer = tok.encode(" 4711", false, false);
  ASSERT_GE(answer.size(), 2u);
  // The reference: prompt and answer in one prefill, every answer token scored
  // from the row before it.
  double expected_sum = 0;
  int64_t digits = 0, right = 0;
  for (const TaskSample& s : bench.samples) {
    std::vector<int32_t> all = s.prompt_tokens;
    all.insert(all.end(), answer.begin(), answer.end());
    const int64_t first = int64_t(s.prompt_tokens.size()) - 1;
    std::vector<std::vector<float>> rows;
    auto seq = engine.new_sequence();
    ASSERT_TRUE(engine.forward(*seq, all, first, [&](int64_t, std::span<const float> l) {
      rows.emplace_back(l.begin(), l.end());
    }).ok());
    ASSERT_EQ(rows.size(), answer.size() + 1);
    for (size_t k = 0; k < answer.size(); ++k) {
      expected_sum += log_softmax(rows[k])[size_t(answer[k])];
      const std::string piece = tok.decode({answer[k]});
      if (piece.find_first_of("0123456789") != std::string::npos) {
        ++digits;
        right += int32_t(std::max_element(rows[k].begin(), rows[k].end()) - rows[k].begin()) == answer[k];
      }
    }
  }
  ASSERT_GT(digits, 0);
  auto measured = bench.run();
  ASSERT_TRUE(measured.ok()) << measured.message();
  const MetricValue* lp = find_metric(*measured, "answer_logprob");
  const MetricValue* acc = find_metric(*measured, "answer_digit_accuracy");
  ASSERT_NE(lp, nullptr);
  ASSERT_NE(acc, nullptr);
  EXPECT_NEAR(lp->value, expected_sum / 3.0, 1e-3);
  EXPECT_LT(lp->value, 0.0);
  EXPECT_DOUBLE_EQ(acc->value, double(right) / double(digits));
  // Each sample's own figures are in its detail.
  for (const SampleRow& row : measured->samples) {
    EXPECT_NE(row.detail_json.find("\"answer_logprob\""), std::string::npos) << row.detail_json;
    EXPECT_NE(row.detail_json.find("\"answer_digits\""), std::string::npos) << row.detail_json;
  }
  // Samples without an answer: no such metrics.
  for (TaskSample& s : bench.samples) s.answer.clear();
  bench.dense.clear();
  auto without = bench.run();
  ASSERT_TRUE(without.ok()) << without.message();
  EXPECT_EQ(find_metric(*without, "answer_logprob"), nullptr);
  EXPECT_EQ(find_metric(*without, "answer_digit_accuracy"), nullptr);
}

TEST(MeasureRun, DecodedQuestionFeedsItsTokensOneStepEach) {
  DenseBench prefilled(0), decoded(5);
  auto a = prefilled.run(), b = decoded.run();
  ASSERT_TRUE(a.ok()) << a.message();
  ASSERT_TRUE(b.ok()) << b.message();
  // Dense either way: the same answers, the same answer probabilities up to rounding.
  for (size_t i = 0; i < a->samples.size(); ++i) EXPECT_EQ(a->samples[i].produced, b->samples[i].produced);
  EXPECT_NEAR(find_metric(*a, "answer_logprob")->value, find_metric(*b, "answer_logprob")->value, 1e-3);
  // Five more single-token steps per sample, counted as prompt work, not as generated tokens.
  const double steps_a = find_metric(*a, "engine.decode_steps")->value;
  const double steps_b = find_metric(*b, "engine.decode_steps")->value;
  EXPECT_EQ(steps_b - steps_a, 5.0 * 3.0);
  const MetricValue* keys = find_metric(*b, "keys_read_per_step");
  ASSERT_NE(keys, nullptr);
  // Dense reads every cached key: per step and (layer, kv head), all of them.
  const ModelConfig& c = decoded.engine->config();
  EXPECT_NEAR(keys->value * steps_b * c.n_layers * c.n_kv_heads, find_metric(*b, "engine.decode_keys_cached")->value,
              1e-6);
  EXPECT_GT(keys->value, 15.0);  // the first question step already sees the 15 context tokens
  EXPECT_EQ(find_metric(*b, "sparse_prefill_keys_share"), nullptr);  // a dense prefill records none
}

// A fidelity task under a speculating method: teacher forcing would never
// speculate, so the method generates freely and its tokens are compared with
// dense's; self-speculation reproduces dense, so they all agree.
TEST(MeasureRun, ASpeculatingMethodsFidelityGeneratesFreelyAndAgreesWithDense) {
  auto engine_or = Engine::create(test::gqa_test_model("measure-speculation", 5), EngineOptions{8, 0, 0});
  ASSERT_TRUE(engine_or.ok());
  Engine& engine = **engine_or;
  HandMadeTask task(TaskKind::Fidelity);
  TaskParams params;
  std::vector<TaskSample> samples(3);
  for (size_t i = 0; i < samples.size(); ++i) {
    samples[i].id = "s" + std::to_string(i);
    samples[i].prompt_tokens = test::random_tokens(engine.config().n_vocab, 12, 60 + i);
    samples[i].max_new_tokens = 16;
  }
  DenseCache dense;
  test::Speculating method;
  method.spec = {1, 3};
  MeasureContext ctx;
  ctx.engine = &engine;
  ctx.method = &method;
  ctx.method_name = "speculating";
  ctx.task = &task;
  ctx.task_params = &params;
  ctx.samples = &samples;
  ctx.task_key = "fidelity";
  ctx.dense = &dense;
  auto m = measure_run(ctx);
  ASSERT_TRUE(m.ok()) << m.message();
  EXPECT_EQ(find_metric(*m, "fidelity_top1")->value, 1.0);
  EXPECT_LT(find_metric(*m, "fidelity_kl")->value, 1e-6);
  EXPECT_GT(find_metric(*m, "engine.verify_calls")->value, 0.0);
  EXPECT_GT(find_metric(*m, "engine.draft_steps")->value, 0.0);
  ASSERT_NE(find_metric(*m, "decode_tokens_per_s"), nullptr);
  EXPECT_FALSE(engine.has_method());
}

}  // namespace test_measure
}  // namespace inferlab
