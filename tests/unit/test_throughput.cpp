// The throughput task measured by continuous batching (experiment/throughput.h):
// every request finishes with the tokens it generates alone, under a KV
// budget that forces preemptions too; a budget that cannot hold one request
// is refused with the numbers; experiment.batch and the task's parameters
// are checked where they are written.
#include <gtest/gtest.h>

#include <nlohmann/json.hpp>

#include "experiment/config.h"
#include "experiment/throughput.h"
#include "plugin_test_support.h"
#include "speculation_methods.h"

namespace inferlab {
namespace test_throughput {

struct Stream {
  std::unique_ptr<Task> task;
  TaskParams params;
  std::vector<TaskSample> samples;
};

Stream stream(int32_t vocab, int n, double budget_mb, const std::string& arrival = "all") {
  Stream s;
  std::map<std::string, std::vector<ParamValue>> given = {{"kv_budget_mb", {budget_mb}},
                                                           {"arrival", {arrival}}};
  auto task = make_task("throughput", TaskParams(given));
  EXPECT_TRUE(task.ok()) << (task.ok() ? "" : task.message());
  s.task = std::move(*task);
  for (const auto& info : task_catalog())
    if (info.name == "throughput")
      for (const auto& p : info.params) s.params.set(p.spec.name, given.count(p.spec.name) ? given[p.spec.name] : p.default_values());
  for (int i = 0; i < n; ++i) {
    TaskSample sample;
    sample.id = "req" + std::to_string(i);
    sample.prompt_tokens = test::random_tokens(vocab, 12, 70 + uint64_t(i));
    sample.max_new_tokens = 5;
    sample.tags = {{"arrival_s", arrival == "all" ? 0.0 : 0.001 * i}};
    s.samples.push_back(std::move(sample));
  }
  return s;
}

Result<RunMeasurements> measure(Engine& engine, Stream& s, int64_t batch) {
  MeasureContext ctx;
  ctx.engine = &engine;
  ctx.task = s.task.get();
  ctx.task_params = &s.params;
  ctx.samples = &s.samples;
  ctx.task_key = "throughput";
  ctx.batch = batch;
  return measure_run(ctx);
}

double metric(const RunMeasurements& m, const std::string& name) {
  for (const MetricValue& v : m.metrics)
    if (v.name == name) return v.value;
  ADD_FAILURE() << "no metric " << name;
  return -1;
}

std::unique_ptr<Engine> engine() {
  auto e = Engine::create(test::gqa_test_model("throughput", 8), EngineOptions{4, 0, 0});
  EXPECT_TRUE(e.ok());
  return e.ok() ? std::move(*e) : nullptr;
}

TEST(Throughput, EveryRequestGeneratesWhatItGeneratesAloneAtAnyBatch) {
  auto e = engine();
  Stream s = stream(e->config().n_vocab, 7, 0.0);
  auto alone = measure(*e, s, 1);
  ASSERT_TRUE(alone.ok()) << alone.message();
  auto batched = measure(*e, s, 3);
  ASSERT_TRUE(batched.ok()) << batched.message();
  ASSERT_EQ(batched->samples.size(), 7u);
  for (size_t i = 0; i < 7; ++i) {
    EXPECT_EQ(batched->samples[i].produced, alone->samples[i].produced) << i;
    EXPECT_EQ(nlohmann::json::parse(batched->samples[i].detail_json).at("output_tokens"), 5);
  }
  EXPECT_EQ(metric(*batched, "output_tokens"), 35);
  EXPECT_EQ(metric(*batched, "batch_max"), 3);
  EXPECT_EQ(metric(*alone, "batch_max"), 1);
  EXPECT_GT(metric(*batched, "engine.batched_calls"), 0);
  EXPECT_EQ(metric(*batched, "preemptions"), 0);
  EXPECT_EQ(metric(*batched, "kv_budget_overruns"), 0);
  EXPECT_GT(metric(*batched, "output_tokens_per_s"), 0);
  EXPECT_LE(metric(*batched, "ttft_p50_ms"), metric(*batched, "ttft_p99_ms"));
  EXPECT_FALSE(e->has_method());
}

// A budget of one and a half requests at their longest, with room for three
// in a step: the newest is preempted (recomputed later) and every request
// still finishes with its own tokens.
TEST(Throughput, ABudgetThatForcesPreemptionStillFinishesEveryRequest) {
  auto e = engine();
  const ModelConfig& c = e->config();
  const int64_t pages_one = int64_t(c.n_layers) * c.n_kv_heads * ((12 + 5 - 1 + 3) / 4);
  const double mb = 1.5 * double(pages_one * e->pool().page_bytes()) / 1048576.0;
  Stream free_run = stream(c.n_vocab, 5, 0.0), tight = stream(c.n_vocab, 5, mb);
  auto reference = measure(*e, free_run, 3);
  auto squeezed = measure(*e, tight, 3);
  ASSERT_TRUE(reference.ok()) << reference.message();
  ASSERT_TRUE(squeezed.ok()) << squeezed.message();
  for (size_t i = 0; i < 5; ++i) EXPECT_EQ(squeezed->samples[i].produced, reference->samples[i].produced) << i;
  EXPECT_LE(metric(*squeezed, "kv_pages_peak"), metric(*squeezed, "kv_pages_budget"));
  EXPECT_EQ(metric(*squeezed, "kv_budget_overruns"), 0);
  EXPECT_LT(metric(*squeezed, "batch_mean"), metric(*reference, "batch_mean"));
}

TEST(Throughput, PoissonArrivalsWaitForTheirTime) {
  auto e = engine();
  Stream s = stream(e->config().n_vocab, 4, 0.0, "poisson");
  auto m = measure(*e, s, 4);
  ASSERT_TRUE(m.ok()) << m.message();
  for (const SampleRow& row : m->samples) {
    const auto d = nlohmann::json::parse(row.detail_json);
    EXPECT_GE(d.at("ttft_s").get<double>(), 0.0);
  }
}

TEST(Throughput, ABudgetThatCannotHoldOneRequestIsRefusedWithTheNumbers) {
  auto e = engine();
  const double page_mb = double(e->pool().page_bytes()) / 1048576.0;
  Stream none = stream(e->config().n_vocab, 2, 0.5 * page_mb), small = stream(e->config().n_vocab, 2, 10 * page_mb);
  auto m = measure(*e, none, 2);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.message().find("task 'throughput' parameter 'kv_budget_mb' ("), std::string::npos) << m.message();
  EXPECT_NE(m.message().find(" MiB = 0 pages of "), std::string::npos) << m.message();
  EXPECT_NE(m.message().find("a KV budget of 0 pages holds nothing"), std::string::npos) << m.message();
  m = measure(*e, small, 2);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.message().find(" MiB = 10 pages of "), std::string::npos) << m.message();
  EXPECT_NE(m.message().find("cannot hold even this one sequence"), std::string::npos) << m.message();
  EXPECT_FALSE(e->has_method());
}

