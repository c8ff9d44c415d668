// Rotary position embedding of float activations (queries and new keys).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace inferlab::kernels::cuda {

// In place on x(rows, row_stride), which holds n_heads heads of head_dim from
// column 0; the first rope_dim dims of a head rotate (pair layout as cpu::rope).
// Head h of row r is at position positions[(h * position_groups / n_heads) * rows + r]:
// position_groups = 1 shares positions(rows) across heads; = n_kv_heads gives
// each kv head's query group its own positions(n_kv_heads, rows).
cudaError_t rope(float* x, int64_t rows, int64_t row_stride, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                 const int32_t* positions, int32_t position_groups, float theta, bool neox, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
