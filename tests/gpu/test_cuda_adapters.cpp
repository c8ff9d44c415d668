// Unmerged low-rank adapters on the CUDA backend: the logits of the CPU
// backend within f16 rounding, those of the merged weights alike, decode steps
// replayed from graphs equal to eager ones, and the next run dense again.
#include <gtest/gtest.h>

#include "adapter_method.h"
#include "gpu_engine_support.h"
#include "gpu_test_support.h"
#include "plugin_test_support.h"

namespace inferlab {
namespace {

using gpu_test::make_engine;
using gpu_test::small_model;

TEST(CudaAdapters, UnmergedMatchTheCpuAndTheMergedWeights) {
  INFERLAB_REQUIRE_GPU();
  auto cpu = make_engine(small_model(), BackendKind::Cpu);
  auto gpu = make_engine(small_model(), BackendKind::Cuda);
  auto eager = make_engine(small_model(), BackendKind::Cuda, 16, GpuDType::F16, false);
  ASSERT_TRUE(cpu && gpu && eager);
  const ModelConfig& c = cpu->config();
  const auto tokens = test::random_tokens(c.n_vocab, 48, 21);
  auto dense = test::run_with_adapters(*gpu, nullptr, tokens, 8);
  ASSERT_TRUE(dense.ok()) << dense.message();

  test::AdapterMethod on_cpu(test::adapters_on_every_projection(c)), on_gpu(test::adapters_on_every_projection(c)),
      merged(test::adapters_on_every_projection(c), true), on_eager(test::adapters_on_every_projection(c));
  auto a = test::run_with_adapters(*cpu, &on_cpu, tokens, 8);
  gpu->reset_counters();
  auto b = test::run_with_adapters(*gpu, &on_gpu, tokens, 8);
  const int64_t replays = gpu->counters().graph_replays;
  auto m = test::run_with_adapters(*gpu, &merged, tokens, 8);
  auto e = test::run_with_adapters(*eager, &on_eager, tokens, 8);
  ASSERT_TRUE(a.ok() && b.ok() && m.ok() && e.ok()) << (b.ok() ? "" : b.message());
  EXPECT_GT(test::normalized_max_error(*b, *dense), 1e-2) << "the adapters change nothing";
  EXPECT_LT(test::normalized_max_error(*b, *a), 1e-2);
  EXPECT_LT(test::normalized_max_error(*b, *m), 1e-2);
  EXPECT_EQ(*b, *e) << "graph replays with adapters differ from eager steps";
  EXPECT_GT(replays, 0) << "decode steps with adapters should be replayed from graphs";
  auto after = test::run_with_adapters(*gpu, nullptr, tokens, 8);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(*after, *dense);
}

}  // namespace
}  // namespace inferlab
