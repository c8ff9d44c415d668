// The fine-tuning graph on the GPU: lora_graph.cpp's forward, chunked
// cross-entropy and backward, step for step, in device memory. Float32
// throughout like the CPU graph (the frozen base as the model's float32
// projections or as 4-bit copies dequantized one projection at a time),
// cuBLAS SGEMMs in FP32 math (never TF32) and the kernels of
// kernels/cuda/backward.cuh. The adapters are uploaded at each call and their
// gradients summed on the device, then added to the caller's host gradients;
// dropout draws the CPU graph's masks. Activation and backward buffers stay
// allocated between calls (a step allocates nothing once the first has run).
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <stdexcept>
#include <string>

#include "counter_rng.h"
#include "cpu/quant4.h"
#include "cuda/activation.cuh"
#include "cuda/backward.cuh"
#include "cuda/embedding.cuh"
#include "cuda/quant4.cuh"
#include "cuda/rmsnorm.cuh"
#include "cuda/rope.cuh"
#include "engine/backend.h"
#include "engine/cuda/device_memory.h"
#include "finetune/lora_graph_device.h"

namespace inferlab::finetune::detail {

namespace {

namespace kc = kernels::cuda;

// A CUDA failure or an allocation that did not fit, carried to the call's
// boundary, where it becomes the call's error.
struct DeviceFailure : std::runtime_error {
  using std::runtime_error::runtime_error;
};

void check(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return;
  cudaGetLastError();
  throw DeviceFailure(fmt::format("{}: {}", what, cudaGetErrorString(e)));
}

void check(cublasStatus_t s, const char* what) {
  if (s != CUBLAS_STATUS_SUCCESS) throw DeviceFailure(fmt::format("{}: cuBLAS status {}", what, int(s)));
}

// Floats on the device whose allocation stays between calls and grows when a
// call needs more; count is what the current call uses.
struct DBuf {
  DeviceMemory mem;
  int64_t count = 0;
  float* resize(int64_t n) {
    if (!mem.reserve(size_t(std::max<int64_t>(n, 1)) * sizeof(float)))
      throw DeviceFailure(fmt::format("out of GPU memory for {} MiB of activations", (n * 4) >> 20));
    count = n;
    return mem.as<float>();
  }
  float* p() const { return mem.as<float>(); }
  int64_t held() const { return int64_t(mem.bytes()); }
};

template <typename T>
void upload(DeviceMemory& to, const T* from, size_t n, cudaStream_t stream) {
  if (n == 0) return;
  if (!to.reserve(n * sizeof(T)))
    throw DeviceFailure(fmt::format("out of GPU memory for {} MiB of weights", (n * sizeof(T)) >> 20));
  check(cudaMemcpyAsync(to.as(), from, n * sizeof(T), cudaMemcpyHostToDevice, stream), "upload");
}

// What a layer's forward keeps for its backward (LayerActs of the CPU graph).
struct DLayerActs {
  DBuf x, inv1, h1, q, k, v, lse, o, x2, inv2, h2, g, u, act;
  std::array<DBuf, kSlots> xa;
  int64_t held() const {
    int64_t n = 0;
    for (const DBuf* t : {&x, &inv1, &h1, &q, &k, &v, &lse, &o, &x2, &inv2, &h2, &g, &u, &act}) n += t->held();
    for (const auto& t : xa) n += t.held();
    return n;
  }
};

struct DBackward {
  DBuf dx2, dact, dg, du, dh, dout, dq, dk, dv, delta, upstream, dyb, tmp;
  int64_t held() const {
    int64_t n = 0;
    for (const DBuf* t : {&dx2, &dact, &dg, &du, &dh, &dout, &dq, &dk, &dv, &delta, &upstream, &dyb, &tmp})
      n += t->held();
    return n;
  }
};

struct DQuant4 {
  DeviceMemory codes, absmax, absmax_codes, absmax_scale;
  kc::Quant4View view;
};

struct DLayerWeights {
  std::array<DeviceMemory, kSlots> proj;  // float32 base
  std::array<DQuant4, kSlots> quant;      // 4-bit base
  DeviceMemory attn_norm, ffn_norm, bq, bk, bv, bo;
};

class CudaGraph final : public DeviceGraph {
 public:
  CudaGraph(std::shared_ptr<const Model> model, const GraphOptions& options)
      : model_(std::move(model)), c_(model_->config()), opt_(options) {}
  ~CudaGraph() override {
    if (blas_ != nullptr) cublasDestroy(blas_);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  CudaGraph(const CudaGraph&) = delete;
  CudaGraph& operator=(const CudaGraph&) = delete;

  // Stream, cuBLAS and every weight on the device.
  void setup();

  Result<StepResult> run(const Batch& b, const AdapterSet& adapters, AdapterGrads* g, float grad_scale,
                         uint64_t seed) override {
    try {
      return run_checked(b, adapters, g, grad_scale, seed);
    } catch (const DeviceFailure& e) {
      return Error{fmt::format("fine-tuning on CUDA: {}", e.what())};
    }
  }

  Result<std::vector<float>> logits(const Batch& b, const AdapterSet& adapters) override {
    try {
      if (auto s = begin(b, adapters, nullptr, false, 0); !s) return s.error();
      forward_layers({});
      final_norm(x_.p(), h_, hinv_);
      const int64_t d = c_.n_embd, V = c_.n_vocab;
      float* z = z_.resize(n_ * V);
      check(kc::sgemm_rm(blas_, false, true, n_, V, d, 1.0f, h_.p(), d, head_, d, 0.0f, z, V), "logits");
      std::vector<float> out(size_t(n_ * V));
      check(cudaMemcpyAsync(out.data(), z, out.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_), "logits");
      check(cudaStreamSynchronize(stream_), "logits");
      return out;
    } catch (const DeviceFailure& e) {
      return Error{fmt::format("fine-tuning on CUDA: {}", e.what())};
    }
  }

  MemoryStats memory() const override { return mem_; }

 private:
  std::shared_ptr<const Model> model_;
  ModelConfig c_;
  GraphOptions opt_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t blas_ = nullptr;

  std::vector<DLayerWeights> w_;
  DeviceMemory embd_, head_store_, out_norm_, dynamic_map_;
  const float* head_ = nullptr;  // the LM head: head_store_, or embd_ when tied
  DBuf dequant_;                 // one 4-bit projection, dequantized for a GEMM
  MemoryStats mem_;

  // Per call.
  CallShape shape_;
  int64_t n_ = 0;
  const AdapterSet* set_ = nullptr;
  bool dropout_ = false;
  uint64_t seed_ = 0;
  std::vector<DeviceMemory> a_, b_;  // each adapter's A and B
  std::vector<DBuf> ga_, gb_;        // and their gradients
  DeviceMemory positions_, tokens_, skip_flags_, loss_rows_, loss_targets_, row_loss_;
  std::vector<uint8_t> layer_skips_;  // per layer: whether any row skips it
  std::vector<int32_t> loss_rows_host_;
  // Activations and backward buffers.
  std::vector<DLayerActs> acts_;
  std::vector<DBuf> inputs_, exit_grads_;
  DBackward bb_;
  DBuf x_, next_, dx_, h_, hinv_, dh_, hc_, z_, dhc_, dropped_;

  const uint8_t* flags(int32_t l) const { return skip_flags_.as<uint8_t>() + int64_t(l) * n_; }

  const float* weight(int32_t l, int s) {
    const DLayerWeights& w = w_[size_t(l)];
    if (opt_.base.format == WeightFormat::Model) return w.proj[size_t(s)].as<float>();
    const auto shape = slot_shape(c_, s);
    float* out = dequant_.resize(shape.first * shape.second);
    check(kc::quant4_dequantize(w.quant[size_t(s)].view, out, kernels::DType::F32, stream_), "dequantize");
    return out;
  }

  const float* adapter_input(int ai, const float* x, int64_t in) {
    if (!dropout_) return x;
    float* out = dropped_.resize(n_ * in);
    check(kc::dropout(out, x, n_ * in, dropout_key(seed_, ai), opt_.dropout, 1.0f / (1.0f - opt_.dropout), false,
                      stream_),
          "dropout");
    return out;
  }

  void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
            const float* b, int64_t ldb, float beta, float* c, int64_t ldc, const char* what) {
    check(kc::sgemm_rm(blas_, ta, tb, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc), what);
  }

