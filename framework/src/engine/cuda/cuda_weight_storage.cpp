// The CUDA backend's projections stored in NF4 for one run: quantized on the
// host (kernels/cpu/nf4), kept on the GPU in 4 bits (and 8-bit absmaxes with
// double quantization), dequantized into the GPU type right before their GEMM,
// in eager steps and captured graphs alike.
#include <fmt/format.h>

#include "cpu/nf4.h"
#include "cuda/nf4.cuh"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"

namespace inferlab {

namespace kc = kernels::cuda;

namespace {

template <typename T>
Status upload(DeviceMemory& to, const std::vector<T>& from, cudaStream_t stream) {
  if (from.empty()) return ok_status();
  if (!to.reserve(from.size() * sizeof(T))) return Error{"cuda engine: out of GPU memory for an NF4 weight"};
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
  const auto q = kernels::cpu::nf4_quantize(weight.data(), out, in, storage.block_size, storage.double_quant);
  DeviceNf4 d;
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

const void* CudaBackend::stored_weight(Proj p, int32_t l, Status& status) {
  auto it = stored_.find({int32_t(p), l});
  if (it == stored_.end()) return nullptr;
  const DeviceNf4& d = it->second;
  kc::Nf4View view;
  view.codes = d.codes.as<uint8_t>();
  view.absmax = d.absmax.bytes() > 0 ? d.absmax.as<float>() : nullptr;
  view.absmax_codes = d.absmax_codes.bytes() > 0 ? d.absmax_codes.as<uint8_t>() : nullptr;
  view.absmax_scale = d.absmax_scale.bytes() > 0 ? d.absmax_scale.as<float>() : nullptr;
  view.dynamic_map = dynamic_map_.bytes() > 0 ? dynamic_map_.as<float>() : nullptr;
  view.absmax_offset = d.absmax_offset;
  view.block = d.block;
  view.n = d.n;
  if (const cudaError_t e = kc::nf4_dequantize(view, dequant_scratch_.as(), dtype_, stream_); e != cudaSuccess) {
    status = Error{fmt::format("cuda: dequantizing {} failed: {}", proj_name(p), cudaGetErrorString(e))};
    return nullptr;
  }
  return dequant_scratch_.as();
}

}  // namespace inferlab
