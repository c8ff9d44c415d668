// The CUDA backend's weights: uploaded from the model (converted to the GPU
// type) or made from a seed, and replaced for one method's runs. Every
// projection goes through weight(): the one place a replacement takes effect,
// in eager steps and captured graphs alike.
#include <fmt/format.h>

#include <cmath>

#include "cuda/activation.cuh"
#include "cuda/gemm.cuh"
#include "cuda/init.cuh"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"

namespace inferlab {

namespace kc = kernels::cuda;
using kernels::DType;

void* CudaBackend::weight_alloc(int64_t elems, DType dtype) {
  weight_buffers_.emplace_back();
  const size_t bytes = size_t(elems) * size_t(kernels::dtype_bytes(dtype));
  if (!weight_buffers_.back().reserve(bytes)) return nullptr;
  weight_bytes_ += int64_t(bytes);
  return weight_buffers_.back().as();
}

Status CudaBackend::upload_weights() {
  const ModelConfig& c = config_;
  const ModelWeights& w = model_->weights();
  DeviceMemory staging;
  // One float32 tensor through a staging buffer, converted to the GPU type.
  auto matrix = [&](const WeightVector& host, const void*& out) -> Status {
    void* dst = weight_alloc(int64_t(host.size()), dtype_);
    if (dst == nullptr || !staging.reserve(host.size() * 4)) return Error{"cuda engine: out of GPU memory for weights"};
    CUDA_TRY(cudaMemcpyAsync(staging.as(), host.data(), host.size() * 4, cudaMemcpyHostToDevice, stream_), "upload");
    CUDA_TRY(kc::convert_from_float(staging.as<float>(), int64_t(host.size()), dst, dtype_, stream_), "convert");
    CUDA_TRY(cudaStreamSynchronize(stream_), "upload");
    out = dst;
    return ok_status();
  };
  auto vector = [&](const WeightVector& host, const float*& out) -> Status {
    void* dst = weight_alloc(int64_t(host.size()), DType::F32);
    if (dst == nullptr) return Error{"cuda engine: out of GPU memory for weights"};
    // On our non-blocking stream: a legacy-stream cudaMemcpy from pageable memory may
    // return before the data lands, and our stream would not wait for it.
    CUDA_TRY(cudaMemcpyAsync(dst, host.data(), host.size() * 4, cudaMemcpyHostToDevice, stream_), "upload");
    CUDA_TRY(cudaStreamSynchronize(stream_), "upload");
    out = static_cast<const float*>(dst);
    return ok_status();
  };
  weights_.assign(size_t(kProjCount), std::vector<const void*>(size_t(std::max(1, c.n_layers)), nullptr));
  norms_.resize(size_t(c.n_layers));
  if (auto s = matrix(w.token_embd, token_embd_); !s) return s;
  const void*& head = weights_[size_t(Proj::Output)][0];
  head = token_embd_;
  if (!w.output.empty())
    if (auto s = matrix(w.output, head); !s) return s;
  if (auto s = vector(w.output_norm, output_norm_); !s) return s;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const LayerWeights& lw = w.layers[size_t(l)];
    for (auto [p, host] : {std::pair{Proj::Q, &lw.wq}, {Proj::K, &lw.wk}, {Proj::V, &lw.wv}, {Proj::O, &lw.wo},
                           {Proj::Gate, &lw.w_gate}, {Proj::Up, &lw.w_up}, {Proj::Down, &lw.w_down}})
      if (auto s = matrix(*host, weights_[size_t(p)][size_t(l)]); !s) return s;
    biases_.resize(size_t(c.n_layers));
    for (auto [p, host] : {std::pair{Proj::Q, &lw.bq}, {Proj::K, &lw.bk}, {Proj::V, &lw.bv}, {Proj::O, &lw.bo}})
      if (!host->empty())
        if (auto s = vector(*host, biases_[size_t(l)][size_t(p)]); !s) return s;
    if (auto s = vector(lw.attn_norm, norms_[size_t(l)].attn); !s) return s;
    if (auto s = vector(lw.ffn_norm, norms_[size_t(l)].ffn); !s) return s;
  }
  return ok_status();
}

