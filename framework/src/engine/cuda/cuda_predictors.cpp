// Predicted components on the CUDA backend (ComponentPredictors): the
// predictors, the per-row top-k, the lists and the head masks stay on the
// device. A one-row call (decode) scores on a side stream forked from the main
// one after the layer input is normalized, so the neuron predictor overlaps
// the layer's attention and the next layer's head predictor (the lookahead)
// overlaps its FFN; the main stream waits on an event only where it reads a
// choice. The lists have the predictors' static sizes, so such steps replay in
// graphs (the fork and joins are captured). Calls of more rows score on the
// main stream and read the union's sizes back (they size the GEMMs).
#include <algorithm>

#include "cuda/activation.cuh"
#include "cuda/activation_sparse.cuh"
#include "cuda/gemm.cuh"
#include "cuda/predictors.cuh"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"

namespace inferlab {

namespace kc = kernels::cuda;
using kernels::DType;

namespace {
constexpr int64_t kPredictRows = 64;  // rows reserved when the predictors are set (decode never grows them)
}

Status CudaBackend::grow(DeviceMemory& buffer, size_t bytes, const char* what) {
  if (bytes <= buffer.bytes()) return ok_status();
  if (capturing_) return Error{fmt::format("cuda engine: {} would grow inside a graph capture", what)};
  drop_graphs();  // they may hold its old address
  if (!buffer.reserve(bytes)) return Error{fmt::format("cuda engine: out of GPU memory for {}", what)};
  return ok_status();
}

Status CudaBackend::wait_predicted(cudaEvent_t ready, bool& pending) {
  if (!pending) return ok_status();
  CUDA_TRY(cudaStreamWaitEvent(stream_, ready, 0), "predicted components");
  pending = false;
  return ok_status();
}

Status CudaBackend::join_predictions() {
  pred_heads_pending_ = pred_neurons_pending_ = false;
  return wait_predicted(pred_done_, pred_pending_);
}

Status CudaBackend::set_predictors(ComponentPredictors predictors) {
  if (predictors.active() || !pred_neurons_.empty() || !pred_heads_.empty()) drop_graphs();
  if (pred_stream_ != nullptr) CUDA_TRY(cudaStreamSynchronize(pred_stream_), "predicted components");
  pred_pending_ = pred_heads_pending_ = pred_neurons_pending_ = false;
  pred_neurons_.clear();
  pred_heads_.clear();
  pred_last_layer_ = -1;
  if (!predictors.active()) return ok_status();
  const ModelConfig& c = config_;
  const auto L = size_t(c.n_layers);
  if (pred_stream_ == nullptr) {
    CUDA_TRY(cudaStreamCreateWithFlags(&pred_stream_, cudaStreamNonBlocking), "predictor stream");
    for (cudaEvent_t* e : {&pred_fork_, &pred_heads_ready_, &pred_neurons_ready_, &pred_done_})
      CUDA_TRY(cudaEventCreateWithFlags(e, cudaEventDisableTiming), "predictor events");
  }
  // Every predictor's weights in one upload.
  std::vector<float> host;
  std::vector<std::array<size_t, 3>> at;  // offsets of w1, w2, b2 (SIZE_MAX: none)
  auto add = [&](const LowRankPredictor& p) {
    std::array<size_t, 3> o{SIZE_MAX, SIZE_MAX, SIZE_MAX};
    size_t i = 0;
    for (const auto* w : {&p.w1, &p.w2, &p.b2}) {
      if (!w->empty()) {
        o[i] = host.size();
        host.insert(host.end(), w->begin(), w->end());
      }
      ++i;
    }
    at.push_back(o);
  };
  for (const auto& p : predictors.neurons) add(p);
  for (const auto& p : predictors.heads) add(p);
  if (!pred_weights_.reserve(std::max<size_t>(host.size(), 1) * 4))
    return Error{"cuda engine: out of GPU memory for the component predictors"};
  // On the engine's stream (non-blocking: a plain cudaMemcpy on the legacy
  // stream would not order the kernels that read them), done before `host` goes.
  CUDA_TRY(cudaMemcpyAsync(pred_weights_.as(), host.data(), host.size() * 4, cudaMemcpyHostToDevice, stream_),
           "predictors");
  CUDA_TRY(cudaStreamSynchronize(stream_), "predictors");
  const float* base = pred_weights_.as<float>();
  pred_rank_max_ = 0;
  size_t next = 0;
  auto device = [&](const LowRankPredictor& p) {
    const auto& o = at[next++];
    DevicePredictor d;
    d.keep = p.keep;
    d.rank = p.rank;
    d.relu = p.relu;
    d.w1 = o[0] == SIZE_MAX ? nullptr : base + o[0];
    d.w2 = o[1] == SIZE_MAX ? nullptr : base + o[1];
    d.b2 = o[2] == SIZE_MAX ? nullptr : base + o[2];
    if (p.present()) pred_rank_max_ = std::max(pred_rank_max_, p.rank);
    return d;
  };
  for (const auto& p : predictors.neurons) pred_neurons_.push_back(device(p));
  for (const auto& p : predictors.heads) pred_heads_.push_back(device(p));
  pred_eps_ = predictors.norm_eps;
  // Per-layer choices, the one-row workspace, and the transposed down and
  // output weights the one-row products read (made now: not inside a capture).
  const int64_t H = c.n_heads, F = c.n_ff, e = c.n_embd, qd = c.q_dim(), widest = std::max(F, H);
  const size_t el = size_t(kernels::dtype_bytes(dtype_));
  if (!pred_flags_.reserve(size_t(F)) || !pred_neuron_list_.reserve(L * size_t(F) * 4) ||
      !pred_head_flags_.reserve(L * size_t(H)) || !pred_head_list_.reserve(L * size_t(H) * 4) ||
      !pred_head_rows_.reserve(L * size_t(qd) * 4) || !pred_counts_.reserve(L * 8) ||
      !pred_x_.reserve(size_t(kPredictRows * e) * 4) ||
      !pred_hidden_.reserve(size_t(kPredictRows * std::max(pred_rank_max_, 1)) * 4) ||
      !pred_logits_.reserve(size_t(kPredictRows * widest) * 4) ||
      !rows_partial_.reserve(size_t(kc::sparse_input_splits(std::max(F, qd)) * e) * 4) ||
      !head_tmp_.reserve(size_t(kPredictRows * qd) * 4) || !w_sel_.reserve(size_t(std::max(F, qd) * e) * el))
    return Error{"cuda engine: out of GPU memory for the predicted components' workspace"};
  CUDA_TRY(cudaMemsetAsync(pred_head_flags_.as(), 1, L * size_t(H), stream_), "predicted heads");
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const bool neurons = !pred_neurons_.empty() && pred_neurons_[size_t(l)].keep > 0;
    const bool heads = !pred_heads_.empty() && pred_heads_[size_t(l)].keep > 0;
    if ((neurons && transposed(Proj::Down, l) == nullptr) || (heads && transposed(Proj::O, l) == nullptr))
      return Error{fmt::format("cuda engine: out of GPU memory for the transposed weights of layer {}", l)};
  }
  CUDA_TRY(cudaStreamSynchronize(stream_), "predicted components");
  pred_host_counts_.assign(L * 2, 0);
  pred_rows_.assign(L * 2, 0);
  return ok_status();
}

