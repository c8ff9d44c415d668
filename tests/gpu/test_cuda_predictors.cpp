// Predicted components on the CUDA backend (Method::component_predictors):
// the kernels against their CPU twins (kernels/cpu/predictors.h) and the head
// subset helpers against a host loop; the engine with predictors against the
// same choices made on the host (mask_components) and against the CPU backend,
// graph replays equal to eager steps (the choices stay on the device, the
// predictors on a side stream), every neuron and head kept equal to dense.
#include <gtest/gtest.h>

#include <limits>
#include <map>

#include "cpu/predictors.h"
#include "cuda/predictors.cuh"
#include "gpu_engine_support.h"
#include "gpu_kernel_support.h"
#include "gpu_test_support.h"
#include "inferlab/testing.h"
#include "predictor_method.h"

namespace inferlab {
namespace test_cuda_predictors {

namespace kc = kernels::cuda;
namespace cpu = kernels::cpu;
using gpu_test::DeviceBuffer;
using kernels::DType;

TEST(CudaPredictors, TheInputAndLayersMatchTheirTwins) {
  INFERLAB_REQUIRE_GPU();
  for (const auto& [rows, in, out] : {std::tuple<int64_t, int64_t, int64_t>{1, 576, 128}, {1, 128, 1536},
                                      {3, 4096, 128}, {1, 100, 37}}) {
    SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(in) + "x" + std::to_string(out));
    const auto x = gpu_test::random_floats(size_t(rows * in), 1), w = gpu_test::random_floats(size_t(out * in), 2),
               b = gpu_test::random_floats(size_t(out), 3);
    std::vector<float> scaled(x.size()), want(size_t(rows * out));
    cpu::rms_scale_rows(scaled.data(), x.data(), rows, in, 1e-5f);
    DeviceBuffer<float> dx(x), dscaled(x.size()), dw(w), db(b), dy(size_t(rows * out));
    INFERLAB_CUDA_OK(kc::rms_scale_rows(dx.get(), rows, in, 1e-5f, dscaled.get(), nullptr));
    INFERLAB_CUDA_OK(cudaDeviceSynchronize());
    EXPECT_LT(gpu_test::normalized_error(dscaled.download(), scaled), 1e-6);
    for (const bool relu : {false, true}) {
      cpu::predictor_layer(want.data(), scaled.data(), w.data(), b.data(), rows, in, out, relu);
      dscaled.upload(scaled);
      INFERLAB_CUDA_OK(kc::predictor_layer(dscaled.get(), dw.get(), db.get(), rows, in, out, relu, dy.get(), nullptr));
      INFERLAB_CUDA_OK(cudaDeviceSynchronize());
      EXPECT_LT(gpu_test::normalized_error(dy.download(), want), 1e-5) << "relu " << relu;
      std::vector<float> bare(want.size());
      cpu::predictor_layer(bare.data(), scaled.data(), w.data(), nullptr, rows, in, out, false);
      DeviceBuffer<float> dbare(bare);
      INFERLAB_CUDA_OK(kc::bias_relu_rows(dbare.get(), rows, out, db.get(), relu, nullptr));
      INFERLAB_CUDA_OK(cudaDeviceSynchronize());
      EXPECT_LT(gpu_test::normalized_error(dbare.download(), want), 1e-6) << "bias and relu after cuBLAS";
    }
  }
}

TEST(CudaPredictors, TopKFlagsAndListsMatchTheirTwins) {
  INFERLAB_REQUIRE_GPU();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  for (const int64_t n : {int64_t(9), int64_t(37), int64_t(1536), int64_t(11008)}) {
    for (const int64_t rows : {int64_t(1), int64_t(5)}) {
      auto logits = gpu_test::random_floats(size_t(rows * n), uint64_t(n + rows));
      for (int64_t i = 0; i + 3 < int64_t(logits.size()); i += 7) logits[size_t(i + 1)] = logits[size_t(i)];  // ties
      logits[2] = nan;
      logits[size_t(n - 1)] = -std::numeric_limits<float>::infinity();
      for (const int32_t k : {1, 3, int32_t(n / 4), int32_t(n - 1), int32_t(n)}) {
        SCOPED_TRACE("n " + std::to_string(n) + " rows " + std::to_string(rows) + " k " + std::to_string(k));
        std::vector<uint8_t> want(size_t(n), 0);
        cpu::top_k_flags(want.data(), logits.data(), rows, n, k);
        std::vector<int32_t> want_list(static_cast<size_t>(n));
        want_list.resize(size_t(cpu::flags_to_list(want_list.data(), want.data(), n)));
        DeviceBuffer<float> dl(logits);
        DeviceBuffer<uint8_t> flags(std::vector<uint8_t>(size_t(n), 0));
        DeviceBuffer<int32_t> list(static_cast<size_t>(n)), count(std::vector<int32_t>{-1});
        INFERLAB_CUDA_OK(kc::top_k_flags(dl.get(), rows, n, k, flags.get(), nullptr));
        INFERLAB_CUDA_OK(kc::flags_to_list(flags.get(), n, list.get(), count.get(), nullptr));
        INFERLAB_CUDA_OK(cudaDeviceSynchronize());
        EXPECT_EQ(flags.download(), want);
        ASSERT_EQ(count.download()[0], int32_t(want_list.size()));
        auto got = list.download();
        got.resize(want_list.size());
        EXPECT_EQ(got, want_list);
      }
    }
  }
}

TEST(CudaPredictors, HeadSubsetsGoToAndFromTheirColumns) {
  INFERLAB_REQUIRE_GPU();
  const int32_t heads = 8, hd = 64, rows = 3, qd = heads * hd;
  const std::vector<int32_t> listed = {1, 4, 6};
  const int32_t k = int32_t(listed.size());
  DeviceBuffer<int32_t> dlist(listed), drows(size_t(k * hd));
  INFERLAB_CUDA_OK(kc::head_rows(dlist.get(), k, hd, drows.get(), nullptr));
  const auto attn = gpu_test::random_floats(size_t(rows * qd), 4);
  DeviceBuffer<float> dattn(attn), compact(size_t(rows * k * hd)), q(std::vector<float>(size_t(rows * qd), 7.0f));
  INFERLAB_CUDA_OK(kc::gather_head_columns(dattn.get(), rows, qd, dlist.get(), k, hd, compact.get(), DType::F32, nullptr));
  INFERLAB_CUDA_OK(kc::scatter_head_columns(compact.get(), rows, dlist.get(), k, hd, q.get(), qd, nullptr));
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());
  const auto got_rows = drows.download();
  const auto got_compact = compact.download(), got_q = q.download();
  for (int32_t i = 0; i < k; ++i)
    for (int32_t d = 0; d < hd; ++d) {
      ASSERT_EQ(got_rows[size_t(i * hd + d)], listed[size_t(i)] * hd + d);
      for (int32_t r = 0; r < rows; ++r)
        ASSERT_EQ(got_compact[size_t((r * k + i) * hd + d)], attn[size_t(r * qd + listed[size_t(i)] * hd + d)]);
    }
  for (int32_t r = 0; r < rows; ++r)
    for (int32_t h = 0; h < heads; ++h) {
      const bool in_list = std::find(listed.begin(), listed.end(), h) != listed.end();
      for (int32_t d = 0; d < hd; ++d)
        ASSERT_EQ(got_q[size_t(r * qd + h * hd + d)], in_list ? attn[size_t(r * qd + h * hd + d)] : 7.0f);
    }
}

