// The CUDA backend's dense ops of a layer: embedding, norms, the linear
// projections (gathered neuron rows included), activations, RoPE and logits.
#include <fmt/format.h>

#include "cpu/half_convert.h"
#include "cuda/activation.cuh"
#include "cuda/activation_sparse.cuh"
#include "cuda/embedding.cuh"
#include "cuda/gemm.cuh"
#include "cuda/rmsnorm.cuh"
#include "cuda/rope.cuh"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"

namespace inferlab {

namespace kc = kernels::cuda;

Status CudaBackend::embed() {
  CUDA_TRY(kc::embedding_lookup(token_embd_, dtype_, config_.n_embd, ids_.as<int32_t>(), n_, x_.as<float>(), stream_),
           "embedding");
  return ok_status();
}

Status CudaBackend::rmsnorm(Norm norm, int32_t l) {
  const DeviceLayerNorms& d = norms_[size_t(l)];
  CUDA_TRY(kc::rmsnorm(x_.as<float>(), norm == Norm::Attention ? d.attn : d.ffn, n_, config_.n_embd, config_.rms_eps,
                       xn_.as(), dtype_, stream_),
           "rmsnorm");
  return ok_status();
}

// A projection's input (in the GEMM's type) and output in the workspace; O's
// input is converted from the attention output first.
Result<CudaBackend::LinearIo> CudaBackend::linear_io(Proj p) {
  const ModelConfig& c = config_;
  switch (p) {
    case Proj::Q: return LinearIo{xn_.as(), q_.as<float>(), c.n_embd, c.q_dim()};
    case Proj::K: return LinearIo{xn_.as(), k_.as<float>(), c.n_embd, c.kv_dim()};
    case Proj::V: return LinearIo{xn_.as(), v_.as<float>(), c.n_embd, c.kv_dim()};
    case Proj::O:
      CUDA_TRY(kc::convert_from_float(attn_.as<float>(), n_ * c.q_dim(), attn_t_.as(), dtype_, stream_), "convert");
      return LinearIo{attn_t_.as(), proj_.as<float>(), c.q_dim(), c.n_embd};
    case Proj::Gate: return LinearIo{xn_.as(), gate_.as<float>(), c.n_embd, c.n_ff};
    case Proj::Up: return LinearIo{xn_.as(), up_.as<float>(), c.n_embd, c.n_ff};
    case Proj::Down: return LinearIo{act_.as(), proj_.as<float>(), c.n_ff, c.n_embd};
    case Proj::Output: break;
  }
  return Error{"cuda backend: the output projection runs inside the logits op"};
}

// y = x W^T (+ adapters) for the call's rows, x in the GEMM's type.
Status CudaBackend::linear_from(Proj p, int32_t l, const void* x, float* y, int64_t in, int64_t out) {
  auto fused = stored_gemv(p, l, x, y, in, out);
  if (!fused) return fused.error();
  if (!*fused) {
    const void* w = weight(p, l);
    Status dequantized = ok_status();
    if (const void* stored = stored_weight(p, l, dequantized); stored != nullptr) w = stored;
    if (!dequantized) return dequantized;
    if (auto s = gemm(x, w, y, n_, out, in); !s) return s;
  }
  return apply_adapter(p, l, x, y, in, out);
}

Status CudaBackend::linear(Proj p, int32_t l, const std::vector<int32_t>* rows) {
  const ModelConfig& c = config_;
  auto io = linear_io(p);
  if (!io) return io.error();
  const void* w = weight(p, l);
  if (rows == nullptr) return linear_from(p, l, io->x, io->y, io->in, io->out);
  float* y = io->y;
  if (stored_.count({int32_t(p), l}) != 0)
    return Error{fmt::format("cuda backend: a neuron subset of {}, stored in 4 bits for this run", proj_name(p))};
  if (adapters_.count({int32_t(p), l}) != 0)
    return Error{fmt::format("cuda backend: an unmerged adapter on {} with a neuron subset (merge it)", proj_name(p))};
  // Only the selected neurons: rows of gate/up, rows of the transposed down weight.
  const int64_t k = int64_t(rows->size());
  if (k == 0) {
    if (p == Proj::Down) CUDA_TRY(cudaMemsetAsync(proj_.as(), 0, size_t(n_ * c.n_embd) * 4, stream_), "ffn");
    return ok_status();
  }
  const size_t el = size_t(kernels::dtype_bytes(dtype_));
  if (!w_sel_.reserve(size_t(k) * size_t(c.n_embd) * el) || !rows_.reserve(size_t(k) * 4) ||
      !rows_partial_.reserve(size_t(kc::sparse_input_splits(k) * c.n_embd) * 4))
    return Error{"cuda engine: out of GPU memory for a neuron subset"};
  CUDA_TRY(cudaMemcpyAsync(rows_.as(), rows->data(), size_t(k) * 4, cudaMemcpyHostToDevice, stream_), "neuron subset");
  if (n_ == 1) {  // one row: the selected rows read in place (nothing gathered first)
    if (p == Proj::Down) {
      const void* down_t = transposed(Proj::Down, l);
      if (down_t == nullptr) return Error{"cuda engine: out of GPU memory for a transposed down projection"};
      CUDA_TRY(kc::rows_gemv(act_.as(), down_t, dtype_, rows_.as<int32_t>(), k, c.n_embd, rows_partial_.as<float>(),
                             proj_.as<float>(), stream_),
               "neuron subset");
    } else {
      CUDA_TRY(kc::gathered_rows_gemv(xn_.as(), w, dtype_, rows_.as<int32_t>(), k, c.n_embd, y, stream_), "neuron subset");
    }
  } else if (p == Proj::Down) {
    const void* down_t = transposed(Proj::Down, l);
    if (down_t == nullptr) return Error{"cuda engine: out of GPU memory for a transposed down projection"};
    CUDA_TRY(kc::gather_rows(down_t, dtype_, c.n_embd, rows_.as<int32_t>(), k, w_sel_.as(), stream_), "gather");
    if (kc::gemm_xw(cublas_, act_.as(), w_sel_.as(), dtype_, proj_.as<float>(), n_, c.n_embd, k) !=
        CUBLAS_STATUS_SUCCESS)
      return Error{"cuda: cuBLAS GEMM of the selected down rows failed"};
  } else {
    CUDA_TRY(kc::gather_rows(w, dtype_, c.n_embd, rows_.as<int32_t>(), k, w_sel_.as(), stream_), "gather");
    if (auto s = gemm(xn_.as(), w_sel_.as(), y, n_, k, c.n_embd); !s) return s;
  }
  CUDA_TRY(cudaStreamSynchronize(stream_), "neuron subset");  // `rows` is the caller's
  return ok_status();
}

Status CudaBackend::swiglu(int64_t cols) {
  if (cols == 0) return ok_status();
  CUDA_TRY(kc::silu_mul(gate_.as<float>(), up_.as<float>(), n_ * cols, act_.as(), dtype_, stream_), "swiglu");
  return ok_status();
}

Status CudaBackend::add_residual() {
  CUDA_TRY(kc::add_inplace(x_.as<float>(), proj_.as<float>(), n_ * config_.n_embd, stream_), "residual");
  return ok_status();
}

Status CudaBackend::add_bias(Proj p, int32_t l) {
  if (p != Proj::Q && p != Proj::K && p != Proj::V && p != Proj::O)
    return Error{fmt::format("cuda backend: {} has no bias", proj_name(p))};
  const float* bias = size_t(l) < biases_.size() ? biases_[size_t(l)][size_t(p)] : nullptr;
  if (bias == nullptr) return ok_status();
  float* y = p == Proj::Q ? q_.as<float>() : p == Proj::K ? k_.as<float>() : p == Proj::V ? v_.as<float>() : proj_.as<float>();
  CUDA_TRY(kc::add_row_bias(y, bias, n_, proj_shape(config_, p).first, stream_), "bias");
  return ok_status();
}

Status CudaBackend::rope(const KvSequence& seq, int32_t l, bool queries) {
  const ModelConfig& c = config_;
  if (!capturing_)  // a replayed step staged every layer's counts beforehand
    if (auto s = stage_counts(seq, l); !s) return s;
  const int32_t* device_counts = counts_at(l);
  int32_t groups = 1;
  int32_t* pos = positions_.as<int32_t>() + focus_row_;  // a batched call's segment: its rows' own
  if (cache_positions_) {  // written for these rows at each layer, over the call's unused original positions
    pos = positions_.as<int32_t>();
    CUDA_TRY(kc::cache_positions(device_counts, c.n_kv_heads, int32_t(n_), pos, stream_), "cache positions");
    groups = c.n_kv_heads;
  }
  if (queries)
    CUDA_TRY(kc::rope(sequence_rows(q_, c.q_dim()), n_, c.q_dim(), c.n_heads, c.head_dim, c.rope_dim, pos, groups,
                      c.rope_theta, c.rope_neox, stream_, c.rope()),
             "rope");
  CUDA_TRY(kc::rope(sequence_rows(k_, c.kv_dim()), n_, c.kv_dim(), c.n_kv_heads, c.head_dim, c.rope_dim, pos, groups,
                    c.rope_theta, c.rope_neox, stream_, c.rope()),
           "rope");
  return ok_status();
}

Status CudaBackend::logits(int64_t from, int64_t rows, const LogitsSink& sink) {
  if (auto s = join_predictions(); !s) return s;  // every side-stream prediction joins before the step ends
  const ModelConfig& c = config_;
  if (rows <= 0 || (!sink && !capturing_)) return ok_status();
  const int64_t el = kernels::dtype_bytes(dtype_);
  CUDA_TRY(kc::rmsnorm(x_.as<float>() + from * c.n_embd, output_norm_, rows, c.n_embd, c.rms_eps, xn_.as(), dtype_,
                       stream_),
           "rmsnorm");
  const void* head = weight(Proj::Output, -1);
  if (capturing_) {  // a step's rows (one per sequence, one chunk at most), handed over after the replay
    if (rows > kLogitsChunkRows) return Error{"cuda engine: a captured step's logits exceed one chunk"};
    return gemm(xn_.as(), head, logits_.as<float>(), rows, c.n_vocab, c.n_embd);
  }
  float* host = host_logits_.as<float>();
  for (int64_t r0 = 0; r0 < rows; r0 += kLogitsChunkRows) {
    const int64_t chunk = std::min(kLogitsChunkRows, rows - r0);
    if (auto s = gemm(xn_.as<char>() + r0 * c.n_embd * el, head, logits_.as<float>(), chunk, c.n_vocab, c.n_embd); !s)
      return s;
    CUDA_TRY(cudaMemcpyAsync(host, logits_.as(), size_t(chunk * c.n_vocab) * 4, cudaMemcpyDeviceToHost, stream_),
             "download logits");
    CUDA_TRY(cudaStreamSynchronize(stream_), "logits");
    for (int64_t r = 0; r < chunk; ++r)
      sink(from + r0 + r, std::span<const float>(host + r * c.n_vocab, size_t(c.n_vocab)));
  }
  return ok_status();
}

// The kept rows of the residual stream gathered into proj_ (free between
// layers) and copied back, so x_ keeps its address (captured graphs hold it);
// their positions staged again (the ids served the embedding only).
Status CudaBackend::keep_rows(std::span<const int32_t> rows) {
  const int64_t e = config_.n_embd, m = int64_t(rows.size());
  if (cache_positions_) return Error{"cuda backend: rows leave a call only with original positions"};
  if (!segments_.empty()) return Error{"cuda backend: rows cannot leave a batched call (its segments would move)"};
  if (m == n_) return ok_status();
  int32_t* staged = host_small_.as<int32_t>();  // room for the call's ids and positions
  CUDA_TRY(cudaStreamSynchronize(stream_), "keep rows");  // the staging buffer may still feed an upload
  for (int64_t j = 0; j < m; ++j) host_positions_[size_t(j)] = host_positions_[size_t(rows[size_t(j)])];
  host_positions_.resize(size_t(m));
  if (!scratch_.reserve(size_t(m) * 4)) return Error{"cuda engine: out of GPU memory for kept rows"};
  CUDA_TRY(cudaMemcpyAsync(scratch_.as(), rows.data(), size_t(m) * 4, cudaMemcpyHostToDevice, stream_), "keep rows");
  CUDA_TRY(kc::gather_rows(x_.as(), kernels::DType::F32, e, scratch_.as<int32_t>(), m, proj_.as(), stream_),
           "keep rows");
  CUDA_TRY(cudaMemcpyAsync(x_.as(), proj_.as(), size_t(m * e) * 4, cudaMemcpyDeviceToDevice, stream_), "keep rows");
  std::copy(host_positions_.begin(), host_positions_.end(), staged);
  CUDA_TRY(cudaMemcpyAsync(positions_.as(), staged, size_t(m) * 4, cudaMemcpyHostToDevice, stream_), "keep rows");
  CUDA_TRY(cudaStreamSynchronize(stream_), "keep rows");  // `rows` is the caller's, pageable
  n_ = m;
  return ok_status();
}

Status CudaBackend::read_hidden(int64_t row_from, std::vector<float>& out) {
  const int64_t e = config_.n_embd;
  out.resize(size_t((n_ - row_from) * e));
  return download(x_.as<float>() + row_from * e, out.size() * 4, out.data());
}

Status CudaBackend::write_hidden(std::span<const float> rows) {
  if (int64_t(rows.size()) != n_ * config_.n_embd)
    return Error{fmt::format("cuda engine: {} hidden values for a call of {} rows", rows.size(), n_)};
  CUDA_TRY(cudaMemcpyAsync(x_.as(), rows.data(), rows.size() * 4, cudaMemcpyHostToDevice, stream_), "hidden rows");
  CUDA_TRY(cudaStreamSynchronize(stream_), "hidden rows");  // `rows` is the caller's
  return ok_status();
}

Status CudaBackend::read_last_queries(std::vector<float>& out) {
  const int64_t q = config_.q_dim();
  out.resize(size_t(q));
  return download(sequence_rows(q_, q) + (n_ - 1) * q, out.size() * 4, out.data());
}

Status CudaBackend::read_tap(Tap tap, std::vector<float>& out) {
  const ModelConfig& c = config_;
  auto take = [&](const float* from, int64_t cols) {
    out.resize(size_t(n_ * cols));
    return download(from, out.size() * 4, out.data());
  };
  auto take_typed = [&](const DeviceMemory& from, int64_t cols) {  // a GEMM input, kept in the GEMM's type
    std::vector<uint16_t> raw(size_t(n_ * cols));
    if (auto s = download(from.as(), raw.size() * 2, raw.data()); !s) return s;
    out.resize(raw.size());
    for (size_t i = 0; i < raw.size(); ++i)
      out[i] = dtype_ == kernels::DType::BF16 ? kernels::cpu::bf16_to_float(raw[i]) : kernels::cpu::f16_to_float(raw[i]);
    return ok_status();
  };
  switch (tap) {
    case Tap::HiddenIn:
    case Tap::HiddenOut: return take(x_.as<float>(), c.n_embd);
    case Tap::AttentionIn:
    case Tap::FfnIn: return take_typed(xn_, c.n_embd);
    case Tap::FfnGate: return take(gate_.as<float>(), c.n_ff);
    // Taps of the attention part: a focused segment's rows (a batched call).
    case Tap::Queries: return take(sequence_rows(q_, c.q_dim()), c.q_dim());
    case Tap::Keys: return take(sequence_rows(k_, c.kv_dim()), c.kv_dim());
    case Tap::AttentionOut: return take(sequence_rows(attn_, c.q_dim()), c.q_dim());
    case Tap::Values: return take(sequence_rows(v_, c.kv_dim()), c.kv_dim());
    case Tap::FfnActivation: return take_typed(act_, c.n_ff);
  }
  return ok_status();
}

}  // namespace inferlab