  // y(n, out) = x W^T plus the adapter's scale (x A^T) B^T, x A^T kept in xa.
  void linear(int32_t l, int s, const float* x, DBuf& y, DBuf& xa) {
    const auto shape = slot_shape(c_, s);
    const int64_t out = shape.first, in = shape.second;
    float* yp = y.resize(n_ * out);
    gemm(false, true, n_, out, in, 1.0f, x, in, weight(l, s), in, 0.0f, yp, out, "projection");
    const int ai = shape_.index[size_t(l)][size_t(s)];
    if (ai < 0) {
      xa.count = 0;
      return;
    }
    const AdapterTensor& t = set_->adapters[size_t(ai)];
    const float* xin = adapter_input(ai, x, in);
    float* xap = xa.resize(n_ * t.rank);
    gemm(false, true, n_, t.rank, in, 1.0f, xin, in, a_[size_t(ai)].as<float>(), in, 0.0f, xap, t.rank, "adapter A");
    gemm(false, true, n_, out, t.rank, t.scale, xap, t.rank, b_[size_t(ai)].as<float>(), t.rank, 1.0f, yp, out,
         "adapter B");
  }

  // dx(n, in) (=, or += with accumulate) from dy(n, out); the adapter's gradients summed.
  void linear_backward(int32_t l, int s, const float* dy, const float* x, const DBuf& xa, float* dx, bool accumulate) {
    const auto shape = slot_shape(c_, s);
    const int64_t out = shape.first, in = shape.second;
    gemm(false, false, n_, in, out, 1.0f, dy, out, weight(l, s), in, accumulate ? 1.0f : 0.0f, dx, in, "dX");
    const int ai = shape_.index[size_t(l)][size_t(s)];
    if (ai < 0) return;
    const AdapterTensor& t = set_->adapters[size_t(ai)];
    const int64_t r = t.rank;
    const float* a = a_[size_t(ai)].as<float>();
    gemm(true, false, out, r, n_, t.scale, dy, out, xa.p(), r, 1.0f, gb_[size_t(ai)].p(), r, "dB");
    float* dyb = bb_.dyb.resize(n_ * r);
    gemm(false, false, n_, r, out, t.scale, dy, out, b_[size_t(ai)].as<float>(), r, 0.0f, dyb, r, "dY B");
    const float* xin = adapter_input(ai, x, in);
    gemm(true, false, r, in, n_, 1.0f, dyb, r, xin, in, 1.0f, ga_[size_t(ai)].p(), in, "dA");
    if (!dropout_) {
      gemm(false, false, n_, in, r, 1.0f, dyb, r, a, in, 1.0f, dx, in, "adapter dX");
      return;
    }
    float* tmp = bb_.tmp.resize(n_ * in);
    gemm(false, false, n_, in, r, 1.0f, dyb, r, a, in, 0.0f, tmp, in, "adapter dX");
    check(kc::dropout(dx, tmp, n_ * in, dropout_key(seed_, ai), opt_.dropout, 1.0f / (1.0f - opt_.dropout), true,
                      stream_),
          "dropout backward");
  }

