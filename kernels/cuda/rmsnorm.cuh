// RMS normalization of float activations, written in the dtype the next GEMM reads.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// out(rows, n) of out_dtype = x(rows, n) * rsqrt(mean(x^2) + eps) * weight(n).
// One block per row, float accumulation (twin: cpu::rmsnorm, then rounding).
cudaError_t rmsnorm(const float* x, const float* weight, int64_t rows, int64_t n, float eps, void* out,
                    DType out_dtype, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