Status CudaBackend::run_predictor(const DevicePredictor& p, int64_t out, uint8_t* flags, int32_t* list, int32_t* count,
                                  cudaStream_t stream) {
  const int64_t rows = n_, e = config_.n_embd;
  auto layer = [&](const float* x, const float* w, const float* b, int64_t in, int64_t width, bool relu,
                   float* y) -> Status {
    if (rows == 1) {
      CUDA_TRY(kc::predictor_layer(x, w, b, rows, in, width, relu, y, stream), "predictor");
      return ok_status();
    }
    if (kc::gemm_xwt(cublas_, x, w, DType::F32, y, rows, width, in) != CUBLAS_STATUS_SUCCESS)
      return Error{"cuda: cuBLAS GEMM of a predictor failed"};
    CUDA_TRY(kc::bias_relu_rows(y, rows, width, b, relu, stream), "predictor");
    return ok_status();
  };
  const float* x = pred_x_.as<float>();
  if (p.rank > 0) {
    if (auto s = layer(x, p.w1, nullptr, e, p.rank, p.relu, pred_hidden_.as<float>()); !s) return s;
    x = pred_hidden_.as<float>();
  }
  if (auto s = layer(x, p.w2, p.b2, p.rank > 0 ? p.rank : e, out, false, pred_logits_.as<float>()); !s) return s;
  CUDA_TRY(cudaMemsetAsync(flags, 0, size_t(out), stream), "predictor");
  CUDA_TRY(kc::top_k_flags(pred_logits_.as<float>(), rows, out, p.keep, flags, stream), "predictor top-k");
  CUDA_TRY(kc::flags_to_list(flags, out, list, count, stream), "predictor list");
  return ok_status();
}

