// Projections stored in NF4 on the CUDA backend: the logits of the CPU backend
// through the same 4-bit weights within f16 rounding, with and without double
// quantization and with adapters on top; graph replays equal eager steps; the
// next run dense again.
#include <gtest/gtest.h>

#include "gpu_engine_support.h"
#include "gpu_test_support.h"
#include "plugin_test_support.h"
#include "storage_method.h"

namespace inferlab {
namespace {

using gpu_test::make_engine;
using gpu_test::small_model;

TEST(CudaWeightStorage, Nf4MatchesTheCpuBackend) {
  INFERLAB_REQUIRE_GPU();
  auto cpu = make_engine(small_model(), BackendKind::Cpu);
  auto gpu = make_engine(small_model(), BackendKind::Cuda);
  auto eager = make_engine(small_model(), BackendKind::Cuda, 16, GpuDType::F16, false);
  ASSERT_TRUE(cpu && gpu && eager);
  const ModelConfig& c = cpu->config();
  const auto tokens = test::random_tokens(c.n_vocab, 48, 23);
  auto dense = test::run_with_storage(*gpu, nullptr, tokens, 8);
  ASSERT_TRUE(dense.ok()) << dense.message();
  for (const bool dq : {false, true})
    for (const bool lora : {false, true}) {
      SCOPED_TRACE(std::string(dq ? "double quantization" : "fp32 absmax") + (lora ? ", adapters" : ""));
      const WeightStorage nf4{WeightFormat::NF4, 64, dq};
      const auto adapters = lora ? test::adapters_on_every_projection(c) : std::vector<test::AdapterSpec>{};
      test::StorageMethod on_cpu(nf4, false, 2.0f, adapters), on_gpu(nf4, false, 2.0f, adapters),
          on_eager(nf4, false, 2.0f, adapters);
      auto a = test::run_with_storage(*cpu, &on_cpu, tokens, 8);
      gpu->reset_counters();
      auto b = test::run_with_storage(*gpu, &on_gpu, tokens, 8);
      const int64_t replays = gpu->counters().graph_replays;
      auto e = test::run_with_storage(*eager, &on_eager, tokens, 8);
      ASSERT_TRUE(a.ok() && b.ok() && e.ok()) << (b.ok() ? "" : b.message());
      EXPECT_GT(test::normalized_max_error(*b, *dense), 1e-2);
      EXPECT_LT(test::normalized_max_error(*b, *a), 1e-2);
      EXPECT_EQ(*b, *e) << "graph replays through NF4 weights differ from eager steps";
      EXPECT_GT(replays, 0);
    }
  auto after = test::run_with_storage(*gpu, nullptr, tokens, 8);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(*after, *dense);
}

}  // namespace
}  // namespace inferlab
