// Early exit by confidence (ExitPolicy, CALM): the measures of one residual
// row after a layer. The CPU backend's kernels and the twins of
// kernels/cuda/early_exit.cu.
#pragma once

#include <cstdint>

namespace inferlab::kernels::cpu {

// Softmax of `logits` (n), its largest probability minus its second largest
// (NaN logits count as -infinity; all of them NaN or -infinity: 0).
float softmax_margin(const float* logits, int64_t n);

// cos(a, b) over n values, sums in double, at most 1; 0 when either is zero.
float cosine_similarity(const float* a, const float* b, int64_t n);

// softmax(z)[1] of a 2-way classifier's logits z (2).
float two_way_confidence(const float* z);

}  // namespace inferlab::kernels::cpu
