// Rotary position embedding of float activations (queries and new keys).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// In place on x(rows, row_stride), which holds n_heads heads of head_dim from
// column 0; the first rope_dim dims of a head rotate (pair layout as cpu::rope).
// Head h of row r is at position positions[(h * position_groups / n_heads) * rows + r]:
// position_groups = 1 shares positions(rows) across heads; = n_kv_heads gives
// each kv head's query group its own positions(n_kv_heads, rows).
cudaError_t rope(float* x, int64_t rows, int64_t row_stride, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                 const int32_t* positions, int32_t position_groups, float theta, bool neox, cudaStream_t stream,
                 const RopeScaling& scaling = {});

// Positions of a call's new rows when positions are cache indices, for rope's
// per-kv-head groups: out[g * n_rows + i] = n_cached[g] + i.
cudaError_t cache_positions(const int32_t* n_cached, int32_t n_kv_heads, int32_t n_rows, int32_t* out,
                            cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
