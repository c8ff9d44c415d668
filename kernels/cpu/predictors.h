// Predicted components (ComponentPredictors, Deja Vu): the predictors' input,
// their low-rank layers, and the per-row top-k that becomes a list of the
// neurons or heads a layer computes. These are the CPU backend's kernels and
// the twins of kernels/cuda/predictors.cu.
#pragma once

#include <cstdint>

namespace inferlab::kernels::cpu {

// out (rows, d) = each row of x divided by sqrt(mean(x^2) + eps), no gain
// (out may be x).
void rms_scale_rows(float* out, const float* x, int64_t rows, int64_t d, float eps);

// y (rows, out) = x (rows, in) · w (out, in)^T + b (when not null), then
// max(0, ·) when relu.
void predictor_layer(float* y, const float* x, const float* w, const float* b, int64_t rows, int64_t in, int64_t out,
                     bool relu);

// flags[j] = 1 for every j among some row's k largest logits (logits (rows,
// n); NaN the smallest; ties to the lower index); others untouched (the
// caller zeroes flags first: the union over the rows). k >= n: all.
void top_k_flags(uint8_t* flags, const float* logits, int64_t rows, int64_t n, int32_t k);

// list = the indices j with flags[j] != 0, ascending; returns their count.
int32_t flags_to_list(int32_t* list, const uint8_t* flags, int64_t n);

}  // namespace inferlab::kernels::cpu
