// GEMMs of the CUDA backend through cuBLAS: activations and weights in
// f16/bf16, float32 accumulation and output.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// y(m, n) = x(m, k) * w(n, k)^T, with w in the GGUF (out, in) row-major layout.
// x and w are of `dtype`; y is float32. The handle must be bound to the stream.
cublasStatus_t gemm_xwt(cublasHandle_t handle, const void* x, const void* w, DType dtype, float* y, int64_t m,
                        int64_t n, int64_t k);

// y(m, n) += x(m, k) * w(n, k)^T (adapters on top of a projection).
cublasStatus_t gemm_xwt_add(cublasHandle_t handle, const void* x, const void* w, DType dtype, float* y, int64_t m,
                            int64_t n, int64_t k);

// y(m, n) = x(m, k) * w(k, n), w row-major (a transposed weight, e.g. selected
// rows of the down projection).
cublasStatus_t gemm_xw(cublasHandle_t handle, const void* x, const void* w, DType dtype, float* y, int64_t m,
                       int64_t n, int64_t k);

// out(cols, rows) = in(rows, cols)^T, elements of `dtype`.
cudaError_t transpose(const void* in, DType dtype, int64_t rows, int64_t cols, void* out, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
