// Activation sparsity on the CUDA backend: the sparse GEMV, sparsify and the
// gated SiLU kernels against their CPU twins (kernels/cpu/activation_sparse.h)
// with the same zero counts; and the engine with TEAL- and CATS-style
// thresholds against the CPU backend, graph replays equal to eager steps (the
// decisions stay on the device), the next method dense again.
#include <gtest/gtest.h>

#include <algorithm>

#include "cpu/activation_sparse.h"
#include "cuda/activation_sparse.cuh"
#include "gpu_engine_support.h"
#include "gpu_kernel_support.h"
#include "gpu_test_support.h"
#include "inferlab/testing.h"
#include "sparse_method.h"

namespace inferlab {
namespace test_cuda_activation_sparsity {

namespace kc = kernels::cuda;
namespace cpu = kernels::cpu;
using gpu_test::DeviceBuffer;
using kernels::DType;

// Values of dtype (rounded on the host, so both sides see the same numbers),
// a fraction of them exact zeros.
std::vector<float> rounded(size_t n, uint64_t seed, DType dtype, float zero_fraction = 0.0f) {
  auto v = gpu_test::random_floats(n, seed);
  for (size_t i = 0; i < n; ++i)
    if (float(i % 97) / 97.0f < zero_fraction) v[i] = 0.0f;
  return gpu_test::to_floats(gpu_test::to_bytes(v, dtype), dtype);
}

TEST(CudaActivationSparsity, SparseInputGemvMatchesItsTwin) {
  INFERLAB_REQUIRE_GPU();
  for (const DType dtype : {DType::F16, DType::BF16})
    for (const auto& [in, out] : {std::pair<int64_t, int64_t>{576, 192}, {1536, 576}, {4096, 4096}, {11008, 4096},
                                  {100, 37}}) {
      SCOPED_TRACE(std::to_string(in) + "x" + std::to_string(out));
      const auto x = rounded(size_t(in), 1, dtype, 0.1f), wt = rounded(size_t(in * out), 2, dtype);
      DeviceBuffer<uint8_t> dx(gpu_test::to_bytes(x, dtype)), dwt(gpu_test::to_bytes(wt, dtype));
      DeviceBuffer<float> partial(static_cast<size_t>(kc::sparse_input_splits(in) * out)), y(static_cast<size_t>(out));
      DeviceBuffer<unsigned long long> zeros(std::vector<unsigned long long>{0});
      for (const float threshold : {0.0f, 0.6f}) {
        std::vector<float> want(static_cast<size_t>(out));
        const int64_t want_zeros = cpu::sparse_input_gemv(want.data(), x.data(), wt.data(), in, out, threshold);
        zeros.upload({0});
        INFERLAB_CUDA_OK(kc::sparse_input_gemv(dx.get(), dwt.get(), dtype, in, out, threshold, partial.get(), y.get(),
                                               zeros.get(), nullptr));
        INFERLAB_CUDA_OK(cudaDeviceSynchronize());
        EXPECT_LT(gpu_test::normalized_error(y.download(), want), 1e-5) << "threshold " << threshold;
        EXPECT_EQ(int64_t(zeros.download()[0]), want_zeros);
      }
    }
}

TEST(CudaActivationSparsity, SparsifyAndGatedSiluMatchTheirTwins) {
  INFERLAB_REQUIRE_GPU();
  for (const DType dtype : {DType::F16, DType::BF16}) {
    const int64_t n_ff = 1536, in = 576, rows = 5;
    const auto x = rounded(size_t(in), 3, dtype), w_up = rounded(size_t(n_ff * in), 4, dtype);
    const auto gate = gpu_test::random_floats(size_t(rows * n_ff), 5), up = gpu_test::random_floats(size_t(rows * n_ff), 6);
    DeviceBuffer<uint8_t> dx(gpu_test::to_bytes(x, dtype)), dw(gpu_test::to_bytes(w_up, dtype));
    DeviceBuffer<uint8_t> act(static_cast<size_t>(rows * n_ff) * 2), sparse(static_cast<size_t>(in) * 2);
    DeviceBuffer<float> dgate(gate), dup(up);
    DeviceBuffer<unsigned long long> zeros(std::vector<unsigned long long>{0});
    const float threshold = 0.15f;
    // sparsify
    std::vector<float> want_sparse(static_cast<size_t>(in));
    const int64_t sparse_zeros = cpu::sparsify(want_sparse.data(), x.data(), in, 0.5f);
    INFERLAB_CUDA_OK(kc::sparsify(dx.get(), dtype, in, 0.5f, sparse.get(), zeros.get(), nullptr));
    INFERLAB_CUDA_OK(cudaDeviceSynchronize());
    EXPECT_EQ(gpu_test::to_floats(sparse.download(), dtype), want_sparse);
    EXPECT_EQ(int64_t(zeros.download()[0]), sparse_zeros);
    // one row: up only where the gate keeps the neuron
    std::vector<float> want(static_cast<size_t>(n_ff));
    const int64_t gated_zeros = cpu::gated_silu_up(want.data(), gate.data(), x.data(), w_up.data(), n_ff, in, threshold);
    zeros.upload({0});
    INFERLAB_CUDA_OK(kc::gated_silu_up(dgate.get(), dx.get(), dw.get(), dtype, n_ff, in, threshold, act.get(),
                                       zeros.get(), nullptr));
    INFERLAB_CUDA_OK(cudaDeviceSynchronize());
    auto got = gpu_test::to_floats(act.download(), dtype);
    got.resize(size_t(n_ff));
    EXPECT_LT(gpu_test::normalized_error(got, want), 1e-2);  // the activation is rounded to the dtype
    EXPECT_EQ(int64_t(zeros.download()[0]), gated_zeros);
    for (int64_t j = 0; j < n_ff; ++j) EXPECT_EQ(got[size_t(j)] == 0.0f, want[size_t(j)] == 0.0f) << j;
    // many rows: a dense up, then the gate's zeros
    std::vector<float> want_mul(static_cast<size_t>(rows * n_ff));
    const int64_t mul_zeros = cpu::gated_silu_mul(want_mul.data(), gate.data(), up.data(), rows * n_ff, threshold);
    zeros.upload({0});
    INFERLAB_CUDA_OK(kc::gated_silu_mul(dgate.get(), dup.get(), rows * n_ff, threshold, act.get(), dtype, zeros.get(),
                                        nullptr));
    INFERLAB_CUDA_OK(cudaDeviceSynchronize());
    EXPECT_LT(gpu_test::normalized_error(gpu_test::to_floats(act.download(), dtype), want_mul), 1e-2);
    EXPECT_EQ(int64_t(zeros.download()[0]), mul_zeros);
  }
}

TEST(CudaActivationSparsity, ListedRowsAreReadInPlaceAsTheirTwinsSay) {
  INFERLAB_REQUIRE_GPU();
  const DType dtype = DType::BF16;
  const int64_t in = 4096, out = 4096, k = 700;
  const auto w = rounded(size_t(in * out), 13, dtype), x = rounded(size_t(in), 14, dtype);
  std::vector<int32_t> rows = gpu_test::shuffled_ids(int32_t(in), 15);
  rows.resize(size_t(k));
  std::sort(rows.begin(), rows.end());
  DeviceBuffer<uint8_t> dw(gpu_test::to_bytes(w, dtype)), dx(gpu_test::to_bytes(x, dtype));
  DeviceBuffer<int32_t> drows(rows);
  DeviceBuffer<float> partial(static_cast<size_t>(kc::sparse_input_splits(k) * out)), y(static_cast<size_t>(out)),
      dots(static_cast<size_t>(k));
  // rows_gemv: the first k entries of x against the listed rows of w read as (in, out)
  std::vector<float> want(static_cast<size_t>(out));
  cpu::gather_rows_gemv(want.data(), x.data(), w.data(), rows.data(), k, out);
  INFERLAB_CUDA_OK(kc::rows_gemv(dx.get(), dw.get(), dtype, drows.get(), k, out, partial.get(), y.get(), nullptr));
  // gathered_rows_gemv: the listed rows of w read as (out, in) against x
  std::vector<float> want_dots(static_cast<size_t>(k));
  for (int64_t j = 0; j < k; ++j) {
    double sum = 0;
    for (int64_t d = 0; d < in; ++d) sum += double(w[size_t(rows[size_t(j)] * in + d)]) * x[size_t(d)];
    want_dots[size_t(j)] = float(sum);
  }
  INFERLAB_CUDA_OK(kc::gathered_rows_gemv(dx.get(), dw.get(), dtype, drows.get(), k, in, dots.get(), nullptr));
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());
  EXPECT_LT(gpu_test::normalized_error(y.download(), want), 1e-5);
  EXPECT_LT(gpu_test::normalized_error(dots.download(), want_dots), 1e-5);
}

TEST(CudaActivationSparsity, OracleSelectionsMatchTheirTwins) {
  INFERLAB_REQUIRE_GPU();
  for (const DType dtype : {DType::F16, DType::BF16}) {
    const int64_t rows = 3, cols = 1536;
    auto x = rounded(size_t(rows * cols), 9, dtype, 0.05f);
    x[5] = x[6] = x[7];  // ties
    for (const int32_t k : {0, 1, 384, 1535, 1536}) {
      DeviceBuffer<uint8_t> dx(gpu_test::to_bytes(x, dtype));
      std::vector<float> want = x;
      cpu::keep_top_k_magnitudes(want.data(), rows, cols, k);
      INFERLAB_CUDA_OK(kc::keep_top_k_magnitudes(dx.get(), dtype, rows, cols, k, nullptr));
      INFERLAB_CUDA_OK(cudaDeviceSynchronize());
      EXPECT_EQ(gpu_test::to_floats(dx.download(), dtype), want) << "k " << k;
    }
  }
  const int32_t n_heads = 32, head_dim = 128, rows = 4;
  const auto attn = gpu_test::random_floats(size_t(rows * n_heads * head_dim), 10);
  std::vector<uint8_t> computed(size_t(n_heads), 1);
  computed[3] = computed[17] = 0;
  DeviceBuffer<float> dattn(attn);
  DeviceBuffer<uint8_t> dcomputed(computed);
  std::vector<float> want = attn;
  cpu::keep_top_heads(want.data(), rows, n_heads, head_dim, 8, computed.data());
  INFERLAB_CUDA_OK(kc::keep_top_heads(dattn.get(), rows, n_heads, head_dim, 8, dcomputed.get(), nullptr));
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());
  const auto got = dattn.download();
  for (size_t i = 0; i < got.size(); ++i) ASSERT_EQ(got[i] == 0.0f, want[i] == 0.0f) << i;  // the same heads kept
  EXPECT_LT(gpu_test::normalized_error(got, want), 1e-6);
}

