#include "cuda/embedding.cuh"

#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"

namespace inferlab::kernels::cuda {

namespace {

// One block per token.
template <typename T>
__global__ void embedding_lookup_kernel(const T* table, int64_t n_embd, const int32_t* ids, float* out) {
  const T* row = table + int64_t(ids[blockIdx.x]) * n_embd;
  float* dst = out + int64_t(blockIdx.x) * n_embd;
  for (int64_t j = threadIdx.x; j < n_embd; j += blockDim.x) dst[j] = to_float(row[j]);
}

}  // namespace

cudaError_t embedding_lookup(const void* table, DType dtype, int64_t n_embd, const int32_t* ids, int64_t n,
                             float* out, cudaStream_t stream) {
  if (n < 0 || n_embd <= 0 || n > kMaxGridX || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    embedding_lookup_kernel<T><<<unsigned(n), 256, 0, stream>>>(static_cast<const T*>(table), n_embd, ids, out));
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
