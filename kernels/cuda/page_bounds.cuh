// Key bounds of KV pages and selection of pages by bound (Quest's mechanism);
// layouts and contracts: PageSelectCall in kernel_types.h. CPU twins:
// cpu::page_bounds_update and cpu::page_select.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// For j < n: the bounds of physical page pages[j] become the extrema of the
// keys in its first counts[j] slots (1 <= counts[j] <= page_size). bounds:
// (physical pages, 2, head_dim) of kv.dtype. pages and counts: device arrays.
cudaError_t page_bounds_update(const KvPages& kv, void* bounds, const int32_t* pages, const int32_t* counts,
                               int32_t n, cudaStream_t stream);

// Scores every candidate page of every head with keep[g] > 0 into call.scores,
// then writes each such head's selection to call.out. `max_pages` bounds
// ceil(n_cached[g] / page_size) over the heads (it sizes the grid on the host,
// so the launch can be captured in a graph); max_pages <= call.score_stride.
cudaError_t page_select(const PageSelectCall& call, int32_t max_pages, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