Status CudaBackend::predict(int32_t l, bool own_heads) {
  const ModelConfig& c = config_;
  if (pred_neurons_.empty() && pred_heads_.empty()) return Error{"cuda engine: predict without component predictors"};
  const int64_t n = n_, e = c.n_embd, H = c.n_heads, F = c.n_ff, hd = c.head_dim, qd = c.q_dim();
  // The previous layer's side work is done before its input (or a buffer) changes.
  if (auto s = join_predictions(); !s) return s;
  if (n > 1 || pred_x_.bytes() < size_t(n * e) * 4) CUDA_TRY(cudaStreamSynchronize(stream_), "predicted components");
  if (auto s = grow(pred_x_, size_t(n * e) * 4, "the predictors' input"); !s) return s;
  if (auto s = grow(pred_hidden_, size_t(n * std::max(pred_rank_max_, 1)) * 4, "the predictors' hidden rows"); !s)
    return s;
  if (auto s = grow(pred_logits_, size_t(n * std::max(F, H)) * 4, "the predictors' logits"); !s) return s;
  CUDA_TRY(kc::rms_scale_rows(x_.as<float>(), n, e, pred_eps_, pred_x_.as<float>(), stream_), "predictor input");
  const bool side = n == 1;
  cudaStream_t s = stream_;
  if (side) {
    CUDA_TRY(cudaEventRecord(pred_fork_, stream_), "predictor fork");
    CUDA_TRY(cudaStreamWaitEvent(pred_stream_, pred_fork_, 0), "predictor fork");
    s = pred_stream_;
  }
  auto* counts = pred_counts_.as<int32_t>();
  std::vector<int32_t> heads_of;  // layers whose heads were chosen now
  auto heads = [&](int32_t layer) -> Status {
    const DevicePredictor& p = pred_heads_[size_t(layer)];
    if (auto st = run_predictor(p, H, pred_head_flags_.as<uint8_t>() + int64_t(layer) * H,
                                pred_head_list_.as<int32_t>() + int64_t(layer) * H, counts + 2 * layer + 1, s);
        !st)
      return st;
    pred_rows_[size_t(2 * layer + 1)] = n;
    if (side)  // the list has exactly keep heads: their rows of W_q now
      CUDA_TRY(kc::head_rows(pred_head_list_.as<int32_t>() + int64_t(layer) * H, p.keep, int32_t(hd),
                             pred_head_rows_.as<int32_t>() + int64_t(layer) * qd, s),
               "predicted head rows");
    heads_of.push_back(layer);
    return ok_status();
  };
  const bool has_heads = !pred_heads_.empty();
  if (own_heads && has_heads && pred_heads_[size_t(l)].keep > 0) {
    if (auto st = heads(l); !st) return st;
    if (side) {
      CUDA_TRY(cudaEventRecord(pred_heads_ready_, s), "predicted heads");
      pred_heads_pending_ = true;
    }
  }
  if (!pred_neurons_.empty() && pred_neurons_[size_t(l)].keep > 0) {
    if (auto st = run_predictor(pred_neurons_[size_t(l)], F, pred_flags_.as<uint8_t>(),
                                pred_neuron_list_.as<int32_t>() + int64_t(l) * F, counts + 2 * l, s);
        !st)
      return st;
    pred_rows_[size_t(2 * l)] = n;
    if (side) {
      CUDA_TRY(cudaEventRecord(pred_neurons_ready_, s), "predicted neurons");
      pred_neurons_pending_ = true;
    }
  }
  if (l + 1 < c.n_layers && has_heads && pred_heads_[size_t(l + 1)].keep > 0)
    if (auto st = heads(l + 1); !st) return st;
  pred_last_layer_ = l;
  if (side) {
    CUDA_TRY(cudaEventRecord(pred_done_, s), "predicted components");
    pred_pending_ = true;
    return ok_status();
  }
  // More rows: the unions' sizes size the products (and the heads' rows of W_q).
  if (auto st = download(counts, size_t(c.n_layers) * 8, pred_host_counts_.data()); !st) return st;
  for (const int32_t layer : heads_of)
    CUDA_TRY(kc::head_rows(pred_head_list_.as<int32_t>() + int64_t(layer) * H, pred_host_counts_[size_t(2 * layer + 1)],
                           int32_t(hd), pred_head_rows_.as<int32_t>() + int64_t(layer) * qd, stream_),
             "predicted head rows");
  return ok_status();
}

