// Unmerged low-rank adapters on the CUDA backend: the fused one-launch kernel
// of decode-sized calls against plain loops (f32, 1-4 rows, ranks 1-300); the
// logits of the CPU backend within f16 rounding, those of the merged weights
// alike, decode steps replayed from graphs equal to eager ones, and the next
// run dense again.
#include <gtest/gtest.h>

#include "adapter_method.h"
#include "cuda/lora.cuh"
#include "gpu_engine_support.h"
#include "gpu_test_support.h"
#include "plugin_test_support.h"

namespace inferlab {
namespace test_cuda_adapters {

using gpu_test::make_engine;
using gpu_test::small_model;

TEST(CudaAdapters, TheFusedKernelMatchesPlainLoops) {
  INFERLAB_REQUIRE_GPU();
  using gpu_test::DeviceBuffer;
  for (const int64_t rank : {1, 8, 64, 300})
    for (const int64_t m : {1, 2, 4})
      for (const auto& [in, out] : {std::pair<int64_t, int64_t>{576, 192}, {576, 1536}, {1536, 576}}) {
        SCOPED_TRACE("rank " + std::to_string(rank) + " rows " + std::to_string(m) + " " + std::to_string(in) + "x" +
                     std::to_string(out));
        const auto x = gpu_test::random_floats(size_t(m * in), 1);
        const auto a = gpu_test::random_floats(size_t(rank * in), 2, 0.05f);
        const auto b = gpu_test::random_floats(size_t(out * rank), 3, 0.05f);
        const auto y0 = gpu_test::random_floats(size_t(m * out), 4);
        std::vector<float> want = y0;
        for (int64_t row = 0; row < m; ++row)
          for (int64_t k = 0; k < rank; ++k) {
            double t = 0;
            for (int64_t j = 0; j < in; ++j) t += double(a[size_t(k * in + j)]) * x[size_t(row * in + j)];
            for (int64_t o = 0; o < out; ++o) want[size_t(row * out + o)] += float(double(b[size_t(o * rank + k)]) * t);
          }
        DeviceBuffer<float> dx(x), da(a), db(b), dy(y0);
        INFERLAB_CUDA_OK(kernels::cuda::lora_apply_fused(dx.get(), da.get(), db.get(), kernels::DType::F32, dy.get(), m,
                                                         in, out, rank, nullptr));
        EXPECT_LT(gpu_test::normalized_error(dy.download(), want), 1e-5);
      }
}

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

}  // namespace test_cuda_adapters
}  // namespace inferlab
