// Shared helpers of the CUDA kernels: element types, conversions, the KV page
// address, and launch checking. Every launcher takes an explicit stream and
// returns the launch's cudaError_t (cudaSuccess when it was accepted).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

template <typename T>
__device__ __forceinline__ float to_float(T x);
template <>
__device__ __forceinline__ float to_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ float to_float<__half>(__half x) { return __half2float(x); }
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_float(float x);
template <>
__device__ __forceinline__ float from_float<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Base of page `page`: K rows (page_size, head_dim), then V rows.
template <typename T>
__device__ __forceinline__ T* page_base(const KvPages& kv, int32_t page) {
  return static_cast<T*>(kv.chunk_base[page / kv.pages_per_chunk]) +
         int64_t(page % kv.pages_per_chunk) * kv.page_elems();
}

// Runs `body` with T = the C++ type of a 16-bit DType (float for F32).
#define INFERLAB_DISPATCH_DTYPE(dtype, T, ...)            \
  switch (dtype) {                                        \
    case ::inferlab::kernels::DType::F16: {               \
      using T = __half;                                   \
      __VA_ARGS__;                                        \
    } break;                                              \
    case ::inferlab::kernels::DType::BF16: {              \
      using T = __nv_bfloat16;                            \
      __VA_ARGS__;                                        \
    } break;                                              \
    default: {                                            \
      using T = float;                                    \
      __VA_ARGS__;                                        \
    } break;                                              \
  }

inline int32_t ceil_div(int64_t a, int64_t b) { return int32_t((a + b - 1) / b); }

}  // namespace inferlab::kernels::cuda