Status CudaBackend::predicted_counts(int32_t l, int32_t& neurons, int32_t& heads) {
  if (l < 0 || size_t(2 * l + 1) >= pred_rows_.size()) return Error{"cuda engine: no predicted components"};
  const bool has_neurons = !pred_neurons_.empty() && pred_neurons_[size_t(l)].keep > 0;
  const bool has_heads = !pred_heads_.empty() && pred_heads_[size_t(l)].keep > 0;
  neurons = !has_neurons ? 0
            : pred_rows_[size_t(2 * l)] == 1 ? pred_neurons_[size_t(l)].keep
                                             : pred_host_counts_[size_t(2 * l)];
  heads = !has_heads ? 0
          : pred_rows_[size_t(2 * l + 1)] == 1 ? pred_heads_[size_t(l)].keep
                                               : pred_host_counts_[size_t(2 * l + 1)];
  return ok_status();
}

Status CudaBackend::linear_predicted(Proj p, int32_t l) {
  const ModelConfig& c = config_;
  const int64_t e = c.n_embd, H = c.n_heads, F = c.n_ff, hd = c.head_dim, qd = c.q_dim();
  const size_t el = size_t(kernels::dtype_bytes(dtype_));
  int32_t neurons = 0, heads = 0;
  if (auto s = predicted_counts(l, neurons, heads); !s) return s;
  const bool stored = stored_.count({int32_t(p), l}) != 0 || adapters_.count({int32_t(p), l}) != 0;
  if (p == Proj::Q || p == Proj::O) {
    // Heads chosen in this layer's own predict are on the side stream; the
    // lookahead's were joined when this layer's predict began (or are joined now).
    if (pred_last_layer_ == l) {
      if (auto s = wait_predicted(pred_heads_ready_, pred_heads_pending_); !s) return s;
    } else if (auto s = join_predictions(); !s) {
      return s;
    }
    if (stored) return linear(p, l, nullptr);  // NF4 or adapters: the whole projection (masked heads give zeros)
    const int64_t k = int64_t(heads) * hd;
    const int32_t* rows = pred_head_rows_.as<int32_t>() + int64_t(l) * qd;
    const int32_t* list = pred_head_list_.as<int32_t>() + int64_t(l) * H;
    if (auto s = grow(head_tmp_, size_t(n_ * qd) * 4, "the predicted heads"); !s) return s;
    if (n_ > 1)
      if (auto s = grow(w_sel_, size_t(std::max(F, qd) * e) * el, "gathered weight rows"); !s) return s;
    if (p == Proj::Q) {
      if (n_ == 1) {
        CUDA_TRY(kc::gathered_rows_gemv(xn_.as(), weight(Proj::Q, l), dtype_, rows, k, e, head_tmp_.as<float>(),
                                        stream_),
                 "predicted heads");
      } else {
        CUDA_TRY(kc::gather_rows(weight(Proj::Q, l), dtype_, e, rows, k, w_sel_.as(), stream_), "gather");
        if (auto s = gemm(xn_.as(), w_sel_.as(), head_tmp_.as<float>(), n_, k, e); !s) return s;
      }
      CUDA_TRY(kc::scatter_head_columns(head_tmp_.as<float>(), n_, list, heads, int32_t(hd), q_.as<float>(), qd, stream_),
               "predicted heads");
      return ok_status();
    }
    CUDA_TRY(kc::gather_head_columns(attn_.as<float>(), n_, qd, list, heads, int32_t(hd), head_tmp_.as(), dtype_,
                                     stream_),
             "predicted heads");
    const void* o_t = transposed(Proj::O, l);
    if (o_t == nullptr) return Error{"cuda engine: out of GPU memory for a transposed output projection"};
    if (n_ == 1) {
      CUDA_TRY(kc::rows_gemv(head_tmp_.as(), o_t, dtype_, rows, k, e, rows_partial_.as<float>(), proj_.as<float>(),
                             stream_),
               "predicted heads");
    } else {
      CUDA_TRY(kc::gather_rows(o_t, dtype_, e, rows, k, w_sel_.as(), stream_), "gather");
      if (kc::gemm_xw(cublas_, head_tmp_.as(), w_sel_.as(), dtype_, proj_.as<float>(), n_, e, k) != CUBLAS_STATUS_SUCCESS)
        return Error{"cuda: cuBLAS GEMM of the predicted heads' output rows failed"};
    }
    return ok_status();
  }
  if (p != Proj::Gate && p != Proj::Up && p != Proj::Down)
    return Error{fmt::format("cuda engine: {} has no predicted components", proj_name(p))};
  if (auto s = wait_predicted(pred_neurons_ready_, pred_neurons_pending_); !s) return s;
  if (stored_.count({int32_t(p), l}) != 0)
    return Error{fmt::format("cuda backend: predicted neurons of {}, stored in 4 bits for this run", proj_name(p))};
  if (adapters_.count({int32_t(p), l}) != 0)
    return Error{fmt::format("cuda backend: an unmerged adapter on {} with predicted neurons (merge it)", proj_name(p))};
  const int32_t* list = pred_neuron_list_.as<int32_t>() + int64_t(l) * F;
  const int64_t k = neurons;
  if (n_ > 1)
    if (auto s = grow(w_sel_, size_t(std::max(F, qd) * e) * el, "gathered weight rows"); !s) return s;
  if (p == Proj::Down) {
    const void* down_t = transposed(Proj::Down, l);
    if (down_t == nullptr) return Error{"cuda engine: out of GPU memory for a transposed down projection"};
    if (n_ == 1) {
      CUDA_TRY(kc::rows_gemv(act_.as(), down_t, dtype_, list, k, e, rows_partial_.as<float>(), proj_.as<float>(),
                             stream_),
               "predicted neurons");
      return ok_status();
    }
    CUDA_TRY(kc::gather_rows(down_t, dtype_, e, list, k, w_sel_.as(), stream_), "gather");
    if (kc::gemm_xw(cublas_, act_.as(), w_sel_.as(), dtype_, proj_.as<float>(), n_, e, k) != CUBLAS_STATUS_SUCCESS)
      return Error{"cuda: cuBLAS GEMM of the predicted down rows failed"};
    return ok_status();
  }
  auto io = linear_io(p);
  if (!io) return io.error();
  if (n_ == 1) {
    CUDA_TRY(kc::gathered_rows_gemv(xn_.as(), weight(p, l), dtype_, list, k, e, io->y, stream_), "predicted neurons");
    return ok_status();
  }
  CUDA_TRY(kc::gather_rows(weight(p, l), dtype_, e, list, k, w_sel_.as(), stream_), "gather");
  return gemm(xn_.as(), w_sel_.as(), io->y, n_, k, e);
}

Status CudaBackend::read_predicted_heads(std::vector<uint8_t>& flags) {
  const size_t size = size_t(config_.n_layers) * size_t(config_.n_heads);
  flags.assign(size, 1);
  if (pred_heads_.empty()) return ok_status();
  if (auto s = join_predictions(); !s) return s;
  return download(pred_head_flags_.as(), size, flags.data());
}

}  // namespace inferlab
