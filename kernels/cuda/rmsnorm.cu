#include "cuda/rmsnorm.cuh"

#include "cuda/block_reduce.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"

namespace inferlab::kernels::cuda {

namespace {

template <typename T>
__global__ void rmsnorm_kernel(const float* x, const float* weight, int64_t n, float eps, T* out) {
  const float* xr = x + int64_t(blockIdx.x) * n;
  T* outr = out + int64_t(blockIdx.x) * n;
  float sum_sq = 0.0f;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum_sq += xr[i] * xr[i];
  sum_sq = block_sum(sum_sq);
  // Correctly rounded division and sqrt: the library is built with fast math.
  const float inv = __fdiv_rn(1.0f, __fsqrt_rn(__fdiv_rn(sum_sq, float(n)) + eps));
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) outr[i] = from_float<T>(xr[i] * inv * weight[i]);
}

}  // namespace

cudaError_t rmsnorm(const float* x, const float* weight, int64_t rows, int64_t n, float eps, void* out,
                    DType out_dtype, cudaStream_t stream) {
  if (rows < 0 || rows > kMaxGridX || n <= 0 || !valid_dtype(out_dtype)) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  // 1024 threads for model-width rows (4096: 4 elements each), fewer for small ones.
  const int threads = n >= 4096 ? 1024 : n >= 1024 ? 256 : 128;
  INFERLAB_DISPATCH_DTYPE(out_dtype, T,
    rmsnorm_kernel<T><<<unsigned(rows), threads, 0, stream>>>(x, weight, n, eps, static_cast<T*>(out)));
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
