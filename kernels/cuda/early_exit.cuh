// Early exit by confidence (ExitPolicy, CALM) on the GPU: the measures of one
// residual row after a layer, each reduced on the device into one float, the
// only value a check sends back to the host. Twins: kernels/cpu/early_exit.h.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace inferlab::kernels::cuda {

// *out (device) = the softmax of logits (n >= 1), its largest probability
// minus its second largest (NaN logits count as -infinity; all of them NaN or
// -infinity: 0). One block; the exponentials and their sum in double
// (cpu::softmax_margin).
cudaError_t softmax_margin(const float* logits, int64_t n, float* out, cudaStream_t stream);

// *out (device) = cos(a, b) over n >= 1 values, sums in double, at most 1; 0
// when either is zero. One block (cpu::cosine_similarity).
cudaError_t cosine_similarity(const float* a, const float* b, int64_t n, float* out, cudaStream_t stream);

// *out (device) = softmax(z)[1] of a 2-way classifier's logits z (2, device)
// (cpu::two_way_confidence).
cudaError_t two_way_confidence(const float* z, float* out, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
