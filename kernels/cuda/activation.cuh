// Elementwise ops on float activations, dtype conversions, and small row
// reductions/gathers used between the engine's GEMMs.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// out(n) of out_dtype = silu(gate(n)) * up(n). out may alias gate when F32.
cudaError_t silu_mul(const float* gate, const float* up, int64_t n, void* out, DType out_dtype, cudaStream_t stream);

// y(n) += x(n)
cudaError_t add_inplace(float* y, const float* x, int64_t n, cudaStream_t stream);

// y(rows, cols)[i, j] += bias(cols)[j]
cudaError_t add_row_bias(float* y, const float* bias, int64_t rows, int64_t cols, cudaStream_t stream);

// out(n) of dtype = x(n), round to nearest even.
cudaError_t convert_from_float(const float* x, int64_t n, void* out, DType dtype, cudaStream_t stream);

// out(n) float = x(n) of dtype.
cudaError_t convert_to_float(const void* x, DType dtype, int64_t n, float* out, cudaStream_t stream);

// norms(n_heads)[h] = sum over rows r of ||attn[r, h*head_dim : (h+1)*head_dim]||_2,
// attn (n_rows, n_heads * head_dim); l1 (when not null) the same with the L1
// norm (sum of |x|). Overwrites them; deterministic (no atomics).
cudaError_t head_output_norms(const float* attn, int32_t n_rows, int32_t n_heads, int32_t head_dim, float* norms,
                              float* l1, cudaStream_t stream);

// out(n_rows, row_len) = w[rows[i], :], w (·, row_len) of dtype, out the same
// dtype (sparse FFN weight slices). rows are not range-checked.
cudaError_t gather_rows(const void* w, DType dtype, int64_t row_len, const int32_t* rows, int64_t n_rows, void* out,
                        cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
