// Token choice from logits: greedy argmax per row, and nucleus (top-p) sampling.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace inferlab::kernels::cuda {

// out(rows) = index of the largest of logits(rows, n) per row, the first on
// ties (cpu::argmax). One block per row.
cudaError_t argmax_rows(const float* logits, int64_t rows, int64_t n, int32_t* out, cudaStream_t stream);

// Bytes of the workspace sample_top_p needs for n logits. Queries CUB, so it
// needs a current CUDA device.
size_t sample_workspace_bytes(int64_t n);

// *out (device) = a token drawn from softmax(logits(n) / temperature) restricted
// to the smallest set of most probable tokens whose mass reaches top_p,
// renormalized: walking tokens in descending probability (ties: lower id
// first), the first whose cumulative kept mass exceeds uniform * kept mass.
// uniform in [0, 1); top_p <= 0 keeps one token (argmax), >= 1 keeps all;
// temperature <= 0 is greedy; a NaN logit counts as -infinity. twin: cpu::sample_top_p.
cudaError_t sample_top_p(const float* logits, int64_t n, float temperature, float top_p, float uniform, int32_t* out,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