  void norm(const float* x, const float* weight, DBuf& h, DBuf& inv) {
    const int64_t d = c_.n_embd;
    float* hp = h.resize(n_ * d);
    float* ip = inv.resize(n_);
    check(kc::rmsnorm_inverse(ip, x, n_, d, c_.rms_eps, stream_), "rmsnorm inverse");
    check(kc::rmsnorm(x, weight, n_, d, c_.rms_eps, hp, kernels::DType::F32, stream_), "rmsnorm");
  }
  void final_norm(const float* x, DBuf& h, DBuf& inv) { norm(x, out_norm_.as<float>(), h, inv); }

  void copy(float* to, const float* from, int64_t count) {
    check(cudaMemcpyAsync(to, from, size_t(count) * sizeof(float), cudaMemcpyDeviceToDevice, stream_), "copy");
  }

  // One layer from a.x; its output into out.
  void forward_layer(int32_t l, DLayerActs& a, DBuf& out) {
    const DLayerWeights& w = w_[size_t(l)];
    const int64_t d = c_.n_embd, f = c_.n_ff, qd = c_.q_dim(), kvd = c_.kv_dim();
    norm(a.x.p(), w.attn_norm.as<float>(), a.h1, a.inv1);
    linear(l, 0, a.h1.p(), a.q, a.xa[0]);
    linear(l, 1, a.h1.p(), a.k, a.xa[1]);
    linear(l, 2, a.h1.p(), a.v, a.xa[2]);
    if (c_.qkv_bias) {
      check(kc::add_row_bias(a.q.p(), w.bq.as<float>(), n_, qd, stream_), "bias");
      check(kc::add_row_bias(a.k.p(), w.bk.as<float>(), n_, kvd, stream_), "bias");
      check(kc::add_row_bias(a.v.p(), w.bv.as<float>(), n_, kvd, stream_), "bias");
    }
    const int32_t* pos = positions_.as<int32_t>();
    check(kc::rope(a.q.p(), n_, qd, c_.n_heads, c_.head_dim, c_.rope_dim, pos, 1, c_.rope_theta, c_.rope_neox, stream_,
                   c_.rope()),
          "rope");
    check(kc::rope(a.k.p(), n_, kvd, c_.n_kv_heads, c_.head_dim, c_.rope_dim, pos, 1, c_.rope_theta, c_.rope_neox,
                   stream_, c_.rope()),
          "rope");
    float* o = a.o.resize(n_ * qd);
    float* lse = a.lse.resize(shape_.batch * c_.n_heads * shape_.seq_len);
    check(kc::causal_attention_forward(a.q.p(), a.k.p(), a.v.p(), o, lse, shape_.batch, shape_.seq_len, c_.n_heads,
                                       c_.n_kv_heads, c_.head_dim, 1.0f / std::sqrt(float(c_.head_dim)), stream_),
          "attention");
    linear(l, 3, o, a.x2, a.xa[3]);
    if (c_.o_bias) check(kc::add_row_bias(a.x2.p(), w.bo.as<float>(), n_, d, stream_), "bias");
    check(kc::add_inplace(a.x2.p(), a.x.p(), n_ * d, stream_), "residual");
    norm(a.x2.p(), w.ffn_norm.as<float>(), a.h2, a.inv2);
    linear(l, 4, a.h2.p(), a.g, a.xa[4]);
    linear(l, 5, a.h2.p(), a.u, a.xa[5]);
    check(kc::silu_mul(a.g.p(), a.u.p(), n_ * f, a.act.resize(n_ * f), kernels::DType::F32, stream_), "silu");
    linear(l, 6, a.act.p(), out, a.xa[6]);
    check(kc::add_inplace(out.p(), a.x2.p(), n_ * d, stream_), "residual");
    if (layer_skips_[size_t(l)] != 0)
      check(kc::copy_flagged_rows(out.p(), a.x.p(), flags(l), n_, d, stream_), "skipped rows");
  }