Status CudaBackend::random_weights(uint64_t seed) {
  const ModelConfig& c = config_;
  uint64_t tensor = 0;
  // Scales of write_synthetic_model: activations stay O(1).
  const float in_scale = 1.0f / std::sqrt(float(c.n_embd)), down_scale = 1.0f / std::sqrt(float(c.n_ff));
  auto matrix = [&](int64_t rows, int64_t cols, float stddev, const void*& out) -> Status {
    void* dst = weight_alloc(rows * cols, dtype_);
    if (dst == nullptr) return Error{"cuda engine: out of GPU memory for weights"};
    CUDA_TRY(kc::fill_random_normal(dst, dtype_, rows * cols, seed * 1000003u + tensor++, stddev, stream_), "init");
    out = dst;
    return ok_status();
  };
  auto ones = [&](int64_t n, const float*& out) -> Status {
    void* dst = weight_alloc(n, DType::F32);
    if (dst == nullptr) return Error{"cuda engine: out of GPU memory for weights"};
    CUDA_TRY(kc::fill_constant(dst, DType::F32, n, 1.0f, stream_), "init");
    out = static_cast<const float*>(dst);
    return ok_status();
  };
  weights_.assign(size_t(kProjCount), std::vector<const void*>(size_t(std::max(1, c.n_layers)), nullptr));
  norms_.resize(size_t(c.n_layers));
  if (auto s = matrix(c.n_vocab, c.n_embd, 1.0f, token_embd_); !s) return s;
  const void*& head = weights_[size_t(Proj::Output)][0];
  head = token_embd_;
  if (!c.tied_embeddings)
    if (auto s = matrix(c.n_vocab, c.n_embd, in_scale, head); !s) return s;
  if (auto s = ones(c.n_embd, output_norm_); !s) return s;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    auto at = [&](Proj p) -> const void*& { return weights_[size_t(p)][size_t(l)]; };
    Status s = matrix(c.q_dim(), c.n_embd, 2 * in_scale, at(Proj::Q));
    if (s) s = matrix(c.kv_dim(), c.n_embd, 2 * in_scale, at(Proj::K));
    if (s) s = matrix(c.kv_dim(), c.n_embd, in_scale, at(Proj::V));
    if (s) s = matrix(c.n_embd, c.q_dim(), in_scale, at(Proj::O));
    if (s) s = matrix(c.n_ff, c.n_embd, in_scale, at(Proj::Gate));
    if (s) s = matrix(c.n_ff, c.n_embd, in_scale, at(Proj::Up));
    if (s) s = matrix(c.n_embd, c.n_ff, down_scale, at(Proj::Down));
    if (s) s = ones(c.n_embd, norms_[size_t(l)].attn);
    if (s) s = ones(c.n_embd, norms_[size_t(l)].ffn);
    if (!s) return s;
  }
  CUDA_TRY(cudaStreamSynchronize(stream_), "init");
  return ok_status();
}

const void* CudaBackend::weight(Proj p, int32_t l) const {
  const int32_t at = std::max(l, 0);
  if (auto it = overrides_.find({int32_t(p), at}); it != overrides_.end()) return it->second.as();
  return weights_[size_t(p)][size_t(at)];
}

Status CudaBackend::set_weight_override(Proj p, int32_t l, std::span<const float> data) {
  const int32_t at = std::max(l, 0);
  // A captured graph holds the weight's address; a transposed copy was made from it.
  drop_graphs();
  transposed_.erase({int32_t(p), at});  // transposed again when needed
  if (data.empty()) {
    overrides_.erase({int32_t(p), at});
    return ok_status();
  }
  DeviceMemory staging, converted;
  if (!staging.reserve(data.size() * 4) || !converted.reserve(data.size() * size_t(kernels::dtype_bytes(dtype_))))
    return Error{fmt::format("cuda engine: out of GPU memory for a replaced {}", proj_name(p))};
  CUDA_TRY(cudaMemcpyAsync(staging.as(), data.data(), data.size() * 4, cudaMemcpyHostToDevice, stream_), "upload");
  CUDA_TRY(kc::convert_from_float(staging.as<float>(), int64_t(data.size()), converted.as(), dtype_, stream_),
           "convert");
  CUDA_TRY(cudaStreamSynchronize(stream_), "upload");  // `data` is the caller's, `staging` ours
  overrides_[{int32_t(p), at}] = std::move(converted);
  return ok_status();
}

const void* CudaBackend::transposed(Proj p, int32_t l) {
  DeviceMemory& t = transposed_[{int32_t(p), l}];
  if (t.bytes() == 0) {
    const auto [out, in] = proj_shape(config_, p);
    if (!t.reserve(size_t(out) * size_t(in) * size_t(kernels::dtype_bytes(dtype_))) ||
        kc::transpose(weight(p, l), dtype_, out, in, t.as(), stream_) != cudaSuccess) {
      transposed_.erase({int32_t(p), l});  // not transposed: the next call must not take it for done
      return nullptr;
    }
  }
  return t.as();
}

int64_t CudaBackend::weight_bytes() const {
  int64_t bytes = weight_bytes_;
  for (const auto& [key, t] : transposed_) bytes += int64_t(t.bytes());
  return bytes;
}

Status CudaBackend::gemm(const void* x, const void* w, float* y, int64_t m, int64_t n, int64_t k) {
  if (kc::gemm_xwt(cublas_, x, w, dtype_, y, m, n, k) != CUBLAS_STATUS_SUCCESS)
    return Error{fmt::format("cuda: cuBLAS GEMM ({} x {} x {}) failed", m, n, k)};
  return ok_status();
}

}  // namespace inferlab
