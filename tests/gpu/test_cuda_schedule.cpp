// The one forward schedule on the CUDA backend: each path the schedule drives,
// eager and replayed from a graph, per plugin; a projection replaced for one
// run (a load-only method, whose step is replayed) changes CUDA decode as it
// changes CPU decode; truncation then decode equals a fresh run; engine-side
// retention matches a method keeping the scores itself on the same backend;
// the traffic counters equal the CPU backend's; the CUDA backend refuses what
// it lacks before any token.
#include <gtest/gtest.h>

#include "bound_reference_method.h"
#include "gpu_engine_support.h"
#include "gpu_test_support.h"
#include "mixed_blocks_method.h"
#include "plugin_test_support.h"
#include "retention_reference_method.h"

namespace inferlab {
namespace test_cuda_schedule {

using gpu_test::make_engine;
using gpu_test::small_model;

ParamValues params(std::initializer_list<std::pair<const std::string, ParamValue>> values) {
  return ParamValues(std::map<std::string, ParamValue>(values));
}

// A method with only a load hook: it replaces projections for its runs. Its
// decode steps need nothing from the host, so they are replayed from graphs,
// which must carry the replaced weights.
class Scaler final : public Method {
 public:
  Status on_load(const LoadContext& ctx) override {
    for (const auto& [tensor, layer, by] : {std::tuple{"attn_q", 1, 0.5f}, std::tuple{"ffn_down", 0, 1.5f}}) {
      const auto w = ctx.weights->tensor(tensor, layer);
      std::vector<float> scaled(w.begin(), w.end());
      for (float& x : scaled) x *= by;
      if (auto s = ctx.overrides->replace(tensor, layer, scaled); !s) return s;
    }
    return ok_status();
  }
};

struct Traced {
  std::vector<float> logits;
  EngineCounters counters;
};

// Prefill then forced decode steps with `method` (null: dense) installed with its overrides.
Traced trace(Engine& engine, Method* method, uint32_t hooks, const std::vector<int32_t>& tokens, int prompt) {
  WeightOverrides overrides;
  if (method != nullptr && (hooks & kHookLoad) != 0) {
    const PluginEntry entry{"scaler", "1", "", kHookLoad, {}, ""};
    EXPECT_TRUE(load_method(*method, entry, engine, test::temp_path("artifacts"), &overrides).ok());
  }
  EXPECT_TRUE(engine.set_method(method, hooks, &overrides).ok());
  engine.reset_counters();
  const std::vector<int32_t> head(tokens.begin(), tokens.begin() + prompt), forced(tokens.begin() + prompt, tokens.end());
  Traced out{test::run_trace(engine, method, head, int(forced.size()), forced).logits, engine.counters()};
  (void)engine.set_method(nullptr, 0);
  return out;
}

TEST(CudaSchedule, AReplacedProjectionChangesReplayedDecodeAsOnTheCpu) {
  INFERLAB_REQUIRE_GPU();
  auto model = small_model();
  const auto tokens = test::random_tokens(model->config().n_vocab, 60, 12);
  auto cpu = make_engine(model, BackendKind::Cpu);
  auto graphs = make_engine(model, BackendKind::Cuda, 16, GpuDType::F16, true);
  auto eager = make_engine(model, BackendKind::Cuda, 16, GpuDType::F16, false);
  ASSERT_TRUE(cpu && graphs && eager);
  Scaler a, b, c;
  const Traced on_cpu = trace(*cpu, &a, kHookLoad, tokens, 40);
  const Traced replayed = trace(*graphs, &b, kHookLoad, tokens, 40);
  const Traced stepped = trace(*eager, &c, kHookLoad, tokens, 40);
  const Traced dense = trace(*graphs, nullptr, 0, tokens, 40);
  EXPECT_EQ(replayed.counters.graph_replays, 20);
  EXPECT_LT(gpu_test::normalized_error(replayed.logits, stepped.logits), 1e-5);
  EXPECT_LT(gpu_test::normalized_error(replayed.logits, on_cpu.logits), 1e-2);
  EXPECT_GT(gpu_test::normalized_error(replayed.logits, dense.logits), 1e-2);  // the change is there
  // ... and only for that method's runs.
  const Traced dense_again = trace(*graphs, nullptr, 0, tokens, 40);
  EXPECT_LT(gpu_test::normalized_error(dense_again.logits, dense.logits), 1e-6);
}

// Eager steps and graph replays give the same logits for every plugin; the
// steps of methods that change the cache mid-step (eviction) run eagerly.
struct GraphCase {
  std::string name, plugin;
  ParamValues params;
  bool replayed;
};

class CudaGraphsPerPlugin : public ::testing::TestWithParam<GraphCase> {};

TEST_P(CudaGraphsPerPlugin, ReplayGivesTheEagerLogits) {
  INFERLAB_REQUIRE_GPU();
  const GraphCase& c = GetParam();
  auto model = small_model();
  const auto tokens = test::random_tokens(model->config().n_vocab, 300 + 24, 4);
  std::vector<float> logits[2];
  int64_t replays[2] = {0, 0};
  for (int graphs = 0; graphs < 2; ++graphs) {
    auto engine = make_engine(model, BackendKind::Cuda, 16, GpuDType::F16, graphs == 1);
    ASSERT_NE(engine, nullptr);
    test::ActiveMethod active;
    if (!c.plugin.empty()) active = test::activate_method(*engine, c.plugin, c.params);
    engine->reset_counters();
    const std::vector<int32_t> prompt(tokens.begin(), tokens.begin() + 300), forced(tokens.begin() + 300, tokens.end());
    logits[graphs] = test::run_trace(*engine, active.handle.get(), prompt, 24, forced).logits;
    replays[graphs] = engine->counters().graph_replays;
  }
  EXPECT_EQ(replays[0], 0);
  if (c.replayed) {
    EXPECT_GE(replays[1], 22) << c.name;  // the first step after prefill may rebuild key bounds eagerly
  } else {
    EXPECT_EQ(replays[1], 0) << c.name;
  }
  EXPECT_LT(gpu_test::normalized_error(logits[1], logits[0]), 1e-5) << c.name;
}

INSTANTIATE_TEST_SUITE_P(
    Plugins, CudaGraphsPerPlugin,
    ::testing::Values(
        GraphCase{"dense", "", ParamValues{}, true}, GraphCase{"dense_plugin", "dense", ParamValues{}, true},
        GraphCase{"quest", "quest", params({{"token_budget", int64_t{64}}, {"dense_layers", int64_t{1}}}), true},
        GraphCase{"quest_own_pages", "quest", params({{"token_budget", int64_t{64}}, {"page_size", int64_t{8}}}), false},
        GraphCase{"streamingllm", "streamingllm", params({{"window", int64_t{64}}}), false},
        GraphCase{"h2o", "h2o", params({{"heavy", int64_t{32}}, {"recent", int64_t{32}}}), false}),
    [](const auto& info) { return info.param.name; });

TEST(CudaSchedule, TruncateThenDecodingAgainEqualsAFreshRun) {
  INFERLAB_REQUIRE_GPU();
  auto model = small_model();
  const auto tokens = test::random_tokens(model->config().n_vocab, 120, 8);
  for (bool bounds : {false, true}) {
    SCOPED_TRACE(bounds ? "page budget" : "dense");
    test::BoundMethod method(true, 3);
    auto engine = make_engine(model, BackendKind::Cuda);
    ASSERT_NE(engine, nullptr);
    if (bounds) {
      ASSERT_TRUE(engine->set_method(&method, method.hooks()).ok());
    }
    method.begin_sequence(engine->shape());
    auto seq = engine->new_sequence(), ref = engine->new_sequence();
    ASSERT_TRUE(engine->prefill(*seq, std::vector<int32_t>(tokens.begin(), tokens.begin() + 90)).ok());
    ASSERT_TRUE(engine->prefill(*ref, std::vector<int32_t>(tokens.begin(), tokens.begin() + 90)).ok());
    for (int i = 90; i < 105; ++i) ASSERT_TRUE(engine->decode(*seq, tokens[size_t(i)]).ok());
    ASSERT_TRUE(engine->truncate(*seq, 93).ok());
    for (int i = 90; i < 93; ++i) ASSERT_TRUE(engine->decode(*ref, tokens[size_t(i)]).ok());
    std::vector<float> again, fresh;
    for (int i = 105; i < 115; ++i) {
      auto x = engine->decode(*seq, tokens[size_t(i)]), y = engine->decode(*ref, tokens[size_t(i)]);
      ASSERT_TRUE(x.ok() && y.ok());
      again.insert(again.end(), x->begin(), x->end());
      fresh.insert(fresh.end(), y->begin(), y->end());
    }
    EXPECT_LT(gpu_test::normalized_error(again, fresh), 1e-5);
  }
}

TEST(CudaSchedule, RetentionMatchesAMethodKeepingTheScoresItself) {
  INFERLAB_REQUIRE_GPU();
  auto model = small_model();
  const auto tokens = test::random_tokens(model->config().n_vocab, 200, 5);
  for (const auto& [budget, score] : {std::pair{RetentionBudget{0, 24, 24}, RetentionScore::AccumulatedMass},
                                      std::pair{RetentionBudget{4, 16, 20}, RetentionScore::LastMass}}) {
    std::vector<std::vector<int32_t>> positions[2];
    std::vector<float> logits[2];
    for (int engine_side = 0; engine_side < 2; ++engine_side) {
      test::RetentionMethod method(engine_side == 1, budget, score);
      auto engine = make_engine(model, BackendKind::Cuda);
      ASSERT_NE(engine, nullptr);
      ASSERT_TRUE(engine->set_method(&method, method.hooks()).ok());
      const std::vector<int32_t> prompt(tokens.begin(), tokens.begin() + 150), forced(tokens.begin() + 150, tokens.end());
      logits[engine_side] = test::run_trace(*engine, &method, prompt, 50, forced).logits;
      EXPECT_GT(engine->counters().tokens_evicted, 0);
    }
    // The same device mass, added in float in the same order: the same tokens stay.
    EXPECT_LT(gpu_test::normalized_error(logits[1], logits[0]), 1e-6);
  }
}

// Retention per sequence on the device: tokens dropped at a shallower layer
// leave before the deeper layers' attention, rows pruned inside the prefill
// call stop there; the queries read exactly what the device's own choices left
// them (the double-precision reference told those choices), and the CPU
// backend prunes as many rows.
TEST(CudaSchedule, SequenceRetentionReadsWhatTheCascadeLeft) {
  INFERLAB_REQUIRE_GPU();
  auto model = small_model();
  const auto tokens = test::random_tokens(model->config().n_vocab, 200, 15);
  const std::vector<RetentionBudget> budgets = {{4, 16, 40}, {4, 16, 24}, {4, 16, 12}};  // deeper layers keep fewer
  const int32_t prefill = 150;
  auto engine = make_engine(model, BackendKind::Cuda);
  ASSERT_NE(engine, nullptr);
  test::SequenceRetentionMethod method(budgets);
  ASSERT_TRUE(engine->set_method(&method, method.hooks()).ok());
  auto seq = engine->new_sequence();
  test::CascadeTrace trace;
  std::vector<float> got;
  std::vector<int64_t> rows;
  ASSERT_TRUE(trace.run(*engine, *seq, tokens, prefill, rows, got).ok());
  EXPECT_GT(engine->counters().rows_pruned, 0);
  const auto want = test::naive_forward(*model, tokens, trace.policy());
  const size_t v = size_t(model->config().n_vocab);
  std::vector<float> want_rows;
  for (int64_t p : rows)
    for (size_t x = size_t(p) * v; x < size_t(p + 1) * v; ++x) want_rows.push_back(float(want[x]));
  EXPECT_LT(gpu_test::normalized_error(got, want_rows), 1e-2);
}

TEST(CudaSchedule, CountersEqualTheCpuBackends) {
  INFERLAB_REQUIRE_GPU();
  auto model = small_model();
  const auto& c = model->config();
  const auto tokens = test::random_tokens(c.n_vocab, 140, 6);
  for (const auto& [plugin, p] :
       {std::pair{std::string("dense"), ParamValues{}},
        std::pair{std::string("quest"), params({{"token_budget", int64_t{48}}, {"dense_layers", int64_t{1}}})},
        std::pair{std::string("probe"), params({{"select_tokens", std::string("0,3,4,5,60")}})},
        std::pair{std::string("streamingllm"), params({{"window", int64_t{40}}})}}) {
    EngineCounters counted[2];
    int i = 0;
    for (BackendKind backend : {BackendKind::Cpu, BackendKind::Cuda}) {
      auto engine = make_engine(model, backend);
      ASSERT_NE(engine, nullptr);
      test::ActiveMethod active = test::activate_method(*engine, plugin, p);
      engine->reset_counters();
      const std::vector<int32_t> prompt(tokens.begin(), tokens.begin() + 120), forced(tokens.begin() + 120, tokens.end());
      (void)test::run_trace(*engine, active.handle.get(), prompt, 20, forced);
      counted[i++] = engine->counters();
    }
    EXPECT_EQ(counted[0].decode_keys_read, counted[1].decode_keys_read) << plugin;
    EXPECT_EQ(counted[0].decode_pages_read, counted[1].decode_pages_read) << plugin;
    EXPECT_EQ(counted[0].decode_keys_cached, counted[1].decode_keys_cached) << plugin;
    EXPECT_EQ(counted[0].tokens_evicted, counted[1].tokens_evicted) << plugin;
    EXPECT_EQ(counted[1].decode_kv_bytes_read, counted[0].decode_kv_bytes_read / 2) << plugin;  // f16 rows, f32 on the CPU
  }
}

// Prefill patterns of block sizes 8 and 4 on different heads, each head's plan
// at its own block size, run through the sparse prefill kernel as on the CPU.
TEST(CudaSchedule, MixedBlockSizesGiveTheCpuLogits) {
  INFERLAB_REQUIRE_GPU();
  auto model = small_model();
  const auto tokens = test::random_tokens(model->config().n_vocab, 200, 13);
  std::vector<float> logits[2];
  int i = 0;
  for (BackendKind backend : {BackendKind::Cpu, BackendKind::Cuda}) {
    test::MixedBlocks method(false, 256);
    auto engine = make_engine(model, backend);
    ASSERT_NE(engine, nullptr);
    ASSERT_TRUE(engine->set_method(&method, kHookPrefillPattern).ok());
    auto seq = engine->new_sequence();
    auto& out = logits[i++];
    ASSERT_TRUE(engine->forward(*seq, tokens, 0, [&](int64_t, std::span<const float> l) {
      out.insert(out.end(), l.begin(), l.end());
    }).ok());
  }
  EXPECT_LT(gpu_test::normalized_error(logits[1], logits[0]), 1e-2);
  EXPECT_GE(gpu_test::top1_agreement(logits[1], logits[0], model->config().n_vocab), 0.95);
}

TEST(CudaSchedule, RefusesF32PagesBeforeAnyToken) {
  INFERLAB_REQUIRE_GPU();
  auto engine = make_engine(small_model(), BackendKind::Cuda);
  ASSERT_NE(engine, nullptr);
  auto handle = test::plugin_registry().create("probe", params({{"kv_pages", std::string("f32")}}));
  ASSERT_TRUE(handle.ok());
  auto s = engine->set_method(handle->get(), kAllHooks, nullptr, "probe");
  ASSERT_FALSE(s.ok());
  EXPECT_EQ(s.message(), "method probe needs KV pages in f32, which the cuda backend does not support");
  auto f16 = test::plugin_registry().create("probe", params({{"kv_pages", std::string("f16")}}));
  ASSERT_TRUE(f16.ok());
  EXPECT_TRUE(engine->set_method(f16->get(), kAllHooks).ok());
  EXPECT_EQ(engine->counters().forward_calls, 0);
}

}  // namespace test_cuda_schedule
}  // namespace inferlab