  // g with the rows that skip layer l zeroed (what the layer's branches see).
  const float* masked(int32_t l, const float* g, DBuf& buffer) {
    if (layer_skips_[size_t(l)] == 0) return g;
    const int64_t d = c_.n_embd;
    float* out = buffer.resize(n_ * d);
    copy(out, g, n_ * d);
    check(kc::zero_flagged_rows(out, flags(l), n_, d, stream_), "skipped rows");
    return out;
  }

  // dx: the gradient of the layer's output in, of its input out.
  void backward_layer(int32_t l, const DLayerActs& a, DBuf& dx) {
    const DLayerWeights& w = w_[size_t(l)];
    const int64_t d = c_.n_embd, f = c_.n_ff, qd = c_.q_dim(), kvd = c_.kv_dim();
    DBackward& bb = bb_;
    float* dx2 = bb.dx2.resize(n_ * d);
    copy(dx2, dx.p(), n_ * d);
    float* dact = bb.dact.resize(n_ * f);
    linear_backward(l, 6, masked(l, dx.p(), bb.upstream), a.act.p(), a.xa[6], dact, false);
    float* dg = bb.dg.resize(n_ * f);
    float* du = bb.du.resize(n_ * f);
    check(kc::silu_mul_backward(dg, du, dact, a.g.p(), a.u.p(), n_ * f, stream_), "silu backward");
    float* dh = bb.dh.resize(n_ * d);
    linear_backward(l, 4, dg, a.h2.p(), a.xa[4], dh, false);
    linear_backward(l, 5, du, a.h2.p(), a.xa[5], dh, true);
    check(kc::rmsnorm_backward(dx2, dh, a.x2.p(), a.inv2.p(), w.ffn_norm.as<float>(), n_, d, true, stream_),
          "rmsnorm backward");
    float* dout = bb.dout.resize(n_ * qd);
    linear_backward(l, 3, masked(l, dx2, bb.upstream), a.o.p(), a.xa[3], dout, false);
    float* dq = bb.dq.resize(n_ * qd);
    float* dk = bb.dk.resize(n_ * kvd);
    float* dv = bb.dv.resize(n_ * kvd);
    float* delta = bb.delta.resize(n_ * c_.n_heads);
    check(kc::causal_attention_backward(dq, dk, dv, delta, dout, a.q.p(), a.k.p(), a.v.p(), a.o.p(), a.lse.p(),
                                        shape_.batch, shape_.seq_len, c_.n_heads, c_.n_kv_heads, c_.head_dim,
                                        1.0f / std::sqrt(float(c_.head_dim)), stream_),
          "attention backward");
    const int32_t* pos = positions_.as<int32_t>();
    check(kc::rope_backward(dq, n_, qd, c_.n_heads, c_.head_dim, c_.rope_dim, pos, c_.rope_theta, c_.rope_neox,
                            stream_, c_.rope()),
          "rope backward");
    check(kc::rope_backward(dk, n_, kvd, c_.n_kv_heads, c_.head_dim, c_.rope_dim, pos, c_.rope_theta, c_.rope_neox,
                            stream_, c_.rope()),
          "rope backward");
    linear_backward(l, 0, dq, a.h1.p(), a.xa[0], dh, false);
    linear_backward(l, 1, dk, a.h1.p(), a.xa[1], dh, true);
    linear_backward(l, 2, dv, a.h1.p(), a.xa[2], dh, true);
    copy(dx.p(), dx2, n_ * d);
    check(kc::rmsnorm_backward(dx.p(), dh, a.x.p(), a.inv1.p(), w.attn_norm.as<float>(), n_, d, true, stream_),
          "rmsnorm backward");
  }