using test::SparseMethod;

using gpu_test::Traced;
using gpu_test::traced;

TEST(CudaActivationSparsity, TheEngineMatchesTheCpuBackendAndReplaysItsSteps) {
  INFERLAB_REQUIRE_GPU();
  auto cpu_engine = gpu_test::make_engine(gpu_test::small_model(), BackendKind::Cpu);
  auto gpu = gpu_test::make_engine(gpu_test::small_model(), BackendKind::Cuda);
  auto eager = gpu_test::make_engine(gpu_test::small_model(), BackendKind::Cuda, 16, GpuDType::F16, false);
  ASSERT_TRUE(cpu_engine && gpu && eager);
  const int32_t L = cpu_engine->config().n_layers;
  const auto prompt = test::random_tokens(cpu_engine->config().n_vocab, 40, 8);
  const test::ForwardTrace dense_trace = test::run_trace(*gpu, nullptr, prompt, 10);
  const Traced dense = traced(*gpu, nullptr, prompt, dense_trace.tokens);
  for (const float gate : {-1.0f, 0.05f}) {
    SCOPED_TRACE(gate >= 0 ? "CATS gate" : "TEAL inputs");
    ActivationSparsity a;
    a.input_threshold.assign(size_t(L), {0.3f, 0.3f, 0.3f, 0.01f, 0.3f, 0.3f, 0.01f});
    if (gate >= 0) a.gate_threshold.assign(size_t(L), gate);
    SparseMethod m(a);
    const Traced on_cpu = traced(*cpu_engine, &m, prompt, dense_trace.tokens);
    const Traced replayed = traced(*gpu, &m, prompt, dense_trace.tokens);
    const Traced stepped = traced(*eager, &m, prompt, dense_trace.tokens);
    EXPECT_GT(test::normalized_max_error(replayed.logits, dense.logits), 1e-2) << "the thresholds changed nothing";
    EXPECT_LT(test::normalized_max_error(replayed.logits, on_cpu.logits), 3e-2);
    EXPECT_EQ(replayed.logits, stepped.logits) << "graph replays differ from eager steps";
    EXPECT_GT(replayed.counters.at("graph_replays"), 0);
    for (const char* p : {"q", "o", "up", "down"}) {
      const std::string key = std::string("activation_sparsity.") + p;
      EXPECT_NEAR(replayed.counters.at(key), on_cpu.counters.at(key), 0.02) << key;
      EXPECT_EQ(replayed.counters.at(key), stepped.counters.at(key)) << key;
    }
  }
  const Traced after = traced(*gpu, nullptr, prompt, dense_trace.tokens);
  EXPECT_EQ(after.logits, dense.logits);
}

