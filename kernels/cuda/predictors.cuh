// Predicted components (ComponentPredictors, Deja Vu) on the GPU: the
// predictors' input, their low-rank layers, the per-row top-k into flags, the
// flags into a list, and the head-subset helpers that let Q and O read only
// the listed heads with the list on the device (so a decode step needs no host
// copy and replays in a graph). Twins: kernels/cpu/predictors.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// out (rows, d) = each row of x over sqrt(mean(x^2) + eps), no gain.
cudaError_t rms_scale_rows(const float* x, int64_t rows, int64_t d, float eps, float* out, cudaStream_t stream);

// y (rows, out) = x (rows, in) · w (out, in)^T + b (when not null), then
// max(0, ·) when relu: a warp per output (the one-row case; more rows go
// through cuBLAS in the backend).
cudaError_t predictor_layer(const float* x, const float* w, const float* b, int64_t rows, int64_t in, int64_t out,
                            bool relu, float* y, cudaStream_t stream);

// y (rows, out) += b (when not null), then max(0, ·) when relu: the rest of a
// predictor layer whose product came from cuBLAS.
cudaError_t bias_relu_rows(float* y, int64_t rows, int64_t out, const float* b, bool relu, cudaStream_t stream);

// flags[j] = 1 for every j among some row's k largest logits (rows, n); NaN
// the smallest (the logits' NaN become -inf in place), ties to the lower
// index; the others untouched (zero flags first for the union over rows). A
// block per row, the radix select of select_common.cuh.
cudaError_t top_k_flags(float* logits, int64_t rows, int64_t n, int32_t k, uint8_t* flags, cudaStream_t stream);

// list = the indices with flags != 0, ascending; *count (device) their number.
// One block (n up to 2^31).
cudaError_t flags_to_list(const uint8_t* flags, int64_t n, int32_t* list, int32_t* count, cudaStream_t stream);

// rows (k * head_dim) = for each listed head h, its rows h * head_dim + d of a
// (q_dim, ·) weight, in list order.
cudaError_t head_rows(const int32_t* heads, int32_t k, int32_t head_dim, int32_t* rows, cudaStream_t stream);

// q (n_rows, q_dim): the columns of listed head heads[i] (head_dim of them)
// from compact (n_rows, k * head_dim) columns i * head_dim...; others untouched.
cudaError_t scatter_head_columns(const float* compact, int64_t n_rows, const int32_t* heads, int32_t k,
                                 int32_t head_dim, float* q, int64_t q_dim, cudaStream_t stream);

// out (n_rows, k * head_dim) of dtype = the listed heads' columns of attn
// (n_rows, q_dim) float, in list order.
cudaError_t gather_head_columns(const float* attn, int64_t n_rows, int64_t q_dim, const int32_t* heads, int32_t k,
                                int32_t head_dim, void* out, DType dtype, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
