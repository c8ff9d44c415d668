#include "cuda/lora.cuh"

#include "cuda/block_reduce.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"

namespace inferlab::kernels::cuda {

namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void lora_fused_kernel(const T* __restrict__ x, const T* __restrict__ a, const T* __restrict__ b,
                                  float* __restrict__ y, int m, int64_t in, int64_t out, int rank) {
  extern __shared__ float t[];  // (m, rank): A x of each row
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, warps = blockDim.x / 32;
  for (int k = warp; k < rank; k += warps) {
    const T* ak = a + int64_t(k) * in;
    float acc[kLoraFusedMaxRows] = {0, 0, 0, 0};
    for (int64_t j = lane; j < in; j += 32) {
      const float av = to_float<T>(ak[j]);
#pragma unroll
      for (int row = 0; row < kLoraFusedMaxRows; ++row)
        if (row < m) acc[row] += av * to_float<T>(x[row * in + j]);
    }
#pragma unroll
    for (int row = 0; row < kLoraFusedMaxRows; ++row) {
      const float sum = warp_sum(acc[row]);  // every lane takes part
      if (lane == 0 && row < m) t[row * rank + k] = sum;
    }
  }
  __syncthreads();
  const int64_t o = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (o >= out) return;
  const T* bo = b + o * rank;
  float acc[kLoraFusedMaxRows] = {0, 0, 0, 0};
  for (int k = 0; k < rank; ++k) {
    const float bv = to_float<T>(bo[k]);
#pragma unroll
    for (int row = 0; row < kLoraFusedMaxRows; ++row)
      if (row < m) acc[row] += bv * t[row * rank + k];
  }
#pragma unroll
  for (int row = 0; row < kLoraFusedMaxRows; ++row)
    if (row < m) y[row * out + o] += acc[row];
}

}  // namespace

cudaError_t lora_apply_fused(const void* x, const void* a, const void* b, DType dtype, float* y, int64_t m,
                             int64_t in, int64_t out, int64_t rank, cudaStream_t stream) {
  if (m < 1 || m > kLoraFusedMaxRows || rank < 1 || rank > kLoraFusedMaxRank || in < 1 || out < 1 ||
      !valid_dtype(dtype))
    return cudaErrorInvalidValue;
  const unsigned blocks = unsigned((out + kThreads - 1) / kThreads);
  const size_t shared = size_t(m * rank) * sizeof(float);
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    lora_fused_kernel<T><<<blocks, kThreads, shared, stream>>>(static_cast<const T*>(x), static_cast<const T*>(a),
                                                               static_cast<const T*>(b), y, int(m), in, out,
                                                               int(rank)));
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