  Status begin(const Batch& b, const AdapterSet& adapters, AdapterGrads* g, bool use_dropout, uint64_t seed) {
    auto shape = check_call(c_, b, adapters, g);
    if (!shape) return shape.error();
    if (b.seq_len > kc::kTrainAttentionMaxSeq)
      return Error{fmt::format("fine-tuning batch: sequence length {} exceeds the {} tokens the CUDA training "
                               "attention takes", b.seq_len, kc::kTrainAttentionMaxSeq)};
    shape_ = std::move(*shape);
    n_ = shape_.rows;
    set_ = &adapters;
    dropout_ = use_dropout && opt_.dropout > 0;
    seed_ = seed;
    upload(positions_, shape_.positions.data(), shape_.positions.size(), stream_);
    upload(tokens_, b.tokens.data(), b.tokens.size(), stream_);
    // Skip flags by layer, then row.
    layer_skips_.assign(size_t(c_.n_layers), 0);
    std::vector<uint8_t> by_layer(b.skip.empty() ? 0 : size_t(c_.n_layers * n_), 0);
    for (int64_t r = 0; r < int64_t(b.skip.empty() ? 0 : n_); ++r)
      for (int32_t l = 0; l < c_.n_layers; ++l)
        if (b.skip[size_t(r * c_.n_layers + l)] != 0) {
          by_layer[size_t(l * n_ + r)] = 1;
          layer_skips_[size_t(l)] = 1;
        }
    upload(skip_flags_, by_layer.data(), by_layer.size(), stream_);
    // The rows with a target, in order, and their targets.
    loss_rows_host_.clear();
    std::vector<int32_t> targets;
    for (int64_t i = 0; i < n_; ++i)
      if (b.targets[size_t(i)] >= 0) {
        loss_rows_host_.push_back(int32_t(i));
        targets.push_back(b.targets[size_t(i)]);
      }
    upload(loss_rows_, loss_rows_host_.data(), loss_rows_host_.size(), stream_);
    upload(loss_targets_, targets.data(), targets.size(), stream_);
    a_.resize(adapters.adapters.size());
    b_.resize(adapters.adapters.size());
    for (size_t i = 0; i < adapters.adapters.size(); ++i) {
      upload(a_[i], adapters.adapters[i].a.data(), adapters.adapters[i].a.size(), stream_);
      upload(b_[i], adapters.adapters[i].b.data(), adapters.adapters[i].b.size(), stream_);
    }
    // The gradient buffers stay allocated between calls like the activations
    // (freeing one would also synchronize the device); a call with gradients
    // zeroes what it uses, and one without leaves them, as it runs no backward.
    if (g != nullptr) {
      ga_.resize(adapters.adapters.size());
      gb_.resize(adapters.adapters.size());
      for (size_t i = 0; i < adapters.adapters.size(); ++i) {
        check(cudaMemsetAsync(ga_[i].resize(int64_t(g->a[i].size())), 0, g->a[i].size() * sizeof(float), stream_),
              "zero gradients");
        check(cudaMemsetAsync(gb_[i].resize(int64_t(g->b[i].size())), 0, g->b[i].size() * sizeof(float), stream_),
              "zero gradients");
      }
    }
    return ok_status();
  }

