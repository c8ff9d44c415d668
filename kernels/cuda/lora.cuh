// Unmerged low-rank adapters in one launch for calls of a few rows (decode):
// y(m, out) += B (A x) per row, A (rank, in) and B (out, rank) of the GPU
// type (the adapter's scale folded into B), x (m, in) of the GPU type, y and
// the intermediate A x in float32. Each block computes A x for all rows into
// shared memory (A is small and read from L2 by every block), then its slice of
// outputs; nothing round-trips through global memory or the GPU type.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

inline constexpr int kLoraFusedMaxRows = 4;
inline constexpr int kLoraFusedMaxRank = 1024;

// m in 1..kLoraFusedMaxRows, rank in 1..kLoraFusedMaxRank.
cudaError_t lora_apply_fused(const void* x, const void* a, const void* b, DType dtype, float* y, int64_t m,
                             int64_t in, int64_t out, int64_t rank, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