TEST(Throughput, ASpeculatingMethodIsRefusedNamingThePlugin) {
  auto e = engine();
  Stream s = stream(e->config().n_vocab, 2, 0.0);
  test::Speculating method;
  method.spec = {1, 2};
  MeasureContext ctx;
  ctx.engine = e.get();
  ctx.method = &method;
  ctx.method_name = "selfspec";
  ctx.task = s.task.get();
  ctx.task_params = &s.params;
  ctx.samples = &s.samples;
  ctx.task_key = "throughput";
  ctx.batch = 2;
  auto m = measure_run(ctx);
  ASSERT_FALSE(m.ok());
  EXPECT_NE(m.message().find("throughput: plugin selfspec speculates"), std::string::npos) << m.message();
  EXPECT_FALSE(e->has_method());
}

TEST(Throughput, ABatchOnAnotherTaskIsRefused) {
  auto e = engine();
  Stream s = stream(e->config().n_vocab, 1, 0.0);
  auto fidelity = make_task("fidelity", TaskParams{});
  ASSERT_TRUE(fidelity.ok());
  s.task = std::move(*fidelity);
  auto m = measure(*e, s, 2);
  ASSERT_FALSE(m.ok());
  EXPECT_EQ(m.message(), "a batch of 2 serves throughput tasks only, not 'fidelity'");
}

