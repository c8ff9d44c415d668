#include "cuda/init.cuh"

#include "counter_rng.h"
#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"

namespace inferlab::kernels::cuda {

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void fill_random_normal_kernel(T* out, int64_t n, uint64_t seed, float stddev) {
  INFERLAB_GRID_STRIDE(i, n) out[i] = from_float<T>(__fmul_rn(stddev, random_normal_value(seed, i)));
}

template <typename T>
__global__ void fill_constant_kernel(T* out, int64_t n, float value) {
  const T stored = from_float<T>(value);
  INFERLAB_GRID_STRIDE(i, n) out[i] = stored;
}

}  // namespace

cudaError_t fill_random_normal(void* out, DType dtype, int64_t n, uint64_t seed, float stddev, cudaStream_t stream) {
  if (n < 0 || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    fill_random_normal_kernel<T><<<grid_stride_blocks(n, kThreads), kThreads, 0, stream>>>(static_cast<T*>(out), n,
                                                                                          seed, stddev));
  return cudaGetLastError();
}

cudaError_t fill_constant(void* out, DType dtype, int64_t n, float value, cudaStream_t stream) {
  if (n < 0 || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    fill_constant_kernel<T><<<grid_stride_blocks(n, kThreads), kThreads, 0, stream>>>(static_cast<T*>(out), n, value));
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
