// The CUDA backend's unmerged low-rank adapters: per projection, A and B in
// the GPU type (scales folded into B), applied after the projection's own GEMM:
// for calls of up to 4 rows in one fused launch (x -> A x -> y += B (A x), the
// intermediate in float32 in shared memory), for more as two skinny GEMMs,
// y += (x A^T) B^T; in eager steps and captured graphs alike.
#include <fmt/format.h>

#include "cuda/activation.cuh"
#include "cuda/gemm.cuh"
#include "cuda/lora.cuh"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"

namespace inferlab {

namespace kc = kernels::cuda;

Status CudaBackend::set_weight_adapter(Proj p, int32_t l, int32_t rank, std::span<const float> a,
                                       std::span<const float> b) {
  if (p == Proj::Output) return Error{"cuda backend: no unmerged adapter on the output projection"};
  drop_graphs();  // a captured graph holds the adapters' addresses, or none
  if (rank == 0) {
    adapters_.erase({int32_t(p), l});
    return ok_status();
  }
  DeviceAdapter ad;
  ad.rank = rank;
  const size_t el = size_t(kernels::dtype_bytes(dtype_));
  DeviceMemory staging;
  if (!staging.reserve(std::max(a.size(), b.size()) * 4) || !ad.a.reserve(a.size() * el) || !ad.b.reserve(b.size() * el))
    return Error{fmt::format("cuda engine: out of GPU memory for an adapter on {}", proj_name(p))};
  for (auto [from, to] : {std::pair{a, &ad.a}, std::pair{b, &ad.b}}) {
    CUDA_TRY(cudaMemcpyAsync(staging.as(), from.data(), from.size() * 4, cudaMemcpyHostToDevice, stream_), "upload");
    CUDA_TRY(kc::convert_from_float(staging.as<float>(), int64_t(from.size()), to->as(), dtype_, stream_), "convert");
    CUDA_TRY(cudaStreamSynchronize(stream_), "upload");  // `from` is the caller's, `staging` reused
  }
  adapters_[{int32_t(p), l}] = std::move(ad);
  if (rank > adapter_rank_max_) {
    adapter_rank_max_ = rank;
    if (auto s = reserve_adapter_workspace(workspace_rows_); !s) return s;
  }
  return ok_status();
}

Status CudaBackend::reserve_adapter_workspace(int64_t rows) {
  if (adapter_rank_max_ == 0) return ok_status();
  const size_t n = size_t(rows) * size_t(adapter_rank_max_);
  if (!adapter_tmp_.reserve(n * 4) || !adapter_tmp_t_.reserve(n * size_t(kernels::dtype_bytes(dtype_))))
    return Error{fmt::format("cuda engine: out of GPU memory for adapters on a call of {} tokens", rows)};
  return ok_status();
}

Status CudaBackend::apply_adapter(Proj p, int32_t l, const void* x, float* y, int64_t in, int64_t out) {
  auto it = adapters_.find({int32_t(p), l});
  if (it == adapters_.end()) return ok_status();
  const DeviceAdapter& ad = it->second;
  if (n_ <= kc::kLoraFusedMaxRows && ad.rank <= kc::kLoraFusedMaxRank) {
    CUDA_TRY(kc::lora_apply_fused(x, ad.a.as(), ad.b.as(), dtype_, y, n_, in, out, ad.rank, stream_), "adapter");
    return ok_status();
  }
  if (auto s = gemm(x, ad.a.as(), adapter_tmp_.as<float>(), n_, ad.rank, in); !s) return s;
  CUDA_TRY(kc::convert_from_float(adapter_tmp_.as<float>(), n_ * ad.rank, adapter_tmp_t_.as(), dtype_, stream_),
           "adapter");
  if (kc::gemm_xwt_add(cublas_, adapter_tmp_t_.as(), ad.b.as(), dtype_, y, n_, out, ad.rank) != CUBLAS_STATUS_SUCCESS)
    return Error{fmt::format("cuda: cuBLAS adapter GEMM ({} x {} x {}) failed", n_, out, ad.rank)};
  return ok_status();
}

}  // namespace inferlab