TEST(Throughput, APoissonRateOfZeroIsAnErrorNamingTheKey) {
  std::map<std::string, std::vector<ParamValue>> given = {{"arrival", {std::string("poisson")}}, {"rate", {0.0}}};
  auto task = make_task("throughput", TaskParams(given));
  ASSERT_FALSE(task.ok());
  EXPECT_EQ(task.message(),
            "task 'throughput' parameter 'rate': poisson arrivals need a rate above 0 requests per second");
}

// ---- experiment.batch in configs ----

Catalog catalog() {
  Catalog c;
  for (const auto& info : task_catalog()) c.tasks.push_back(info);
  c.plugins.push_back({"dense", "1.0.0", "full attention", 0, {}, "/plugins/libdense.so"});
  return c;
}

std::string config(const std::string& batch, const std::string& task = "throughput") {
  return "[experiment]\nname = \"b\"\n" + batch + "\n[model]\nname = \"smollm2-135m\"\n[task]\ntype = \"" + task +
         "\"\n";
}

TEST(ThroughputConfig, ABatchListIsAGridAxisInTheRunHash) {
  auto one = parse_experiment(config(""), "b.toml", catalog());
  auto listed = parse_experiment(config("batch = [1, 4]"), "b.toml", catalog());
  ASSERT_TRUE(one.ok()) << one.message();
  ASSERT_TRUE(listed.ok()) << listed.message();
  auto g1 = expand_grid(*one, catalog(), "sum");
  auto g2 = expand_grid(*listed, catalog(), "sum");
  ASSERT_TRUE(g1.ok() && g2.ok());
  ASSERT_EQ(g1->size(), 1u);
  ASSERT_EQ(g2->size(), 2u);
  EXPECT_EQ((*g2)[0].hash, (*g1)[0].hash);  // batch 1 keeps the hash a run had before batches
  EXPECT_NE((*g2)[1].hash, (*g1)[0].hash);
  EXPECT_EQ((*g2)[1].batch, 4);
  EXPECT_EQ((*g2)[1].label, "dense batch=4");
  EXPECT_NE((*g2)[1].config_json.find("\"batch\":4"), std::string::npos) << (*g2)[1].config_json;
}

TEST(ThroughputConfig, BadBatchesAreErrorsNamingTheKeyAndLine) {
  for (const auto& [text, message] :
       {std::pair{std::string("batch = 0"), std::string("b.toml:3:9: experiment.batch: 0 sequences per step: a batch "
                                                        "holds 1 to 4096")},
        std::pair{std::string("batch = -2"), std::string("b.toml:3:9: experiment.batch: -2 sequences per step: a "
                                                         "batch holds 1 to 4096")},
        std::pair{std::string("batch = [2, 2]"), std::string("b.toml:3:13: experiment.batch: 2 is listed twice")},
        std::pair{std::string("batch = \"8\""),
                  std::string("b.toml:3:9: experiment.batch: expected a whole number of sequences, got a string")}}) {
    auto parsed = parse_experiment(config(text), "b.toml", catalog());
    ASSERT_FALSE(parsed.ok()) << text;
    EXPECT_NE(parsed.message().find(message), std::string::npos) << parsed.message();
  }
  auto other = parse_experiment(config("batch = 4", "fidelity"), "b.toml", catalog());
  ASSERT_FALSE(other.ok());
  EXPECT_NE(other.message().find("experiment.batch: a batch above 1 serves throughput tasks only; [[task]] 1 is "
                                 "'fidelity'"),
            std::string::npos)
      << other.message();
}

}  // namespace test_throughput
}  // namespace inferlab
