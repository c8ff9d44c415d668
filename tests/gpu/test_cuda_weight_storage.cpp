// Projections stored in 4 bits on the CUDA backend. The kernels against their
// CPU twins: dequantization bit for bit (NF4, FP4, Int4, with and without
// double quantization), the fused GEMV within fp32 rounding for 1..4 rows,
// aligned and unaligned columns. The engine: the logits of the CPU backend
// through the same 4-bit weights within f16 rounding, with adapters on top;
// graph replays equal eager steps; the next run dense again.
#include <gtest/gtest.h>

#include "cpu/quant4.h"
#include "cuda/quant4.cuh"
#include "gpu_engine_support.h"
#include "gpu_test_support.h"
#include "plugin_test_support.h"
#include "storage_method.h"

namespace inferlab {
namespace test_cuda_weight_storage {

using gpu_test::make_engine;
using gpu_test::small_model;
using gpu_test::DeviceBuffer;
using gpu_test::normalized_error;
using gpu_test::random_floats;

namespace kc = kernels::cpu;

struct DeviceQuant4 {
  DeviceBuffer<uint8_t> codes, absmax_codes;
  DeviceBuffer<float> absmax, absmax_scale, map;
  kernels::cuda::Quant4View view;
  explicit DeviceQuant4(const kc::Quant4Tensor& q)
      : codes(q.codes), absmax_codes(q.absmax_codes), absmax(q.absmax), absmax_scale(q.absmax_scale),
        map(std::vector<float>(kc::dynamic_map_signed().begin(), kc::dynamic_map_signed().end())) {
    view.codes = codes.get();
    view.absmax = q.double_quant ? nullptr : absmax.get();
    view.absmax_codes = q.double_quant ? absmax_codes.get() : nullptr;
    view.absmax_scale = q.double_quant ? absmax_scale.get() : nullptr;
    view.dynamic_map = map.get();
    view.absmax_offset = q.absmax_offset;
    const auto levels = kc::quant4_levels(q.format);
    std::copy(levels.begin(), levels.end(), view.levels);
    view.block = q.block;
    view.n = q.rows * q.cols;
  }
};

TEST(CudaQuant4, KernelsMatchTheirCpuTwins) {
  INFERLAB_REQUIRE_GPU();
  for (const auto format : {kc::Quant4Format::NF4, kc::Quant4Format::FP4, kc::Quant4Format::Int4})
    for (const bool dq : {false, true})
      for (const int64_t cols : {576, 1536, 100}) {  // 100: not a multiple of 8 (the per-value path)
        SCOPED_TRACE(std::string(kc::quant4_name(format)) + (dq ? " dq" : "") + " cols " + std::to_string(cols));
        const int64_t rows = 300;
        const auto w = random_floats(size_t(rows * cols), 5, 0.02f);
        const auto q = kc::quant4_quantize(w.data(), rows, cols, format, 64, dq);
        DeviceQuant4 d(q);
        std::vector<float> want(w.size());
        kc::quant4_dequantize(q, want.data());
        DeviceBuffer<float> out(w.size());
        INFERLAB_CUDA_OK(kernels::cuda::quant4_dequantize(d.view, out.get(), kernels::DType::F32, nullptr));
        ASSERT_EQ(out.download(), want);
        std::vector<float> scratch;
        for (const int64_t m : {1, 2, 4}) {
          const auto x = random_floats(size_t(m * cols), 7 + uint64_t(m));
          std::vector<float> ref(size_t(m * rows));
          kc::quant4_matmul_xwt(ref.data(), x.data(), q, m, scratch);
          DeviceBuffer<float> dx(x), dy(ref.size());
          INFERLAB_CUDA_OK(
              kernels::cuda::quant4_gemv(d.view, dx.get(), kernels::DType::F32, dy.get(), m, rows, cols, nullptr));
          EXPECT_LT(normalized_error(dy.download(), ref), 1e-6) << "m = " << m;
        }
      }
}

TEST(CudaWeightStorage, FourBitWeightsMatchTheCpuBackend) {
  INFERLAB_REQUIRE_GPU();
  auto cpu = make_engine(small_model(), BackendKind::Cpu);
  auto gpu = make_engine(small_model(), BackendKind::Cuda);
  auto eager = make_engine(small_model(), BackendKind::Cuda, 16, GpuDType::F16, false);
  ASSERT_TRUE(cpu && gpu && eager);
  const ModelConfig& c = cpu->config();
  const auto tokens = test::random_tokens(c.n_vocab, 48, 23);
  auto dense = test::run_with_storage(*gpu, nullptr, tokens, 8);
  ASSERT_TRUE(dense.ok()) << dense.message();
  for (const auto format : {WeightFormat::NF4, WeightFormat::FP4, WeightFormat::Int4})
  for (const bool dq : {false, true})
    for (const bool lora : {false, true}) {
      SCOPED_TRACE(std::string(dq ? "double quantization" : "fp32 absmax") + (lora ? ", adapters" : "") +
                   ", format " + std::to_string(int(format)));
      const WeightStorage nf4{format, 64, dq};
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
      EXPECT_EQ(*b, *e) << "graph replays through 4-bit weights differ from eager steps";
      EXPECT_GT(replays, 0);
    }
  auto after = test::run_with_storage(*gpu, nullptr, tokens, 8);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(*after, *dense);
}

}  // namespace test_cuda_weight_storage
}  // namespace inferlab