using gpu_test::Traced;
using gpu_test::traced;

TEST(CudaPredictors, TheEngineChoosesOnTheDeviceAndReplaysItsSteps) {
  INFERLAB_REQUIRE_GPU();
  auto cpu_engine = gpu_test::make_engine(gpu_test::small_model(), BackendKind::Cpu);
  auto gpu = gpu_test::make_engine(gpu_test::small_model(), BackendKind::Cuda);
  auto eager = gpu_test::make_engine(gpu_test::small_model(), BackendKind::Cuda, 16, GpuDType::F16, false);
  ASSERT_TRUE(cpu_engine && gpu && eager);
  const ModelConfig& c = cpu_engine->config();
  const auto prompt = test::random_tokens(c.n_vocab, 40, 8);
  const test::ForwardTrace dense_trace = test::run_trace(*gpu, nullptr, prompt, 10);
  const Traced dense = traced(*gpu, nullptr, prompt, dense_trace.tokens);
  const auto predictors = test::random_predictors(c, 32, int32_t(c.n_ff) / 4, 2, 11);
  test::PredictedMethod m(predictors);
  test::HostPredictedMethod host(predictors);
  host.set_shape(c.n_ff, c.n_embd);
  const Traced replayed = traced(*gpu, &m, prompt, dense_trace.tokens);
  const Traced stepped = traced(*eager, &m, prompt, dense_trace.tokens);
  const Traced on_host = traced(*eager, &host, prompt, dense_trace.tokens, kHookComponentMask);
  const Traced on_cpu = traced(*cpu_engine, &m, prompt, dense_trace.tokens);
  EXPECT_GT(test::normalized_max_error(replayed.logits, dense.logits), 1e-2) << "the predictors changed nothing";
  EXPECT_EQ(replayed.logits, stepped.logits) << "graph replays differ from eager steps";
  EXPECT_GT(replayed.counters.at("graph_replays"), 0);
  EXPECT_LT(test::normalized_max_error(stepped.logits, on_host.logits), 1e-2);
  EXPECT_LT(test::normalized_max_error(replayed.logits, on_cpu.logits), 5e-2);
  for (const char* key : {"neurons_skipped", "heads_skipped"}) {
    EXPECT_EQ(replayed.counters.at(key), stepped.counters.at(key)) << key;
    // decode keeps the same number on both; a prefill's union may differ by a neuron or head where the
    // backends' arithmetic flips a near tie
    EXPECT_NEAR(replayed.counters.at(key), on_cpu.counters.at(key), 0.02 * on_cpu.counters.at(key) + 1) << key;
  }
  EXPECT_EQ(replayed.counters.at("kv_heads_skipped"), stepped.counters.at("kv_heads_skipped"));
  EXPECT_NEAR(replayed.counters.at("kv_heads_skipped"), on_host.counters.at("kv_heads_skipped"), 2);
  // Every neuron and head kept: the dense model.
  test::PredictedMethod all(test::random_predictors(c, 8, int32_t(c.n_ff), c.n_heads, 12));
  const Traced kept = traced(*gpu, &all, prompt, dense_trace.tokens);
  EXPECT_LT(test::normalized_max_error(kept.logits, dense.logits), 1e-3);
  const Traced after = traced(*gpu, nullptr, prompt, dense_trace.tokens);
  EXPECT_EQ(after.logits, dense.logits);
}

}  // namespace test_cuda_predictors
}  // namespace inferlab
