// Paged-pool helpers of the CUDA backend: page copies between two pools of the
// same shape and element type (a saved prefill cloned into the engine's pool),
// and cache-index RoPE positions.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// Copies page src_pages[i] of `src` to page dst_pages[i] of `dst`, i < n
// (index arrays in device memory).
cudaError_t kv_copy_pages_between(const KvPages& src, const KvPages& dst, const int32_t* src_pages,
                                  const int32_t* dst_pages, int32_t n, cudaStream_t stream);

// RoPE positions of a call's new rows when positions are cache indices:
// out[g * n_rows + i] = n_cached[g] + i, for the rope launcher's per-kv-head groups.
cudaError_t cache_positions(const int32_t* n_cached, int32_t n_kv_heads, int32_t n_rows, int32_t* out,
                            cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