// Heads masked by mask_components (Q and O of the computed heads only) and
// the oracle's choices, on the GPU as on the CPU.
class MaskMethod final : public Method {
 public:
  explicit MaskMethod(int kind) : kind_(kind) {}
  bool mask_components(const StepInfo&, int32_t, std::span<const float>, ComponentMask& m) override {
    if (kind_ == 0) m.heads[1] = m.heads[2] = 0;
    if (kind_ == 1) m.oracle_neurons = 128;
    if (kind_ == 2) m.oracle_heads = 2;
    return true;
  }

 private:
  int kind_;
};

TEST(CudaComponentSelection, MaskedHeadsAndTheOracleMatchTheCpuBackend) {
  INFERLAB_REQUIRE_GPU();
  auto cpu_engine = gpu_test::make_engine(gpu_test::small_model(), BackendKind::Cpu);
  auto gpu = gpu_test::make_engine(gpu_test::small_model(), BackendKind::Cuda);
  ASSERT_TRUE(cpu_engine && gpu);
  const auto prompt = test::random_tokens(cpu_engine->config().n_vocab, 32, 12);
  const test::ForwardTrace dense = test::run_trace(*gpu, nullptr, prompt, 6);
  for (int kind : {0, 1, 2}) {
    SCOPED_TRACE(kind == 0 ? "masked heads" : kind == 1 ? "oracle neurons" : "oracle heads");
    MaskMethod m(kind);
    const Traced on_cpu = traced(*cpu_engine, &m, prompt, dense.tokens, kHookComponentMask);
    const Traced on_gpu = traced(*gpu, &m, prompt, dense.tokens, kHookComponentMask);
    EXPECT_LT(test::normalized_max_error(on_gpu.logits, on_cpu.logits), 3e-2);
    EXPECT_GT(test::normalized_max_error(on_gpu.logits, dense.logits), 1e-3);
  }
}

}  // namespace test_cuda_activation_sparsity
}  // namespace inferlab

