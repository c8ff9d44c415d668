// Early exit by confidence on the CUDA backend (ExitPolicy): the measure of
// the call's last row (in a batched call, the focused segment's) after a
// checked layer is computed where the row lives and reduced on the device to
// one float, the only value that comes back to the host; after an exit, the
// layer's exit head maps the row in place before the logits. Exit heads
// (n_embd, n_embd) are kept in the GPU type and run through cuBLAS, as the
// model's projections; the classifiers (2, n_embd) and the biases stay float
// (the predictors' one-row layer). Twin: cpu_exits.cpp.
#include <fmt/format.h>

#include <algorithm>
#include <cstdint>

#include "cuda/activation.cuh"
#include "cuda/early_exit.cuh"
#include "cuda/predictors.cuh"
#include "cuda/rmsnorm.cuh"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"

namespace inferlab {

namespace kc = kernels::cuda;

Status CudaBackend::set_exit_policy(ExitPolicy policy) {
  if (!policy.active() && !exit_active_) return ok_status();
  drop_graphs();  // as set_predictors: no graph outlives the policy it was captured under
  CUDA_TRY(cudaStreamSynchronize(stream_), "exit policy");  // nothing queued still reads the maps replaced here
  exit_active_ = false;
  exit_state_kept_.clear();
  exit_heads_.clear();
  exit_classifiers_.clear();
  if (!policy.active()) {  // its weights go with it
    exit_head_weights_ = DeviceMemory{};
    exit_params_ = DeviceMemory{};
    return ok_status();
  }
  const ModelConfig& c = config_;
  const size_t L = size_t(c.n_layers), d = size_t(c.n_embd), el = size_t(kernels::dtype_bytes(dtype_));
  if (policy.check.size() != L || (!policy.heads.empty() && policy.heads.size() != L) ||
      (!policy.classifiers.empty() && policy.classifiers.size() != L))
    return Error{fmt::format("cuda backend: an exit policy of {} checks, {} exit heads and {} classifiers for a "
                             "model of {} layers", policy.check.size(), policy.heads.size(),
                             policy.classifiers.size(), L)};
  if (!exit_state_.reserve(d * 4) || !exit_x_.reserve(d * 4) || !exit_y_.reserve(d * 4) ||
      !exit_xt_.reserve(d * el) || !exit_out_.reserve(3 * 4))
    return Error{"cuda engine: out of GPU memory for the exit policy's workspace"};
  std::vector<DeviceExitMap> heads, classifiers;
  if (auto s = upload_exit_heads(policy, heads); !s) return s;
  if (auto s = upload_exit_params(policy, heads, classifiers); !s) return s;
  exit_heads_ = std::move(heads);
  exit_classifiers_ = std::move(classifiers);
  exit_measure_ = policy.measure;
  exit_eps_ = policy.norm_eps;
  exit_active_ = true;
  return ok_status();
}

// The policy's exit heads in the GPU type, one after another in one
// allocation, through a float staging buffer (a head at a time).
Status CudaBackend::upload_exit_heads(const ExitPolicy& policy, std::vector<DeviceExitMap>& heads) {
  const size_t d = size_t(config_.n_embd), el = size_t(kernels::dtype_bytes(dtype_));
  const size_t present = size_t(std::count_if(policy.heads.begin(), policy.heads.end(),
                                              [](const ExitMap& m) { return m.present(); }));
  heads.assign(policy.heads.size(), DeviceExitMap{});
  if (present == 0) {
    exit_head_weights_ = DeviceMemory{};
    return ok_status();
  }
  DeviceMemory staging;
  if (!exit_head_weights_.reserve(present * d * d * el) || !staging.reserve(d * d * 4))
    return Error{fmt::format("cuda engine: out of GPU memory for {} exit heads of ({}, {})", present, d, d)};
  char* next = exit_head_weights_.as<char>();
  for (size_t l = 0; l < policy.heads.size(); ++l) {
    const ExitMap& m = policy.heads[l];
    if (!m.present()) continue;
    if (m.weight.size() != d * d)
      return Error{fmt::format("cuda backend: the exit head of layer {} has {} weights; this model needs ({}, {})", l,
                               m.weight.size(), d, d)};
    CUDA_TRY(cudaMemcpyAsync(staging.as(), m.weight.data(), d * d * 4, cudaMemcpyHostToDevice, stream_), "exit heads");
    CUDA_TRY(kc::convert_from_float(staging.as<float>(), int64_t(d * d), next, dtype_, stream_), "exit heads");
    CUDA_TRY(cudaStreamSynchronize(stream_), "exit heads");  // `staging` is reused for the next head
    heads[l].weight = next;
    next += d * d * el;
  }
  return ok_status();
}

// The classifiers and the biases in one float upload (offsets first: the
// allocation's address is known only after it); maps that are not present
// upload nothing.
Status CudaBackend::upload_exit_params(const ExitPolicy& policy, std::vector<DeviceExitMap>& heads,
                                       std::vector<DeviceExitMap>& classifiers) {
  const size_t d = size_t(config_.n_embd);
  std::vector<float> params;
  auto add = [&](const std::vector<float>& v) {
    const size_t at = v.empty() ? SIZE_MAX : params.size();
    params.insert(params.end(), v.begin(), v.end());
    return at;
  };
  std::vector<size_t> head_bias(heads.size(), SIZE_MAX), weight(policy.classifiers.size(), SIZE_MAX),
      bias(policy.classifiers.size(), SIZE_MAX);
  for (size_t l = 0; l < heads.size(); ++l) {
    const std::vector<float>& b = policy.heads[l].bias;
    if (heads[l].weight == nullptr) continue;
    if (!b.empty() && b.size() != d)
      return Error{fmt::format("cuda backend: the exit head of layer {} has {} biases; this model needs {} or none", l,
                               b.size(), d)};
    head_bias[l] = add(b);
  }
  for (size_t l = 0; l < policy.classifiers.size(); ++l) {
    const ExitMap& m = policy.classifiers[l];
    if (!m.present()) continue;
    if (m.weight.size() != 2 * d || (!m.bias.empty() && m.bias.size() != 2))
      return Error{fmt::format("cuda backend: the exit classifier of layer {} has {} weights and {} biases; this "
                               "model needs (2, {}) and 2 or none", l, m.weight.size(), m.bias.size(), d)};
    weight[l] = add(m.weight);
    bias[l] = add(m.bias);
  }
  if (!exit_params_.reserve(std::max<size_t>(params.size(), 1) * 4))
    return Error{"cuda engine: out of GPU memory for the exit classifiers and biases"};
  if (!params.empty()) {
    CUDA_TRY(cudaMemcpyAsync(exit_params_.as(), params.data(), params.size() * 4, cudaMemcpyHostToDevice, stream_),
             "exit classifiers");
    CUDA_TRY(cudaStreamSynchronize(stream_), "exit classifiers");  // `params` is ours, pageable
  }
  const float* base = exit_params_.as<float>();
  auto at = [&](size_t offset) { return offset == SIZE_MAX ? nullptr : base + offset; };
  for (size_t l = 0; l < heads.size(); ++l) heads[l].bias = at(head_bias[l]);
  classifiers.assign(policy.classifiers.size(), DeviceExitMap{});
  for (size_t l = 0; l < classifiers.size(); ++l) classifiers[l] = DeviceExitMap{at(weight[l]), at(bias[l])};
  return ok_status();
}

// The focused segment's last row (the call's outside a focus) into its own
// slot: in a batched call every checking segment keeps its input before the
// layer runs over all rows, and each confidence then reads its own.
Status CudaBackend::keep_exit_state() {
  if (!exit_active_) return Error{"cuda backend: exit state kept without an exit policy"};
  const int64_t d = config_.n_embd;
  const size_t slot = exit_slot();
  if ((slot + 1) * size_t(d) * 4 > exit_state_.bytes())  // begin_call makes a slot per segment
    return Error{fmt::format("cuda backend: no exit state slot for segment {}", slot)};
  if (exit_state_kept_.size() <= slot) exit_state_kept_.resize(slot + 1, 0);
  CUDA_TRY(cudaMemcpyAsync(exit_state_.as<float>() + slot * size_t(d), sequence_last_row(), size_t(d) * 4,
                           cudaMemcpyDeviceToDevice, stream_),
           "exit state");
  exit_state_kept_[slot] = 1;
  return ok_status();
}

Status CudaBackend::map_exit_row(int32_t l, const float* row, float* out) {
  const int64_t d = config_.n_embd;
  const DeviceExitMap& m = exit_heads_[size_t(l)];
  // The row is read into the scaled copy before the head writes `out`.
  CUDA_TRY(kc::rms_scale_rows(row, 1, d, exit_eps_, exit_x_.as<float>(), stream_), "exit head input");
  CUDA_TRY(kc::convert_from_float(exit_x_.as<float>(), d, exit_xt_.as(), dtype_, stream_), "exit head input");
  if (auto s = gemm(exit_xt_.as(), m.weight, out, 1, d, d); !s) return s;
  if (m.bias != nullptr) CUDA_TRY(kc::add_row_bias(out, m.bias, 1, d, stream_), "exit head bias");
  return ok_status();
}

Result<float> CudaBackend::exit_confidence(int32_t l) {
  const ModelConfig& c = config_;
  const int64_t d = c.n_embd;
  if (!exit_active_ || l < 0 || l >= c.n_layers) return Error{"cuda backend: exit confidence without an exit policy"};
  if (capturing_) return Error{"cuda backend: an exit confidence inside a graph capture (the host reads it)"};
  const float* h = sequence_last_row();  // the focused segment's in a batched call
  float* confidence = exit_out_.as<float>() + 2;
  switch (exit_measure_) {
    case ExitMeasure::State: {
      const size_t slot = exit_slot();
      if (slot >= exit_state_kept_.size() || exit_state_kept_[slot] == 0)
        return Error{"cuda backend: the state measure without the layer's input"};
      exit_state_kept_[slot] = 0;  // each check keeps its own layer's input
      CUDA_TRY(kc::cosine_similarity(exit_state_.as<float>() + slot * size_t(d), h, d, confidence, stream_),
               "exit state cosine");
      break;
    }
    case ExitMeasure::Classifier: {
      const DeviceExitMap* m = size_t(l) < exit_classifiers_.size() ? &exit_classifiers_[size_t(l)] : nullptr;
      if (m == nullptr || m->weight == nullptr)
        return Error{fmt::format("cuda backend: no exit classifier at checked layer {}", l)};
      float* z = exit_out_.as<float>();
      CUDA_TRY(kc::rms_scale_rows(h, 1, d, exit_eps_, exit_x_.as<float>(), stream_), "exit classifier input");
      CUDA_TRY(kc::predictor_layer(exit_x_.as<float>(), static_cast<const float*>(m->weight), m->bias, 1, d, 2, false,
                                   z, stream_),
               "exit classifier");
      CUDA_TRY(kc::two_way_confidence(z, confidence, stream_), "exit classifier confidence");
      break;
    }
    case ExitMeasure::Softmax: {
      const float* row = h;
      if (size_t(l) < exit_heads_.size() && exit_heads_[size_t(l)].weight != nullptr) {
        if (auto s = map_exit_row(l, h, exit_y_.as<float>()); !s) return s.error();
        row = exit_y_.as<float>();
      }
      // The output norm and head exactly as logits() runs them, into the
      // workspace's normed input and logits (free until the next layer or
      // the call's logits rewrite them).
      CUDA_TRY(kc::rmsnorm(row, output_norm_, 1, d, c.rms_eps, xn_.as(), dtype_, stream_), "exit rmsnorm");
      if (auto s = gemm(xn_.as(), weight(Proj::Output, -1), logits_.as<float>(), 1, c.n_vocab, d); !s)
        return s.error();
      CUDA_TRY(kc::softmax_margin(logits_.as<float>(), c.n_vocab, confidence, stream_), "exit softmax margin");
      break;
    }
    default: return Error{fmt::format("cuda backend: unknown exit measure {}", int32_t(exit_measure_))};
  }
  // Into the pinned staging of the call's ids and positions: their uploads
  // were queued before this copy on the same stream, and its other writers
  // (begin_call, keep_rows) synchronize the stream first.
  float* host = host_small_.as<float>();
  CUDA_TRY(cudaMemcpyAsync(host, confidence, 4, cudaMemcpyDeviceToHost, stream_), "exit confidence");
  CUDA_TRY(cudaStreamSynchronize(stream_), "exit confidence");
  return *host;
}

Status CudaBackend::apply_exit_head(int32_t l) {
  if (l < 0 || size_t(l) >= exit_heads_.size() || exit_heads_[size_t(l)].weight == nullptr) return ok_status();
  float* h = sequence_last_row();  // the focused segment's in a batched call
  return map_exit_row(l, h, h);
}

}  // namespace inferlab