  // Every layer from the embedding; the last layer's output in x_.
  void forward_layers(const std::function<void(int32_t, const float*)>& after_layer) {
    const int64_t d = c_.n_embd;
    check(kc::embedding_lookup(embd_.as(), kernels::DType::F32, d, tokens_.as<int32_t>(), n_, x_.resize(n_ * d),
                               stream_),
          "embedding");
    acts_.resize(opt_.checkpoint_layers ? 1 : size_t(c_.n_layers));
    inputs_.resize(opt_.checkpoint_layers ? size_t(c_.n_layers) : 0);
    for (int32_t l = 0; l < c_.n_layers; ++l) {
      DLayerActs& a = acts_[opt_.checkpoint_layers ? 0 : size_t(l)];
      if (opt_.checkpoint_layers) copy(inputs_[size_t(l)].resize(n_ * d), x_.p(), n_ * d);
      std::swap(a.x, x_);
      forward_layer(l, a, next_);
      std::swap(x_, next_);
      if (after_layer) after_layer(l, x_.p());
    }
  }

  // The cross-entropy of h (n, d) against the call's targets, loss_chunk_rows
  // rows of logits at a time; with dh, grad_scale * d(loss_sum)/dh too.
  StepResult cross_entropy(const float* h, DBuf* dh, float grad_scale) {
    const int64_t d = c_.n_embd, V = c_.n_vocab, count = int64_t(loss_rows_host_.size());
    StepResult r;
    r.tokens = count;
    if (dh != nullptr) check(cudaMemsetAsync(dh->resize(n_ * d), 0, size_t(n_ * d) * sizeof(float), stream_), "zero");
    if (count == 0) return r;
    const int64_t chunk = std::min<int64_t>(std::max<int64_t>(1, opt_.loss_chunk_rows), count);
    float* hc = hc_.resize(chunk * d);
    float* z = z_.resize(chunk * V);
    float* dhc = dhc_.resize(chunk * d);
    if (!row_loss_.reserve(size_t(count) * sizeof(double))) throw DeviceFailure("out of GPU memory for the losses");
    const int32_t* rows = loss_rows_.as<int32_t>();
    for (int64_t begin = 0; begin < count; begin += chunk) {
      const int64_t m = std::min(chunk, count - begin);
      check(kc::gather_rows(h, kernels::DType::F32, d, rows + begin, m, hc, stream_), "gather rows");
      gemm(false, true, m, V, d, 1.0f, hc, d, head_, d, 0.0f, z, V, "logits");
      check(kc::softmax_cross_entropy(z, loss_targets_.as<int32_t>() + begin, m, V, grad_scale, dh != nullptr,
                                      row_loss_.as<double>() + begin, stream_),
            "cross-entropy");
      if (dh == nullptr) continue;
      gemm(false, false, m, d, V, 1.0f, z, V, head_, d, 0.0f, dhc, d, "logits backward");
      check(kc::scatter_rows(dh->p(), dhc, rows + begin, m, d, stream_), "scatter rows");
    }
    std::vector<double> row_loss(static_cast<size_t>(count));
    check(cudaMemcpyAsync(row_loss.data(), row_loss_.as(), row_loss.size() * sizeof(double), cudaMemcpyDeviceToHost,
                          stream_),
          "losses");
    check(cudaStreamSynchronize(stream_), "losses");
    for (double v : row_loss) r.loss_sum += v;  // row order, as the CPU graph sums
    return r;
  }

