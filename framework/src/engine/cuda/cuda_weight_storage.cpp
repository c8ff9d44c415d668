// The CUDA backend's projections stored in 4 bits for one run (NF4, FP4,
// Int4): quantized on the host (kernels/cpu/quant4), kept on the GPU in 4 bits
// (and 8-bit absmaxes with double quantization); a call of up to 4 rows
// multiplies through them with the fused dequantizing GEMV, a larger one
// dequantizes them into the GPU type right before its GEMM, in eager steps and
// captured graphs alike.
#include <fmt/format.h>

#include "cpu/quant4.h"
#include "cuda/quant4.cuh"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"

namespace inferlab {

namespace kc = kernels::cuda;

namespace {

template <typename T>
Status upload(DeviceMemory& to, const std::vector<T>& from, cudaStream_t stream) {
  if (from.empty()) return ok_status();
  if (!to.reserve(from.size() * sizeof(T))) return Error{"cuda engine: out of GPU memory for a 4-bit weight"};
  CUDA_TRY(cudaMemcpyAsync(to.as(), from.data(), from.size() * sizeof(T), cudaMemcpyHostToDevice, stream), "upload");
  return ok_status();
}

}  // namespace

Status CudaBackend::set_weight_storage(Proj p, int32_t l, const WeightStorage& storage, std::span<const float> weight) {
  drop_graphs();  // a captured graph holds the weight it read
  if (storage.format == WeightFormat::Model) {
    stored_.erase({int32_t(p), l});
    return ok_status();
  }
  const auto [out, in] = proj_shape(config_, p);
  if (int64_t(weight.size()) != out * in)
    return Error{fmt::format("cuda backend: {} has {} values to quantize, not {} x {}", proj_name(p), weight.size(), out, in)};
  const auto q = kernels::cpu::quant4_quantize(weight.data(), out, in, quant4_format(storage.format),
                                              storage.block_size, storage.double_quant);
  DeviceQuant4 d;
  d.format = q.format;
  d.absmax_offset = q.absmax_offset;
  d.block = q.block;
  d.n = out * in;
  Status s = upload(d.codes, q.codes, stream_);
  if (s) s = upload(d.absmax, q.absmax, stream_);
  if (s) s = upload(d.absmax_codes, q.absmax_codes, stream_);
  if (s) s = upload(d.absmax_scale, q.absmax_scale, stream_);
  if (s && q.double_quant && dynamic_map_.bytes() == 0) {
    const auto map = kernels::cpu::dynamic_map_signed();
    s = upload(dynamic_map_, std::vector<float>(map.begin(), map.end()), stream_);
  }
  if (!s) return s;
  CUDA_TRY(cudaStreamSynchronize(stream_), "upload");  // the host copies are ours, freed on return
  const size_t scratch = size_t(d.n) * size_t(kernels::dtype_bytes(dtype_));
  if (dequant_scratch_.bytes() < scratch && !dequant_scratch_.reserve(scratch))
    return Error{fmt::format("cuda engine: out of GPU memory to dequantize {}", proj_name(p))};
  stored_[{int32_t(p), l}] = std::move(d);
  return ok_status();
}

Backend::StoredWeights CudaBackend::stored_weights() const {
  StoredWeights s;
  for (const auto& [key, d] : stored_) {
    s.bytes += int64_t(d.codes.bytes() + d.absmax.bytes() + d.absmax_codes.bytes() + d.absmax_scale.bytes()) +
               (d.absmax_codes.bytes() > 0 ? int64_t(sizeof(float)) : 0);  // the offset, a kernel argument
    s.values += d.n;
  }
  return s;
}

kc::Quant4View CudaBackend::quant4_view(const DeviceQuant4& d) const {
  kc::Quant4View view;
  view.codes = d.codes.as<uint8_t>();
  view.absmax = d.absmax.bytes() > 0 ? d.absmax.as<float>() : nullptr;
  view.absmax_codes = d.absmax_codes.bytes() > 0 ? d.absmax_codes.as<uint8_t>() : nullptr;
  view.absmax_scale = d.absmax_scale.bytes() > 0 ? d.absmax_scale.as<float>() : nullptr;
  view.dynamic_map = dynamic_map_.bytes() > 0 ? dynamic_map_.as<float>() : nullptr;
  view.absmax_offset = d.absmax_offset;
  const auto levels = kernels::cpu::quant4_levels(d.format);
  std::copy(levels.begin(), levels.end(), view.levels);
  view.block = d.block;
  view.n = d.n;
  return view;
}

const void* CudaBackend::stored_weight(Proj p, int32_t l, Status& status) {
  auto it = stored_.find({int32_t(p), l});
  if (it == stored_.end()) return nullptr;
  if (const cudaError_t e = kc::quant4_dequantize(quant4_view(it->second), dequant_scratch_.as(), dtype_, stream_);
      e != cudaSuccess) {
    status = Error{fmt::format("cuda: dequantizing {} failed: {}", proj_name(p), cudaGetErrorString(e))};
    return nullptr;
  }
  return dequant_scratch_.as();
}

Result<bool> CudaBackend::stored_gemv(Proj p, int32_t l, const void* x, float* y, int64_t in, int64_t out) {
  if (n_ > kc::kQuant4GemvMaxRows) return false;
  auto it = stored_.find({int32_t(p), l});
  if (it == stored_.end()) return false;
  if (const cudaError_t e = kc::quant4_gemv(quant4_view(it->second), x, dtype_, y, n_, out, in, stream_);
      e != cudaSuccess)
    return Error{fmt::format("cuda: the 4-bit GEMV of {} failed: {}", proj_name(p), cudaGetErrorString(e))};
  return true;
}

}  // namespace inferlab
