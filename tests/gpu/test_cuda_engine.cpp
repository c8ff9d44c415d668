// Whole-model CUDA vs CPU: the same tokens through both backends give the same
// logits (within f16/bf16 rounding), with and without CUDA graphs, for a small
// model, for the real default model when it is present, and for the first
// layers of 7B-shaped models; every method hook (driven by the probe plugin)
// gives the same logits on both backends; eviction frees device pages.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>

#include "engine/engine.h"
#include "gpu_engine_support.h"
#include "gpu_test_support.h"
#include "bound_reference_method.h"
#include "model/synthetic_model.h"
#include "plugin_test_support.h"

namespace inferlab {
namespace test_cuda_engine {

using gpu_test::make_engine;
using gpu_test::small_model;
using gpu_test::top1_agreement;

struct Comparison {
  double error = 0;
  double top1 = 0;
};

// Prefill `prompt_len` tokens, then `decode` forced tokens, on both backends.
Comparison compare_backends(std::shared_ptr<const Model> model, int prompt_len, int decode, int32_t page_size,
                            GpuDType dtype, bool graphs, const std::string& plugin = "",
                            const ParamValues& params = ParamValues{}) {
  auto cpu = make_engine(model, BackendKind::Cpu, page_size);
  auto gpu = make_engine(model, BackendKind::Cuda, page_size, dtype, graphs);
  if (!cpu || !gpu) return {1e9, 0};
  const auto tokens = test::random_tokens(model->config().n_vocab, prompt_len + decode, 11);
  const std::vector<int32_t> prompt(tokens.begin(), tokens.begin() + prompt_len);
  const std::vector<int32_t> forced(tokens.begin() + prompt_len, tokens.end());
  std::vector<float> logits[2];
  Engine* engines[2] = {cpu.get(), gpu.get()};
  for (int i = 0; i < 2; ++i) {
    test::ActiveMethod active;
    if (!plugin.empty()) active = test::activate_method(*engines[i], plugin, params);
    logits[i] = test::run_trace(*engines[i], active.handle.get(), prompt, decode, forced).logits;
  }
  EXPECT_EQ(logits[0].size(), logits[1].size());
  return {gpu_test::normalized_error(logits[1], logits[0]), top1_agreement(logits[1], logits[0], model->config().n_vocab)};
}

class CudaEngineVsCpu : public ::testing::TestWithParam<std::tuple<int, int, bool>> {};

TEST_P(CudaEngineVsCpu, SmallModelLogitsMatch) {
  INFERLAB_REQUIRE_GPU();
  const auto [prompt, page_size, graphs] = GetParam();
  const auto f16 = compare_backends(small_model(), prompt, 12, page_size, GpuDType::F16, graphs);
  EXPECT_LT(f16.error, 1e-2);
  EXPECT_GE(f16.top1, 0.95);
  const auto bf16 = compare_backends(small_model(), prompt, 12, page_size, GpuDType::BF16, graphs);
  EXPECT_LT(bf16.error, 4e-2);
  EXPECT_GE(bf16.top1, 0.9);
}

INSTANTIATE_TEST_SUITE_P(Shapes, CudaEngineVsCpu,
                         ::testing::Values(std::tuple{1, 16, true}, std::tuple{17, 16, true}, std::tuple{255, 16, false},
                                           std::tuple{300, 7, true}, std::tuple{1000, 16, true}),
                         [](const auto& info) {
                           return "prompt" + std::to_string(std::get<0>(info.param)) + "_page" +
                                  std::to_string(std::get<1>(info.param)) +
                                  (std::get<2>(info.param) ? "_graphs" : "_nographs");
                         });

TEST(CudaEngine, DecodeStepsReplayAGraphAndMatchTheUncapturedPath) {
  INFERLAB_REQUIRE_GPU();
  auto model = small_model();
  auto with = make_engine(model, BackendKind::Cuda, 16, GpuDType::F16, true);
  auto without = make_engine(model, BackendKind::Cuda, 16, GpuDType::F16, false);
  ASSERT_TRUE(with && without);
  const auto prompt = test::random_tokens(model->config().n_vocab, 40, 3);
  // Crossing 1024 keys makes the graph be captured again for a larger bound.
  const auto long_prompt = test::random_tokens(model->config().n_vocab, 1010, 3);
  const auto a = test::run_trace(*with, nullptr, long_prompt, 30).logits;
  const auto b = test::run_trace(*without, nullptr, long_prompt, 30).logits;
  EXPECT_LT(gpu_test::normalized_error(a, b), 1e-5);
  EXPECT_EQ(with->counters().graph_replays, 30);
  EXPECT_EQ(without->counters().graph_replays, 0);
  (void)prompt;
}

TEST(CudaEngine, RealDefaultModelMatchesCpu) {
  INFERLAB_REQUIRE_GPU();
  auto path = resolve_model("smollm2-135m");
  if (!path || !std::filesystem::exists(*path)) GTEST_SKIP() << "default model not present";
  auto model = Model::load(*path);
  ASSERT_TRUE(model.ok()) << model.message();
  const auto c = compare_backends(*model, 200, 20, 16, GpuDType::F16, true);
  EXPECT_LT(c.error, 2e-2);
  EXPECT_GE(c.top1, 0.95);
}

// The first two layers of 7B-shaped models (full width, vocabulary and head count).
class CudaEngine7B : public ::testing::TestWithParam<std::string> {};

TEST_P(CudaEngine7B, FirstLayersMatchCpu) {
  INFERLAB_REQUIRE_GPU();
  auto spec = synthetic_preset(GetParam(), 2);
  ASSERT_TRUE(spec.ok()) << spec.message();
  auto model = test::load_synthetic(*spec);
  ASSERT_NE(model, nullptr);
  const auto c = compare_backends(model, 64, 4, 16, GpuDType::F16, true);
  EXPECT_LT(c.error, 2e-2);
  EXPECT_GE(c.top1, 0.9);
}

INSTANTIATE_TEST_SUITE_P(Presets, CudaEngine7B, ::testing::Values("llama2-7b", "llama3-8b"),
                         [](const auto& info) {
                           std::string name = info.param;
                           std::replace(name.begin(), name.end(), '-', '_');
                           return name;
                         });

ParamValues params(std::initializer_list<std::pair<const std::string, ParamValue>> values) {
  return ParamValues(std::map<std::string, ParamValue>(values));
}

// Every hook's decision, carried out by both backends, gives the same logits.
class CudaHooks : public ::testing::TestWithParam<std::pair<std::string, ParamValues>> {};

TEST_P(CudaHooks, SameLogitsAsCpu) {
  INFERLAB_REQUIRE_GPU();
  const auto& [name, p] = GetParam();
  const auto c = compare_backends(small_model(), 40, 10, 4, GpuDType::F16, true, "probe", p);
  EXPECT_LT(c.error, 1e-2) << name;
  EXPECT_GE(c.top1, 0.95) << name;
}

INSTANTIATE_TEST_SUITE_P(
    Probe, CudaHooks,
    ::testing::Values(
        std::pair{std::string("evict_after_prefill"), params({{"evict_positions", std::string("4,5,6,7,21")}})},
        std::pair{std::string("evict_in_decode"),
                  params({{"evict_positions", std::string("5,30")}, {"evict_step", int64_t{2}}})},
        std::pair{std::string("cache_positions"),
                  params({{"evict_positions", std::string("4,5,6,7")}, {"cache_positions", true}})},
        std::pair{std::string("select_pages"), params({{"select_pages", std::string("0,2,3,7")}})},
        std::pair{std::string("select_tokens"), params({{"select_tokens", std::string("0,1,5,9,10,33")}})},
        std::pair{std::string("page_budget"), params({{"page_budget", int64_t{3}}})},
        std::pair{std::string("block_sparse_prefill"),
                  params({{"pattern_block", int64_t{8}}, {"pattern_window", int64_t{2}}})},
        std::pair{std::string("skip_layers_fill"), params({{"skip_layers", std::string("1")}})},
        std::pair{std::string("skip_layers_none"),
                  params({{"skip_layers", std::string("1")}, {"kv_fill", std::string("none")}})},
        std::pair{std::string("early_exit"), params({{"exit_after_layer", int64_t{0}}})},
        std::pair{std::string("mask_heads"), params({{"mask_heads", std::string("1,2")}})},
        std::pair{std::string("neuron_subset"), params({{"neuron_stride", int64_t{3}}})}),
    [](const auto& info) { return info.param.first; });

// The KV-cache method plugins on the CUDA backend decide as on the CPU: StreamingLLM
// and Quest exactly (positions; key bounds), H2O by attention mass, where f16
// rounding may flip a near-tie between two candidate heavy hitters.
struct KvMethodCase {
  std::string name, plugin;
  ParamValues params;
  double max_error, min_top1;
};

class CudaKvMethods : public ::testing::TestWithParam<KvMethodCase> {};

TEST_P(CudaKvMethods, SameLogitsAsCpu) {
  INFERLAB_REQUIRE_GPU();
  const KvMethodCase& m = GetParam();
  const auto c = compare_backends(small_model(), 120, 24, 16, GpuDType::F16, true, m.plugin, m.params);
  EXPECT_LT(c.error, m.max_error) << m.name;
  EXPECT_GE(c.top1, m.min_top1) << m.name;
}

INSTANTIATE_TEST_SUITE_P(
    Plugins, CudaKvMethods,
    ::testing::Values(
        KvMethodCase{"streamingllm", "streamingllm", params({{"sink_tokens", int64_t{4}}, {"window", int64_t{40}}}),
                     1e-2, 0.95},
        KvMethodCase{"streamingllm_original_positions", "streamingllm",
                     params({{"window", int64_t{40}}, {"positions", std::string("original")}}), 1e-2, 0.95},
        KvMethodCase{"quest", "quest", params({{"token_budget", int64_t{48}}, {"dense_layers", int64_t{1}}}), 1e-2,
                     0.95},
        // Each query head its own pages, the kv head reading their union (device selection and attention).
        KvMethodCase{"quest_per_head", "quest",
                     params({{"token_budget", int64_t{48}}, {"dense_layers", int64_t{1}},
                             {"gqa", std::string("per_head")}}),
                     1e-2, 0.95},
        KvMethodCase{"h2o", "h2o", params({{"heavy", int64_t{24}}, {"recent", int64_t{24}}}), 5e-2, 0.85}),
    [](const auto& info) { return info.param.name; });

// MInference's three patterns at 400 tokens (blocks of 16, small budgets):
// estimated on the device, built there, read by the sparse prefill kernel,
// against the CPU backend's. A-shape decides exactly as on the CPU; the
// estimated kinds may flip a near-tie of f16 scores at a budget's edge.
class CudaMInference : public ::testing::TestWithParam<KvMethodCase> {};

TEST_P(CudaMInference, SameLogitsAsCpu) {
  INFERLAB_REQUIRE_GPU();
  const KvMethodCase& m = GetParam();
  const auto c = compare_backends(small_model(), 400, 8, 16, GpuDType::F16, true, m.plugin, m.params);
  EXPECT_LT(c.error, m.max_error) << m.name;
  EXPECT_GE(c.top1, m.min_top1) << m.name;
}

ParamValues minference_params(const std::string& pattern) {
  return params({{"search", std::string("off")}, {"default_pattern", pattern}, {"kernel_block", int64_t{16}},
                 {"vertical", int64_t{40}}, {"slash", int64_t{60}}, {"last_q", int64_t{32}},
                 {"n_init", int64_t{16}}, {"n_local", int64_t{48}}, {"block_top_k", int64_t{5}}});
}

INSTANTIATE_TEST_SUITE_P(
    Patterns, CudaMInference,
    ::testing::Values(KvMethodCase{"stream_llm", "minference", minference_params("stream_llm"), 1e-2, 0.95},
                      KvMethodCase{"vertical_and_slash", "minference", minference_params("vertical_and_slash"), 5e-2,
                                   0.85},
                      KvMethodCase{"block_sparse", "minference", minference_params("block_sparse"), 5e-2, 0.85}),
    [](const auto& info) { return info.param.name; });

// The device's selection by key bound (page_bounds.cu) picks what a method
// computing the bounds itself from the (downloaded) keys picks, on the same
// backend, through eviction and a cloned sequence: same pages, same logits.
std::vector<float> bound_trace(test::BoundMethod& method, const std::vector<int32_t>& tokens, int32_t prompt,
                               EngineCounters* counters = nullptr, bool evicts = true) {
  auto engine = make_engine(small_model(), BackendKind::Cuda, 16);
  EXPECT_NE(engine, nullptr);
  if (engine == nullptr) return {};
  // Without the eviction hook a page-budget step is replayable.
  EXPECT_TRUE(engine->set_method(&method, evicts ? method.hooks() : method.hooks() & ~uint32_t(kHookEviction)).ok());
  method.begin_sequence(engine->shape());
  auto seq = engine->new_sequence();
  std::vector<float> out;
  auto keep = [&](Result<std::vector<float>> r) {
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.message());
    if (r.ok()) out.insert(out.end(), r->begin(), r->end());
  };
  keep(engine->prefill(*seq, std::vector<int32_t>(tokens.begin(), tokens.begin() + prompt)));
  for (size_t i = size_t(prompt); i < tokens.size(); ++i) keep(engine->decode(*seq, tokens[i]));
  auto copy = seq->clone();
  for (size_t i = size_t(prompt); i < tokens.size(); ++i) keep(engine->decode(*copy, tokens[i]));
  if (counters != nullptr) *counters = engine->counters();
  return out;
}

TEST(CudaPageBudget, DeviceSelectsWhatTheReferenceSelects) {
  INFERLAB_REQUIRE_GPU();
  const auto tokens = test::random_tokens(small_model()->config().n_vocab, 300 + 12, 21);
  for (const auto& [budget, drop] : {std::pair{3, std::set<int32_t>{}}, std::pair{8, std::set<int32_t>{}},
                                     std::pair{5, std::set<int32_t>{40, 41, 200}}}) {
    // The reference sums scores in the scoring kernel's order: no near tie can fall differently.
    test::BoundMethod device(true, budget, drop, 2), reference(false, budget, drop, 2, true);
    const auto got = bound_trace(device, tokens, 300), want = bound_trace(reference, tokens, 300);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LT(gpu_test::normalized_error(got, want), 1e-6) << "budget " << budget;
  }
}

// Per query head: the device's scores per head, top-k per head and union give
// what the reference computes from the keys (select_kv with head masks), with
// graphs replaying the device's steps, and the same traffic counters (the
// union, read back from the device after each step or replay).
TEST(CudaPageBudget, PerQueryHeadDeviceSelectsWhatTheReferenceSelects) {
  INFERLAB_REQUIRE_GPU();
  const auto tokens = test::random_tokens(small_model()->config().n_vocab, 300 + 12, 22);
  for (const auto& [budget, drop] : {std::pair{3, std::set<int32_t>{}}, std::pair{8, std::set<int32_t>{}},
                                     std::pair{5, std::set<int32_t>{40, 41, 200}}}) {
    // The reference sums scores in the per-head scoring kernel's order.
    test::BoundMethod device(true, budget, drop, 2, false, true), reference(false, budget, drop, 2, true, true);
    EngineCounters got_counters, want_counters;
    const bool evicts = !drop.empty();
    const auto got = bound_trace(device, tokens, 300, &got_counters, evicts);
    const auto want = bound_trace(reference, tokens, 300, &want_counters, evicts);
    ASSERT_EQ(got.size(), want.size());
    EXPECT_LT(gpu_test::normalized_error(got, want), 1e-6) << "budget " << budget;
    if (!evicts) {
      EXPECT_GT(got_counters.graph_replays, 0) << "budget " << budget;
    }
    EXPECT_EQ(got_counters.decode_pages_read, want_counters.decode_pages_read) << "budget " << budget;
    EXPECT_EQ(got_counters.decode_keys_read, want_counters.decode_keys_read) << "budget " << budget;
  }
}

TEST(CudaEngine, EvictionFreesDevicePages) {
  INFERLAB_REQUIRE_GPU();
  auto model = small_model();
  const auto& c = model->config();
  auto engine = make_engine(model, BackendKind::Cuda, 4);
  ASSERT_NE(engine, nullptr);
  test::ActiveMethod active = test::activate_method(*engine, "probe", params({{"evict_positions", std::string("4,5,6,7,9")}}));
  ASSERT_NE(active.handle.get(), nullptr);
  auto seq = engine->new_sequence();
  active.handle->begin_sequence(engine->shape());
  ASSERT_TRUE(engine->prefill(*seq, test::random_tokens(c.n_vocab, 20, 3)).ok());
  // 20 tokens - 5 evicted = 15 stored: 4 pages of 4 per (layer, kv head) instead of 5.
  EXPECT_EQ(engine->pool().pages_in_use(), int64_t(c.n_layers) * c.n_kv_heads * 4);
  EXPECT_EQ(engine->pool().bytes_in_use(), engine->pool().pages_in_use() * 2 * 4 * c.head_dim * 2);
}

TEST(CudaEngine, RandomSevenBillionShapeRunsADecodeStep) {
  INFERLAB_REQUIRE_GPU();
  auto spec = synthetic_preset("llama2-7b", 4);
  ASSERT_TRUE(spec.ok());
  EngineOptions options;
  options.backend = BackendKind::Cuda;
  auto engine = Engine::create_random(synthetic_config(*spec), 7, options);
  ASSERT_TRUE(engine.ok()) << engine.message();
  auto seq = (*engine)->new_sequence();
  auto logits = (*engine)->prefill(*seq, test::random_tokens(32000, 100, 1));
  ASSERT_TRUE(logits.ok()) << logits.message();
  auto next = (*engine)->decode(*seq, 17);
  ASSERT_TRUE(next.ok()) << next.message();
  for (float x : *next) ASSERT_TRUE(std::isfinite(x));
}

}  // namespace test_cuda_engine
}  // namespace inferlab