  int64_t held_bytes() const {
    int64_t n = bb_.held();
    for (const auto& a : acts_) n += a.held();
    for (const auto* list : {&inputs_, &exit_grads_})
      for (const auto& t : *list) n += t.held();
    for (const DBuf* t : {&x_, &next_, &dx_, &h_, &hinv_, &dh_, &hc_, &z_, &dhc_, &dropped_}) n += t->held();
    return n;
  }

  Result<StepResult> run_checked(const Batch& b, const AdapterSet& adapters, AdapterGrads* g, float grad_scale,
                                 uint64_t seed) {
    if (auto s = begin(b, adapters, g, g != nullptr, seed); !s) return s.error();
    const int32_t last = c_.n_layers - 1;
    const int64_t d = c_.n_embd;
    auto weight_of = [&](int32_t l) {
      return opt_.exit_weights.empty() ? (l == last ? 1.0f : 0.0f) : opt_.exit_weights[size_t(l)];
    };
    StepResult r;
    exit_grads_.resize(size_t(c_.n_layers));
    for (auto& e : exit_grads_) e.count = 0;
    auto exit_loss = [&](int32_t l, const float* out) {
      const float w = weight_of(l);
      if (w == 0) return;
      final_norm(out, h_, hinv_);
      const StepResult e = cross_entropy(h_.p(), g != nullptr ? &dh_ : nullptr, grad_scale * w);
      r.loss_sum += double(w) * e.loss_sum;
      r.tokens = e.tokens;
      if (!opt_.exit_weights.empty()) r.exit_loss_sums.push_back(e.loss_sum);
      if (g == nullptr) return;
      check(kc::rmsnorm_backward(exit_grads_[size_t(l)].resize(n_ * d), dh_.p(), out, hinv_.p(), out_norm_.as<float>(),
                                 n_, d, false, stream_),
            "final norm backward");
    };
    forward_layers([&](int32_t l, const float* out) {
      if (l < last) exit_loss(l, out);
    });
    exit_loss(last, x_.p());
    mem_.peak_activation_bytes = std::max(mem_.peak_activation_bytes, held_bytes());
    if (g == nullptr) return r;

    float* dx = dx_.resize(n_ * d);
    check(cudaMemsetAsync(dx, 0, size_t(n_ * d) * sizeof(float), stream_), "zero");
    for (int32_t l = last; l >= 0; --l) {
      if (exit_grads_[size_t(l)].count > 0) {
        check(kc::add_inplace(dx, exit_grads_[size_t(l)].p(), n_ * d, stream_), "exit gradient");
        exit_grads_[size_t(l)].count = 0;
      }
      DLayerActs& a = acts_[opt_.checkpoint_layers ? 0 : size_t(l)];
      if (opt_.checkpoint_layers) {
        copy(a.x.resize(n_ * d), inputs_[size_t(l)].p(), n_ * d);
        forward_layer(l, a, next_);
      }
      backward_layer(l, a, dx_);
      mem_.peak_activation_bytes = std::max(mem_.peak_activation_bytes, held_bytes());
    }
    // The adapters' gradients onto the caller's.
    std::vector<float> host;
    for (size_t i = 0; i < ga_.size(); ++i) {
      for (int which = 0; which < 2; ++which) {
        const DBuf& src = which == 0 ? ga_[i] : gb_[i];
        std::vector<float>& dst = which == 0 ? g->a[i] : g->b[i];
        host.resize(dst.size());
        check(cudaMemcpyAsync(host.data(), src.p(), host.size() * sizeof(float), cudaMemcpyDeviceToHost, stream_),
              "gradients");
        check(cudaStreamSynchronize(stream_), "gradients");
        for (size_t e = 0; e < dst.size(); ++e) dst[e] += host[e];
      }
    }
    return r;
  }
};

void CudaGraph::setup() {
  check(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "no CUDA GPU");
  check(cublasCreate(&blas_), "cuBLAS");
  check(cublasSetStream(blas_, stream_), "cuBLAS");
  check(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH), "cuBLAS");  // FP32 SGEMMs, never TF32
  const ModelWeights& mw = model_->weights();
  w_.resize(size_t(c_.n_layers));
  std::vector<float> map;
  for (int32_t l = 0; l < c_.n_layers; ++l) {
    const LayerWeights& lw = mw.layers[size_t(l)];
    DLayerWeights& dw = w_[size_t(l)];
    for (int s = 0; s < kSlots; ++s) {
      const auto shape = slot_shape(c_, s);
      const int64_t out = shape.first, in = shape.second;
      const float* host = slot_weight(lw, s).data();
      if (opt_.base.format == WeightFormat::Model) {
        upload(dw.proj[size_t(s)], host, size_t(out * in), stream_);
        mem_.base_weight_bytes += out * in * int64_t(sizeof(float));
        continue;
      }
      const auto q = kernels::cpu::quant4_quantize(host, out, in, quant4_format(opt_.base.format), opt_.base.block_size,
                                                   opt_.base.double_quant);
      DQuant4& dq = dw.quant[size_t(s)];
      upload(dq.codes, q.codes.data(), q.codes.size(), stream_);
      upload(dq.absmax, q.absmax.data(), q.absmax.size(), stream_);
      upload(dq.absmax_codes, q.absmax_codes.data(), q.absmax_codes.size(), stream_);
      upload(dq.absmax_scale, q.absmax_scale.data(), q.absmax_scale.size(), stream_);
      if (q.double_quant && dynamic_map_.bytes() == 0) {
        const auto m = kernels::cpu::dynamic_map_signed();
        map.assign(m.begin(), m.end());
        upload(dynamic_map_, map.data(), map.size(), stream_);
      }
      check(cudaStreamSynchronize(stream_), "upload");  // q's host copies are freed at the end of this iteration
      kc::Quant4View& v = dq.view;
      v.codes = dq.codes.as<uint8_t>();
      v.absmax = dq.absmax.bytes() > 0 ? dq.absmax.as<float>() : nullptr;
      v.absmax_codes = dq.absmax_codes.bytes() > 0 ? dq.absmax_codes.as<uint8_t>() : nullptr;
      v.absmax_scale = dq.absmax_scale.bytes() > 0 ? dq.absmax_scale.as<float>() : nullptr;
      v.absmax_offset = q.absmax_offset;
      const auto levels = kernels::cpu::quant4_levels(q.format);
      std::copy(levels.begin(), levels.end(), v.levels);
      v.block = q.block;
      v.n = out * in;
      mem_.base_weight_bytes += q.bytes();
    }
    upload(dw.attn_norm, lw.attn_norm.data(), lw.attn_norm.size(), stream_);
    upload(dw.ffn_norm, lw.ffn_norm.data(), lw.ffn_norm.size(), stream_);
    upload(dw.bq, lw.bq.data(), lw.bq.size(), stream_);
    upload(dw.bk, lw.bk.data(), lw.bk.size(), stream_);
    upload(dw.bv, lw.bv.data(), lw.bv.size(), stream_);
    upload(dw.bo, lw.bo.data(), lw.bo.size(), stream_);
  }
  for (auto& dw : w_)  // the map's address is known once every layer is uploaded
    for (auto& dq : dw.quant) dq.view.dynamic_map = dynamic_map_.bytes() > 0 ? dynamic_map_.as<float>() : nullptr;
  upload(embd_, mw.token_embd.data(), mw.token_embd.size(), stream_);
  upload(out_norm_, mw.output_norm.data(), mw.output_norm.size(), stream_);
  if (mw.lm_head() == mw.token_embd.data()) {
    head_ = embd_.as<float>();
  } else {
    upload(head_store_, mw.output.data(), mw.output.size(), stream_);
    head_ = head_store_.as<float>();
  }
  check(cudaStreamSynchronize(stream_), "upload");
}

}  // namespace

Result<std::unique_ptr<DeviceGraph>> make_cuda_graph(std::shared_ptr<const Model> model, const GraphOptions& options) {
  auto graph = std::make_unique<CudaGraph>(std::move(model), options);
  try {
    graph->setup();
  } catch (const DeviceFailure& e) {
    return Error{fmt::format("fine-tuning on CUDA: {}", e.what())};
  }
  return std::unique_ptr<DeviceGraph>(std::move(graph));
}

}  // namespace inferlab::finetune::detail
