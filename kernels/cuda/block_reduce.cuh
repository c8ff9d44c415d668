// Block-wide reductions of the small kernels (one block per row): warp
// shuffles, then one value per warp through shared memory. Every thread of the
// block must call them (they synchronize), and the result reaches all threads.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace inferlab::kernels::cuda {

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Sum over the block (blockDim.x a multiple of 32, at most 1024).
__device__ __forceinline__ float block_sum(float v) {
  __shared__ float partial[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  v = warp_sum(v);
  __syncthreads();  // `partial` may still be read by a previous call
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  v = lane < n_warps ? partial[lane] : 0.0f;
  return warp_sum(v);
}

// block_sum in double (fixed order: deterministic).
__device__ __forceinline__ double block_sum_double(double v) {
  __shared__ double partial_d[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  __syncthreads();
  if (lane == 0) partial_d[warp] = v;
  __syncthreads();
  v = lane < n_warps ? partial_d[lane] : 0.0;
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// Maximum over the block.
__device__ __forceinline__ float block_max(float v) {
  __shared__ float partial_m[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  __syncthreads();
  if (lane == 0) partial_m[warp] = v;
  __syncthreads();
  v = lane < n_warps ? partial_m[lane] : -INFINITY;
  for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// (value, index) with the larger value, the smaller index on ties.
struct ArgMax {
  float value;
  int64_t index;
};

__device__ __forceinline__ ArgMax argmax_pick(ArgMax a, ArgMax b) {
  if (b.value > a.value || (b.value == a.value && b.index < a.index)) return b;
  return a;
}

__device__ __forceinline__ ArgMax warp_argmax(ArgMax a) {
  for (int offset = 16; offset > 0; offset >>= 1) {
    ArgMax b{__shfl_xor_sync(0xffffffffu, a.value, offset), __shfl_xor_sync(0xffffffffu, a.index, offset)};
    a = argmax_pick(a, b);
  }
  return a;
}

__device__ __forceinline__ ArgMax block_argmax(ArgMax a) {
  __shared__ float values[32];
  __shared__ int64_t indices[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  a = warp_argmax(a);
  __syncthreads();
  if (lane == 0) {
    values[warp] = a.value;
    indices[warp] = a.index;
  }
  __syncthreads();
  a = lane < n_warps ? ArgMax{values[lane], indices[lane]} : ArgMax{-INFINITY, INT64_MAX};
  return warp_argmax(a);
}

}  // namespace inferlab::kernels::cuda
