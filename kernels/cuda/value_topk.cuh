// Local value pruning (SpAtten) on the GPU: the attention of one layer's rows
// where each row accumulates P·V over only its most probable keys.
// cpu::attention_row_value_topk is the twin, row by row.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// For every query head h and row r of `call` (the keys each row reads as the
// attention kernels read them: the kv head's selected cached keys, those of a
// per-query-head selection only for the heads that select them, then the new
// rows up to r): p = softmax(scale * q.k) over those n keys, out = the sum over
// the ceil(keep * n) most probable keys (ties to the earlier key; at least one)
// of p * v, divided by their total when renormalize. With call.key_mass every
// key's p is added to it (atomically). A masked head outputs zeros and reads
// nothing. No sparse plans. `kept` (when not null, (n_heads, max_keys) bytes)
// gets 1 for the keys row n_rows - 1 of each head accumulated (the traffic
// counters' input). scratch: value_topk_scratch_bytes.
size_t value_topk_scratch_bytes(const AttentionCall& call, int32_t max_keys);
cudaError_t attention_value_topk(const AttentionCall& call, int32_t max_keys, double keep, bool renormalize,
                                 uint8_t* kept, void* scratch, size_t scratch_bytes, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
