// Attention of one layer's rows a block per (row, query head), every key
// scored and the softmax kept whole: local value pruning (SpAtten), where each
// row accumulates P·V over only its most probable keys, and progressive
// quantization over bit-plane pages (SpAtten), where a row read from the MSB
// planes is recomputed from both when its softmax is flat.
// cpu::attention_row_value_topk and cpu::attention_row_progressive are the
// twins, row by row.
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
// nothing. No sparse plans; f16/bf16 pages; per-query-head selections
// (call.select_heads) only in groups of at most 32 query heads. `kept` (when
// not null, (n_heads, max_keys) bytes) gets 1 for the keys row n_rows - 1 of
// each head accumulated, 0 for the other keys it may read (the traffic
// counters' input); a masked head's row is left as it was. scratch:
// value_topk_scratch_bytes for every row at once, or less but at least
// value_topk_row_scratch_bytes: the rows then go in passes of as many as it
// holds.
size_t value_topk_scratch_bytes(const AttentionCall& call, int32_t max_keys);
size_t value_topk_row_scratch_bytes(const AttentionCall& call, int32_t max_keys);
cudaError_t attention_value_topk(const AttentionCall& call, int32_t max_keys, double keep, bool renormalize,
                                 uint8_t* kept, void* scratch, size_t scratch_bytes, cudaStream_t stream);

// The same over bit-plane pages (call.kv.planes), progressively: with
// msb_first, each row's p from the MSB planes (every value at its MSB bucket's
// middle, bit_plane_value); a row whose largest probability (1 / the sum of
// exp(s - max)) is below `threshold` is scored again from both planes, and
// its p, the keys it keeps and its P·V come from both. Without msb_first
// every row reads both planes at once. keep 1.0: no value pruning. key_mass
// and `kept` as above, from each row's final p. `requant` (when not null,
// (n_heads, n_rows, 3) int32) gets per (head, row): 1 when it was recomputed
// from both planes, then the cached keys (stored before the call) it read
// and the cached keys whose values it kept, both 0 for a row that was not
// (a masked head: all 0).
cudaError_t attention_progressive(const AttentionCall& call, int32_t max_keys, bool msb_first, float threshold,
                                  double keep, bool renormalize, uint8_t* kept, int32_t* requant, void* scratch,
                                  size_t scratch_bytes, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
