#include "cuda/gemm.cuh"

#include "cuda/cuda_common.cuh"

namespace inferlab::kernels::cuda {

namespace {

cudaDataType_t cuda_type(DType dtype) {
  return dtype == DType::F16 ? CUDA_R_16F : dtype == DType::BF16 ? CUDA_R_16BF : CUDA_R_32F;
}

}  // namespace

namespace {
// y = x * w^T + beta * y.
cublasStatus_t gemm_xwt_beta(cublasHandle_t handle, const void* x, const void* w, DType dtype, float* y, int64_t m,
                             int64_t n, int64_t k, float beta) {
  // Column-major view: y^T (n, m) = w (stored (k, n) col-major, transposed) * x^T ((k, m) col-major).
  const float alpha = 1.0f;
  const cudaDataType_t t = cuda_type(dtype);
  return cublasGemmEx(handle, CUBLAS_OP_T, CUBLAS_OP_N, int(n), int(m), int(k), &alpha, w, t, int(k), x, t, int(k),
                      &beta, y, CUDA_R_32F, int(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}
}  // namespace

cublasStatus_t gemm_xwt(cublasHandle_t handle, const void* x, const void* w, DType dtype, float* y, int64_t m,
                        int64_t n, int64_t k) {
  return gemm_xwt_beta(handle, x, w, dtype, y, m, n, k, 0.0f);
}

cublasStatus_t gemm_xwt_add(cublasHandle_t handle, const void* x, const void* w, DType dtype, float* y, int64_t m,
                            int64_t n, int64_t k) {
  return gemm_xwt_beta(handle, x, w, dtype, y, m, n, k, 1.0f);
}

cublasStatus_t gemm_xw(cublasHandle_t handle, const void* x, const void* w, DType dtype, float* y, int64_t m,
                       int64_t n, int64_t k) {
  // Column-major view: y^T (n, m) = w ((n, k) col-major) * x^T ((k, m) col-major).
  const float alpha = 1.0f, beta = 0.0f;
  const cudaDataType_t t = cuda_type(dtype);
  return cublasGemmEx(handle, CUBLAS_OP_N, CUBLAS_OP_N, int(n), int(m), int(k), &alpha, w, t, int(n), x, t, int(k),
                      &beta, y, CUDA_R_32F, int(n), CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT);
}

namespace {

constexpr int kTile = 32;

// One (32 x 32) tile through shared memory, so reads and writes are coalesced.
template <typename T>
__global__ void transpose_kernel(const T* in, int64_t rows, int64_t cols, T* out) {
  __shared__ T tile[kTile][kTile + 1];
  const int64_t c0 = int64_t(blockIdx.x) * kTile, r0 = int64_t(blockIdx.y) * kTile;
  for (int i = threadIdx.y; i < kTile; i += blockDim.y) {
    const int64_t r = r0 + i, c = c0 + threadIdx.x;
    if (r < rows && c < cols) tile[i][threadIdx.x] = in[r * cols + c];
  }
  __syncthreads();
  for (int i = threadIdx.y; i < kTile; i += blockDim.y) {
    const int64_t c = c0 + i, r = r0 + threadIdx.x;
    if (r < rows && c < cols) out[c * rows + r] = tile[threadIdx.x][i];
  }
}

}  // namespace

cudaError_t transpose(const void* in, DType dtype, int64_t rows, int64_t cols, void* out, cudaStream_t stream) {
  if (rows <= 0 || cols <= 0 || rows / kTile >= 65535) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(ceil_div(cols, kTile)), unsigned(ceil_div(rows, kTile))), block(kTile, 8);
  INFERLAB_DISPATCH_DTYPE(dtype, T,
                          transpose_kernel<T><<<grid, block, 0, stream>>>(static_cast<const T*>(in), rows, cols,
                                                                          static_cast<T*>(out)));
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
