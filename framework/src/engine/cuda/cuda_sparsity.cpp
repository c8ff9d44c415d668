// Activation sparsity on the CUDA backend (TEAL's sparse projections, CATS's
// gated FFN): one-row calls read only the weight rows of kept inputs from a
// transposed copy; the decisions stay on the device, so such steps replay.
#include <fmt/format.h>

#include <algorithm>

#include "cuda/activation.cuh"
#include "cuda/activation_sparse.cuh"
#include "cuda/gemm.cuh"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"

namespace inferlab {

namespace kc = kernels::cuda;

namespace {
unsigned long long* zeros_of(const DeviceMemory& zeros, Proj p) {
  return zeros.as<unsigned long long>() + static_cast<int>(p);
}
}  // namespace

Status CudaBackend::linear_sparse(std::span<const Proj> projs, int32_t l, std::span<const float> thresholds) {
  for (size_t i = 0; i < projs.size(); ++i)
    if (auto s = linear_sparse_one(projs[i], l, thresholds[i]); !s) return s;
  return ok_status();
}

Status CudaBackend::linear_sparse_one(Proj p, int32_t l, float threshold) {
  auto io = linear_io(p);
  if (!io) return io.error();
  const bool adapter = adapters_.count({int32_t(p), l}) != 0;
  if (n_ == 1 && stored_.count({int32_t(p), l}) == 0) {
    const void* wt = transposed(p, l);
    if (wt == nullptr) return Error{fmt::format("cuda engine: out of GPU memory for a transposed {}", proj_name(p))};
    CUDA_TRY(kc::sparse_input_gemv(io->x, wt, dtype_, io->in, io->out, threshold, sparse_partial_.as<float>(), io->y,
                                   zeros_of(sparse_zeros_, p), stream_),
             "sparse projection");
    if (!adapter) return ok_status();
    CUDA_TRY(kc::sparsify(io->x, dtype_, io->in, threshold, sparse_x_.as(), nullptr, stream_), "sparsify");
    return apply_adapter(p, l, sparse_x_.as(), io->y, io->in, io->out);
  }
  // More rows (or NF4 storage): the sparsified input through the dense GEMM.
  const size_t bytes = size_t(n_ * io->in) * size_t(kernels::dtype_bytes(dtype_));
  if (bytes > sparse_x_.bytes()) {
    drop_graphs();  // they hold the old address
    if (!sparse_x_.reserve(bytes))
      return Error{fmt::format("cuda engine: out of GPU memory for a sparsified input of {} rows", n_)};
  }
  CUDA_TRY(kc::sparsify(io->x, dtype_, n_ * io->in, threshold, sparse_x_.as(), zeros_of(sparse_zeros_, p), stream_),
           "sparsify");
  return linear_from(p, l, sparse_x_.as(), io->y, io->in, io->out);
}

Status CudaBackend::gated_swiglu(int32_t l, float threshold) {
  const ModelConfig& c = config_;
  const std::pair<int32_t, int32_t> up{int32_t(Proj::Up), l};
  if (n_ == 1 && stored_.count(up) == 0 && adapters_.count(up) == 0) {
    CUDA_TRY(kc::gated_silu_up(gate_.as<float>(), xn_.as(), weight(Proj::Up, l), dtype_, c.n_ff, c.n_embd, threshold,
                               act_.as(), zeros_of(sparse_zeros_, Proj::Up), stream_),
             "gated up");
    return ok_status();
  }
  if (auto s = linear(Proj::Up, l, nullptr); !s) return s;
  CUDA_TRY(kc::gated_silu_mul(gate_.as<float>(), up_.as<float>(), n_ * c.n_ff, threshold, act_.as(), dtype_,
                              zeros_of(sparse_zeros_, Proj::Up), stream_),
           "gated swiglu");
  return ok_status();
}

// Every transposed weight the method reads, and the workspace, made now (not
// inside a captured step); what an earlier method's needed is freed.
Status CudaBackend::prepare_sparsity(const ActivationSparsity& sparsity) {
  if (!sparsity.active() && !sparsity_prepared_) return ok_status();
  drop_graphs();  // a captured step holds the previous method's projections
  const ModelConfig& c = config_;
  int64_t partial = 0, widest = 0;
  for (int32_t l = 0; l < c.n_layers; ++l)
    for (int32_t p = 0; p < kSparseProjections; ++p) {
      if (!reads_transposed(sparsity, l, Proj(p))) {
        transposed_.erase({p, l});
        continue;
      }
      if (transposed(Proj(p), l) == nullptr)
        return Error{fmt::format("cuda engine: out of GPU memory for a transposed {} of layer {}", proj_name(Proj(p)), l)};
      const auto [out, in] = proj_shape(c, Proj(p));
      partial = std::max(partial, kc::sparse_input_splits(in) * out);
      widest = std::max(widest, in);
    }
  sparsity_prepared_ = sparsity.active();
  if (!sparsity_prepared_) {
    sparse_partial_ = DeviceMemory{};
    sparse_x_ = DeviceMemory{};
    return ok_status();
  }
  if (!sparse_partial_.reserve(size_t(partial) * 4) || !sparse_zeros_.reserve(size_t(kSparseProjections) * 8) ||
      (sparse_x_.bytes() < size_t(widest) * size_t(kernels::dtype_bytes(dtype_)) &&
       !sparse_x_.reserve(size_t(widest) * size_t(kernels::dtype_bytes(dtype_)))))
    return Error{"cuda engine: out of GPU memory for activation sparsity's workspace"};
  CUDA_TRY(cudaMemsetAsync(sparse_zeros_.as(), 0, size_t(kSparseProjections) * 8, stream_), "sparsity counters");
  CUDA_TRY(cudaStreamSynchronize(stream_), "transposed weights");
  return ok_status();
}

Status CudaBackend::read_sparsity(std::array<int64_t, kSparseProjections>& zeros) {
  zeros.fill(0);
  if (!sparsity_prepared_) return ok_status();
  std::array<unsigned long long, kSparseProjections> counts{};
  if (auto s = download(sparse_zeros_.as(), sizeof(counts), counts.data()); !s) return s;
  CUDA_TRY(cudaMemsetAsync(sparse_zeros_.as(), 0, sizeof(counts), stream_), "sparsity counters");
  for (size_t p = 0; p < counts.size(); ++p) zeros[p] = int64_t(counts[p]);
  return ok_status();
}

// Heads of a component mask: Q from the kept heads' rows of W_q (gathered,
// one GEMM, each head's columns copied into place); O from their attention
// columns against their rows of the transposed W_o.
Status CudaBackend::linear_heads(Proj p, int32_t l, std::span<const int32_t> heads) {
  const ModelConfig& c = config_;
  if (p != Proj::Q && p != Proj::O) return Error{fmt::format("cuda backend: {} has no heads", proj_name(p))};
  if (stored_.count({int32_t(p), l}) != 0 || adapters_.count({int32_t(p), l}) != 0)
    return linear(p, l, nullptr);  // NF4 or adapters: the whole projection (masked heads' outputs are zero), no saving
  const int64_t hd = c.head_dim, qd = c.q_dim(), e = c.n_embd, k = int64_t(heads.size()) * hd;
  const size_t el = size_t(kernels::dtype_bytes(dtype_));
  if (k == 0) {
    if (p == Proj::O) CUDA_TRY(cudaMemsetAsync(proj_.as(), 0, size_t(n_ * e) * 4, stream_), "heads");
    return ok_status();
  }
  std::vector<int32_t> rows;
  for (const int32_t h : heads)
    for (int64_t d = 0; d < hd; ++d) rows.push_back(int32_t(h * hd + d));
  if (!w_sel_.reserve(size_t(k * e) * el) || !rows_.reserve(size_t(k) * 4) || !head_tmp_.reserve(size_t(n_ * k) * 4) ||
      !rows_partial_.reserve(size_t(kc::sparse_input_splits(k) * e) * 4))
    return Error{"cuda engine: out of GPU memory for the selected heads"};
  CUDA_TRY(cudaMemcpyAsync(rows_.as(), rows.data(), size_t(k) * 4, cudaMemcpyHostToDevice, stream_), "heads");
  if (p == Proj::Q) {
    if (n_ == 1) {  // one row: the heads' rows of W_q read in place
      CUDA_TRY(kc::gathered_rows_gemv(xn_.as(), weight(Proj::Q, l), dtype_, rows_.as<int32_t>(), k, e,
                                      head_tmp_.as<float>(), stream_),
               "heads");
    } else {
      CUDA_TRY(kc::gather_rows(weight(Proj::Q, l), dtype_, e, rows_.as<int32_t>(), k, w_sel_.as(), stream_), "gather");
      if (auto s = gemm(xn_.as(), w_sel_.as(), head_tmp_.as<float>(), n_, k, e); !s) return s;
    }
    for (size_t i = 0; i < heads.size(); ++i)  // each head's columns into place
      CUDA_TRY(cudaMemcpy2DAsync(q_.as<float>() + heads[i] * hd, size_t(qd) * 4, head_tmp_.as<float>() + int64_t(i) * hd,
                                 size_t(k) * 4, size_t(hd) * 4, size_t(n_), cudaMemcpyDeviceToDevice, stream_),
               "heads");
  } else {
    CUDA_TRY(kc::convert_from_float(attn_.as<float>(), n_ * qd, attn_t_.as(), dtype_, stream_), "convert");
    auto* compact = head_tmp_.as<uint8_t>();
    for (size_t i = 0; i < heads.size(); ++i)
      CUDA_TRY(cudaMemcpy2DAsync(compact + i * size_t(hd) * el, size_t(k) * el, attn_t_.as<uint8_t>() + heads[i] * hd * el,
                                 size_t(qd) * el, size_t(hd) * el, size_t(n_), cudaMemcpyDeviceToDevice, stream_),
               "heads");
    const void* o_t = transposed(Proj::O, l);
    if (o_t == nullptr) return Error{"cuda engine: out of GPU memory for a transposed output projection"};
    if (n_ == 1) {  // one row: the heads' rows of the transposed W_o read in place
      CUDA_TRY(kc::rows_gemv(compact, o_t, dtype_, rows_.as<int32_t>(), k, e, rows_partial_.as<float>(),
                             proj_.as<float>(), stream_),
               "heads");
    } else {
      CUDA_TRY(kc::gather_rows(o_t, dtype_, e, rows_.as<int32_t>(), k, w_sel_.as(), stream_), "gather");
      if (kc::gemm_xw(cublas_, compact, w_sel_.as(), dtype_, proj_.as<float>(), n_, e, k) != CUBLAS_STATUS_SUCCESS)
        return Error{"cuda: cuBLAS GEMM of the selected heads' output rows failed"};
    }
  }
  CUDA_TRY(cudaStreamSynchronize(stream_), "heads");  // `rows` is ours, on the host
  return ok_status();
}

Status CudaBackend::keep_top_neurons(int32_t k) {
  CUDA_TRY(kc::keep_top_k_magnitudes(act_.as(), dtype_, n_, config_.n_ff, k, stream_), "oracle neurons");
  return ok_status();
}

Status CudaBackend::keep_top_heads(int32_t k, std::span<const uint8_t> computed) {
  if (!head_flags_.reserve(computed.size())) return Error{"cuda engine: out of GPU memory for head flags"};
  CUDA_TRY(cudaMemcpyAsync(head_flags_.as(), computed.data(), computed.size(), cudaMemcpyHostToDevice, stream_), "heads");
  CUDA_TRY(kc::keep_top_heads(attn_.as<float>(), n_, config_.n_heads, config_.head_dim, k, head_flags_.as<uint8_t>(),
                              stream_),
           "oracle heads");
  CUDA_TRY(cudaStreamSynchronize(stream_), "oracle heads");  // `computed` is the caller's
  return ok_status();
}

}  // namespace inferlab

