// Fine-tuning on the GPU: the backward kernels (kernels/cuda/backward.cuh)
// against their CPU twins (kernels/cpu/backward.h), and the CUDA training
// graph (GraphOptions::cuda) against the CPU graph on a small synthetic model:
// losses, logits and every adapter's gradients, on a float32 and a 4-bit
// base, with layer checkpointing (no bit changes), dropout (the same masks),
// exit losses and skipped layers; a repeated step gives the same bits; bad
// input is refused as on the CPU. (Without a GPU: tests/unit/test_lora_graph.cpp.)
#include <gtest/gtest.h>

#include <cmath>
#include <random>

#include "counter_rng.h"
#include "cpu/backward.h"
#include "cuda/backward.cuh"
#include "finetune/lora_graph.h"
#include "gpu_test_support.h"
#include "lora_graph_fixtures.h"
#include "test_support.h"

namespace inferlab {
namespace test_cuda_lora_graph {

using finetune::AdapterGrads;
using finetune::AdapterSet;
using finetune::Batch;
using finetune::GraphOptions;
using finetune::LoraGraph;
using gpu_test::DeviceBuffer;
using gpu_test::normalized_error;
using gpu_test::random_floats;
namespace kc = kernels::cuda;
namespace cpu = kernels::cpu;

std::shared_ptr<Model> tiny_model() {
  static std::shared_ptr<Model> m = test::load_synthetic(test::lora_graph_spec("cuda-lora-graph"));
  return m;
}

AdapterSet random_adapters(const ModelConfig& c, uint64_t seed) { return test::random_lora_adapters(c, seed); }

Batch make_batch(const ModelConfig& c, int64_t len, uint64_t seed) { return test::next_token_batch(c, len, seed); }

std::unique_ptr<LoraGraph> make_graph(GraphOptions options, bool cuda) {
  options.cuda = cuda;
  auto g = LoraGraph::create(tiny_model(), options);
  EXPECT_TRUE(g.ok()) << g.message();
  return g.ok() ? std::move(*g) : nullptr;
}

void expect_close_grads(const AdapterGrads& gpu, const AdapterGrads& cpu_grads, double tolerance) {
  ASSERT_EQ(gpu.a.size(), cpu_grads.a.size());
  for (size_t i = 0; i < gpu.a.size(); ++i) {
    EXPECT_LT(normalized_error(gpu.a[i], cpu_grads.a[i]), tolerance) << "A of adapter " << i;
    EXPECT_LT(normalized_error(gpu.b[i], cpu_grads.b[i]), tolerance) << "B of adapter " << i;
  }
}

using test::expect_same_grads;

TEST(CudaBackwardKernels, NormRopeAndSiluMatchTheirCpuTwins) {
  INFERLAB_REQUIRE_GPU();
  const int64_t rows = 37, n = 96, heads = 3, head_dim = 32;
  const auto x = random_floats(static_cast<size_t>(rows * n), 1), dy = random_floats(static_cast<size_t>(rows * n), 2);
  const auto w = random_floats(static_cast<size_t>(n), 3), base = random_floats(static_cast<size_t>(rows * n), 4);
  std::vector<float> inv(static_cast<size_t>(rows)), dx = base;
  cpu::rmsnorm_inverse(inv.data(), x.data(), rows, n, 1e-5f);
  cpu::rmsnorm_backward(dx.data(), dy.data(), x.data(), inv.data(), w.data(), rows, n, true);
  DeviceBuffer<float> dx_d(base), dy_d(dy), x_d(x), w_d(w), inv_d(static_cast<size_t>(rows));
  INFERLAB_CUDA_OK(kc::rmsnorm_inverse(inv_d.get(), x_d.get(), rows, n, 1e-5f, nullptr));
  INFERLAB_CUDA_OK(kc::rmsnorm_backward(dx_d.get(), dy_d.get(), x_d.get(), inv_d.get(), w_d.get(), rows, n, true,
                                        nullptr));
  EXPECT_LT(normalized_error(inv_d.download(), inv), 1e-6);
  EXPECT_LT(normalized_error(dx_d.download(), dx), 1e-6);

  // RoPE's transpose: with positions up to 4000, rope_dim 24 of 32, neox and not.
  std::vector<int32_t> positions(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) positions[static_cast<size_t>(r)] = int32_t(r * 109 % 4001);
  DeviceBuffer<int32_t> pos_d(positions);
  for (const bool neox : {false, true}) {
    std::vector<float> g = random_floats(static_cast<size_t>(rows * heads * head_dim), 5);
    DeviceBuffer<float> g_d(g);
    cpu::rope_backward(g.data(), rows, heads * head_dim, heads, head_dim, 24, positions.data(), 10000.0f, neox);
    INFERLAB_CUDA_OK(kc::rope_backward(g_d.get(), rows, heads * head_dim, heads, head_dim, 24, pos_d.get(), 10000.0f,
                                       neox, nullptr));
    EXPECT_LT(normalized_error(g_d.download(), g), 1e-6) << "neox " << neox;
  }

  const int64_t count = 5000;
  const auto dact = random_floats(static_cast<size_t>(count), 6), gate = random_floats(static_cast<size_t>(count), 7, 3.0f),
             up = random_floats(static_cast<size_t>(count), 8);
  std::vector<float> dgate(static_cast<size_t>(count)), dup(static_cast<size_t>(count));
  cpu::silu_mul_backward(dgate.data(), dup.data(), dact.data(), gate.data(), up.data(), count);
  DeviceBuffer<float> dgate_d(static_cast<size_t>(count)), dup_d(static_cast<size_t>(count)), dact_d(dact), gate_d(gate), up_d(up);
  INFERLAB_CUDA_OK(kc::silu_mul_backward(dgate_d.get(), dup_d.get(), dact_d.get(), gate_d.get(), up_d.get(), count,
                                         nullptr));
  EXPECT_LT(normalized_error(dgate_d.download(), dgate), 1e-5);
  EXPECT_LT(normalized_error(dup_d.download(), dup), 1e-5);
}

TEST(CudaBackwardKernels, TrainingAttentionMatchesItsCpuTwin) {
  INFERLAB_REQUIRE_GPU();
  // Grouped heads (8 queries over 2 KV heads), two sequences, a length past one block of threads.
  const int64_t batch = 2, seq = 150, nh = 8, nkv = 2, hd = 64;
  const float scale = 1.0f / std::sqrt(float(hd));
  const auto q = random_floats(static_cast<size_t>(batch * seq * nh * hd), 11), k = random_floats(static_cast<size_t>(batch * seq * nkv * hd), 12),
             v = random_floats(static_cast<size_t>(batch * seq * nkv * hd), 13), dout = random_floats(q.size(), 14);
  std::vector<float> out(q.size()), lse(static_cast<size_t>(batch * nh * seq)), dq(q.size()), dk(k.size()), dv(v.size());
  cpu::causal_attention_forward(q.data(), k.data(), v.data(), out.data(), lse.data(), batch, seq, nh, nkv, hd, scale);
  cpu::causal_attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(),
                                 out.data(), lse.data(), batch, seq, nh, nkv, hd, scale);
  DeviceBuffer<float> q_d(q), k_d(k), v_d(v), dout_d(dout), out_d(out.size()), lse_d(lse.size()), dq_d(q.size()),
      dk_d(k.size()), dv_d(v.size()), delta_d(static_cast<size_t>(batch * seq * nh));
  INFERLAB_CUDA_OK(kc::causal_attention_forward(q_d.get(), k_d.get(), v_d.get(), out_d.get(), lse_d.get(), batch, seq,
                                                nh, nkv, hd, scale, nullptr));
  EXPECT_LT(normalized_error(out_d.download(), out), 1e-5);
  EXPECT_LT(normalized_error(lse_d.download(), lse), 1e-6);
  INFERLAB_CUDA_OK(kc::causal_attention_backward(dq_d.get(), dk_d.get(), dv_d.get(), delta_d.get(), dout_d.get(),
                                                 q_d.get(), k_d.get(), v_d.get(), out_d.get(), lse_d.get(), batch,
                                                 seq, nh, nkv, hd, scale, nullptr));
  EXPECT_LT(normalized_error(dq_d.download(), dq), 1e-5);
  EXPECT_LT(normalized_error(dk_d.download(), dk), 1e-5);
  EXPECT_LT(normalized_error(dv_d.download(), dv), 1e-5);
  // Deterministic: a second backward gives the same bits.
  const auto first = dk_d.download();
  INFERLAB_CUDA_OK(kc::causal_attention_backward(dq_d.get(), dk_d.get(), dv_d.get(), delta_d.get(), dout_d.get(),
                                                 q_d.get(), k_d.get(), v_d.get(), out_d.get(), lse_d.get(), batch,
                                                 seq, nh, nkv, hd, scale, nullptr));
  EXPECT_EQ(dk_d.download(), first);
  // Longer than the kernels take: refused, nothing launched.
  EXPECT_EQ(kc::causal_attention_forward(q_d.get(), k_d.get(), v_d.get(), out_d.get(), lse_d.get(), 1,
                                         kc::kTrainAttentionMaxSeq + 1, nh, nkv, hd, scale, nullptr),
            cudaErrorInvalidValue);
}

TEST(CudaBackwardKernels, GemmsCrossEntropyAndDropoutMatchTheHost) {
  INFERLAB_REQUIRE_GPU();
  cublasHandle_t blas = nullptr;
  ASSERT_EQ(cublasCreate(&blas), CUBLAS_STATUS_SUCCESS);
  // Every transposition: C (5, 7) = alpha op(A) op(B) + beta C, against a double loop.
  const int64_t m = 5, n = 7, k = 11;
  for (const bool ta : {false, true})
    for (const bool tb : {false, true}) {
      const auto a = random_floats(static_cast<size_t>(m * k), 21), b = random_floats(static_cast<size_t>(k * n), 22),
                 c0 = random_floats(static_cast<size_t>(m * n), 23);
      std::vector<float> expect(c0.size());
      for (int64_t i = 0; i < m; ++i)
        for (int64_t j = 0; j < n; ++j) {
          double s = 0;
          for (int64_t e = 0; e < k; ++e)
            s += double(ta ? a[static_cast<size_t>(e * m + i)] : a[static_cast<size_t>(i * k + e)]) *
                 double(tb ? b[static_cast<size_t>(j * k + e)] : b[static_cast<size_t>(e * n + j)]);
          expect[static_cast<size_t>(i * n + j)] = float(0.5 * s + 2.0 * double(c0[static_cast<size_t>(i * n + j)]));
        }
      DeviceBuffer<float> a_d(a), b_d(b), c_d(c0);
      ASSERT_EQ(kc::sgemm_rm(blas, ta, tb, m, n, k, 0.5f, a_d.get(), ta ? m : k, b_d.get(), tb ? k : n, 2.0f, c_d.get(),
                             n),
                CUBLAS_STATUS_SUCCESS);
      EXPECT_LT(normalized_error(c_d.download(), expect), 1e-6) << "trans_a " << ta << " trans_b " << tb;
    }
  cublasDestroy(blas);

  // Cross-entropy: losses in double and the gradient grad_scale (softmax - onehot).
  const int64_t rows = 6, vocab = 1000;
  const auto z = random_floats(static_cast<size_t>(rows * vocab), 24, 4.0f);
  const std::vector<int32_t> targets = {0, 999, 17, 500, 3, 3};
  DeviceBuffer<float> z_d(z);
  DeviceBuffer<int32_t> t_d(targets);
  DeviceBuffer<double> loss_d(static_cast<size_t>(rows));
  INFERLAB_CUDA_OK(kc::softmax_cross_entropy(z_d.get(), t_d.get(), rows, vocab, 0.5f, true, loss_d.get(), nullptr));
  const auto loss = loss_d.download();
  const auto grad = z_d.download();
  for (int64_t r = 0; r < rows; ++r) {
    const float* zr = z.data() + r * vocab;
    double mx = zr[0], sum = 0;
    for (int64_t j = 0; j < vocab; ++j) mx = std::max(mx, double(zr[j]));
    for (int64_t j = 0; j < vocab; ++j) sum += std::exp(double(zr[j]) - mx);
    const double lse = mx + std::log(sum);
    EXPECT_NEAR(loss[static_cast<size_t>(r)], lse - double(zr[targets[static_cast<size_t>(r)]]), 1e-9 * std::abs(lse) + 1e-9) << "row " << r;
    for (int64_t j = 0; j < vocab; j += 97) {
      const double want = 0.5 * (std::exp(double(zr[j]) - lse) - (j == targets[static_cast<size_t>(r)] ? 1.0 : 0.0));
      EXPECT_NEAR(grad[static_cast<size_t>(r * vocab + j)], want, 1e-6) << "row " << r << " column " << j;
    }
  }

  // Dropout: the host's mask, element for element.
  const int64_t count = 10000;
  const auto x = random_floats(static_cast<size_t>(count), 25);
  DeviceBuffer<float> x_d(x), out_d(static_cast<size_t>(count));
  const uint64_t key = kernels::splitmix64(77);
  INFERLAB_CUDA_OK(kc::dropout(out_d.get(), x_d.get(), count, key, 0.3f, 1.0f / 0.7f, false, nullptr));
  const auto dropped = out_d.download();
  int64_t kept = 0;
  for (int64_t e = 0; e < count; ++e) {
    const float want = x[static_cast<size_t>(e)] * kernels::dropout_factor(key, e, 0.3f, 1.0f / 0.7f);
    ASSERT_EQ(dropped[static_cast<size_t>(e)], want) << "element " << e;
    kept += want != 0.0f;
  }
  EXPECT_NEAR(double(kept) / double(count), 0.7, 0.02);
}

TEST(CudaLoraGraph, LossLogitsAndGradientsMatchTheCpuGraph) {
  INFERLAB_REQUIRE_GPU();
  GraphOptions options;
  options.loss_chunk_rows = 7;  // several chunks, the last one short
  auto on_cpu = make_graph(options, false), on_gpu = make_graph(options, true);
  ASSERT_TRUE(on_cpu && on_gpu);
  const ModelConfig& c = on_cpu->config();
  const Batch b = make_batch(c, 24, 3);
  const AdapterSet set = random_adapters(c, 5);
  auto logits_cpu = on_cpu->logits(b, set), logits_gpu = on_gpu->logits(b, set);
  ASSERT_TRUE(logits_cpu.ok() && logits_gpu.ok()) << logits_gpu.message();
  EXPECT_LT(normalized_error(*logits_gpu, *logits_cpu), 1e-5);
  AdapterGrads gc = AdapterGrads::like(set), gg = gc;
  auto lc = on_cpu->forward_backward(b, set, gc, 0.01f), lg = on_gpu->forward_backward(b, set, gg, 0.01f);
  ASSERT_TRUE(lc.ok() && lg.ok()) << lg.message();
  EXPECT_EQ(lg->tokens, lc->tokens);
  EXPECT_NEAR(lg->loss_sum, lc->loss_sum, 1e-5 * lc->loss_sum);
  expect_close_grads(gg, gc, 1e-4);
  // Gradients add to what the caller holds; a repeated step gives the same bits.
  AdapterGrads again = AdapterGrads::like(set);
  ASSERT_TRUE(on_gpu->forward_backward(b, set, again, 0.01f).ok());
  expect_same_grads(again, gg);
  AdapterGrads twice = gg;
  ASSERT_TRUE(on_gpu->forward_backward(b, set, twice, 0.01f).ok());
  for (size_t i = 0; i < gg.a.size(); ++i)
    for (size_t e = 0; e < gg.a[i].size(); ++e) EXPECT_FLOAT_EQ(twice.a[i][e], 2 * gg.a[i][e]);
  EXPECT_EQ(on_gpu->memory().base_weight_bytes, on_cpu->memory().base_weight_bytes);
  EXPECT_GT(on_gpu->memory().peak_activation_bytes, 0);
}

TEST(CudaLoraGraph, AFourBitBaseCheckpointingAndDropoutMatchTheCpuGraph) {
  INFERLAB_REQUIRE_GPU();
  const ModelConfig& c = tiny_model()->config();
  const Batch b = make_batch(c, 16, 7);
  const AdapterSet set = random_adapters(c, 8);
  GraphOptions nf4;
  nf4.base.format = WeightFormat::NF4;
  nf4.base.block_size = 32;
  nf4.base.double_quant = true;
  auto cpu4 = make_graph(nf4, false), gpu4 = make_graph(nf4, true);
  ASSERT_TRUE(cpu4 && gpu4);
  EXPECT_EQ(gpu4->memory().base_weight_bytes, cpu4->memory().base_weight_bytes);
  AdapterGrads gc = AdapterGrads::like(set), gg = gc;
  auto lc = cpu4->forward_backward(b, set, gc, 0.01f), lg = gpu4->forward_backward(b, set, gg, 0.01f);
  ASSERT_TRUE(lc.ok() && lg.ok()) << lg.message();
  EXPECT_NEAR(lg->loss_sum, lc->loss_sum, 1e-5 * lc->loss_sum);
  expect_close_grads(gg, gc, 1e-4);

  // Checkpointing reruns the same kernels: no bit changes, and less memory held.
  GraphOptions plain, checkpointed;
  checkpointed.checkpoint_layers = true;
  auto g0 = make_graph(plain, true), g1 = make_graph(checkpointed, true);
  AdapterGrads r0 = AdapterGrads::like(set), r1 = r0;
  auto l0 = g0->forward_backward(b, set, r0, 0.01f), l1 = g1->forward_backward(b, set, r1, 0.01f);
  ASSERT_TRUE(l0.ok() && l1.ok());
  EXPECT_EQ(l0->loss_sum, l1->loss_sum);
  expect_same_grads(r0, r1);
  EXPECT_LT(g1->memory().peak_activation_bytes, g0->memory().peak_activation_bytes);

  // Dropout draws the CPU graph's masks: the gradients agree as without it.
  GraphOptions dropout;
  dropout.dropout = 0.3f;
  auto cpu_d = make_graph(dropout, false), gpu_d = make_graph(dropout, true);
  AdapterGrads dc = AdapterGrads::like(set), dg = dc;
  ASSERT_TRUE(cpu_d->forward_backward(b, set, dc, 0.05f, 9).ok());
  ASSERT_TRUE(gpu_d->forward_backward(b, set, dg, 0.05f, 9).ok());
  expect_close_grads(dg, dc, 1e-4);
}

TEST(CudaLoraGraph, ExitLossesAndSkippedLayersMatchTheCpuGraph) {
  INFERLAB_REQUIRE_GPU();
  const ModelConfig& c = tiny_model()->config();
  const AdapterSet set = random_adapters(c, 18);
  Batch b = make_batch(c, 12, 19);
  b.skip.assign(b.tokens.size() * 2, 0);
  for (int64_t s = 0; s < b.sequences; ++s)
    for (int64_t t = 6; t < b.seq_len; ++t) {
      b.skip[static_cast<size_t>((s * b.seq_len + t) * 2)] = 1;
      if (t >= 10) b.skip[static_cast<size_t>((s * b.seq_len + t) * 2 + 1)] = 1;
    }
  GraphOptions both;
  both.exit_weights = {0.25f, 1.0f};
  auto on_cpu = make_graph(both, false), on_gpu = make_graph(both, true);
  AdapterGrads gc = AdapterGrads::like(set), gg = gc;
  auto lc = on_cpu->forward_backward(b, set, gc, 0.01f), lg = on_gpu->forward_backward(b, set, gg, 0.01f);
  ASSERT_TRUE(lc.ok() && lg.ok()) << lg.message();
  ASSERT_EQ(lg->exit_loss_sums.size(), 2u);
  for (size_t e = 0; e < 2; ++e)
    EXPECT_NEAR(lg->exit_loss_sums[e], lc->exit_loss_sums[e], 1e-5 * lc->exit_loss_sums[e]) << "exit " << e;
  expect_close_grads(gg, gc, 1e-4);
}

TEST(CudaLoraGraph, BadInputIsRefusedAsOnTheCpu) {
  INFERLAB_REQUIRE_GPU();
  auto g = make_graph({}, true);
  ASSERT_TRUE(g);
  const ModelConfig& c = g->config();
  const AdapterSet set = random_adapters(c, 1);
  Batch b = make_batch(c, 8, 2);
  b.tokens[3] = c.n_vocab;
  const auto bad = g->loss(b, set);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("outside the vocabulary"), std::string::npos) << bad.message();
  AdapterGrads wrong;
  Batch fine = make_batch(c, 8, 2);
  EXPECT_NE(g->forward_backward(fine, set, wrong, 1.0f).message().find("AdapterGrads::like"), std::string::npos);
}

}  // namespace test_cuda_lora_graph
}  // namespace inferlab
