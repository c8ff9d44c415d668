// Activation sparsity (TEAL, CATS) on the GPU: projections that skip the
// weight rows small inputs would multiply. An input entry with |x| <=
// threshold counts as zero (threshold 0: exact zeros only). `zeros`, when not
// null, gets the number of entries taken as zero added to it (device counter).
// Twins: kernels/cpu/activation_sparse.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// Inputs per split of the sparse GEMV: each split writes its own partial sums,
// added in split order (no atomics: the result does not depend on scheduling).
inline constexpr int64_t kSparseInputSplit = 64;
inline int64_t sparse_input_splits(int64_t in) { return (in + kSparseInputSplit - 1) / kSparseInputSplit; }

// y(out) = sum over i with |x_i| > threshold of x_i * wt[i, :] for one row
// x(in) of dtype; wt (in, out) of dtype, row-major (the weight transposed, so
// a skipped input skips a contiguous row). partial: sparse_input_splits(in) *
// out floats of workspace.
cudaError_t sparse_input_gemv(const void* x, const void* wt, DType dtype, int64_t in, int64_t out, float threshold,
                              float* partial, float* y, unsigned long long* zeros, cudaStream_t stream);

// out(count) of dtype = x with the entries |x| <= threshold set to 0 (out may be x).
cudaError_t sparsify(const void* x, DType dtype, int64_t count, float threshold, void* out, unsigned long long* zeros,
                     cudaStream_t stream);

// CATS, one row: act(n_ff)[j] of dtype = silu(gate[j]) * (w_up[j, :] . x)
// where |silu(gate[j])| > threshold, else 0 without reading w_up's row j.
// gate float, x (in) and w_up (n_ff, in) of dtype.
cudaError_t gated_silu_up(const float* gate, const void* x, const void* w_up, DType dtype, int64_t n_ff, int64_t in,
                          float threshold, void* act, unsigned long long* zeros, cudaStream_t stream);

// CATS, rows whose up projection ran dense: act(count) of dtype = silu(gate) *
// up where |silu(gate)| > threshold, else 0.
cudaError_t gated_silu_mul(const float* gate, const float* up, int64_t count, float threshold, void* act, DType dtype,
                           unsigned long long* zeros, cudaStream_t stream);

// Oracle selection (twins: cpu::keep_top_k_magnitudes, cpu::keep_top_heads).
// In each row of x (rows, cols) of dtype the k entries of largest magnitude
// stay and the others become 0, ties to the lower index (a block per row: a
// radix select of the k-th magnitude, then the equal ones in index order).
cudaError_t keep_top_k_magnitudes(void* x, DType dtype, int64_t rows, int64_t cols, int32_t k, cudaStream_t stream);
// In each row of attn (rows, n_heads * head_dim) float, the k heads among those
// with computed[h] != 0 (device array) of largest output L2 norm keep it; every
// other head's output becomes 0; ties to the lower head.
cudaError_t keep_top_heads(float* attn, int64_t rows, int32_t n_heads, int32_t head_dim, int32_t k,
                           const uint8_t* computed, cudaStream_t stream);

// One row against listed rows of a weight (a neuron or head subset, read in
// place, nothing copied). rows_gemv: y(out) = sum over j < k of x[j] *
// wt[rows[j], :], x (k) of dtype (the subset's compact input), wt (·, out)
// (a transposed weight); partial: sparse_input_splits(k) * out floats.
// gathered_rows_gemv: y(k) = w[rows[j], :] . x, x (in) of dtype, w (·, in).
// Twins: cpu::gather_rows_gemv, and a dot product per listed row.
cudaError_t rows_gemv(const void* x, const void* wt, DType dtype, const int32_t* rows, int64_t k, int64_t out,
                      float* partial, float* y, cudaStream_t stream);
cudaError_t gathered_rows_gemv(const void* x, const void* w, DType dtype, const int32_t* rows, int64_t k, int64_t in,
                               float* y, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda

