// Writes and moves of the paged KV cache (layout: KvPages in kernel_types.h).
// The engine owns the pages and the tables; these kernels only follow them.
// Appends, moves and copies take element pages and bit-plane pages alike
// (moves and copies are byte copies of rows and pages); the RoPE turns need
// element pages.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// Appends n_rows new tokens to each of n_kv_heads heads: k, v (n_rows,
// n_kv_heads * head_dim) float. Row i of kv head g becomes stored token
// t = first_token[g] + i, written in kv.dtype (bit-plane pages: the record
// cpu::bit_plane_encode writes, byte for byte) at page
// table.pages[g * table.stride + t / page_size], slot t % page_size.
// first_token: (n_kv_heads) device array.
cudaError_t kv_append(const KvPages& kv, LayerPageTable table, const int32_t* first_token, const float* k,
                      const float* v, int32_t n_rows, int32_t n_kv_heads, cudaStream_t stream);

// Bytes of the scratch kv_move_rows needs: (n_moves, 2) rows of kv.row_bytes().
size_t kv_move_scratch_bytes(const KvPages& kv, int32_t n_moves);

// Moves the K and V rows at (src_page[j], src_slot[j]) to (dst_page[j],
// dst_slot[j]), j < n_moves. Every source is read before any destination is
// written (a gather kernel into scratch, then a scatter kernel), so moves may
// chain: compaction moves rows down in place. Destinations must be distinct.
// Chunk bases and scratch must be 16-byte aligned (cudaMalloc's are).
cudaError_t kv_move_rows(const KvPages& kv, const int32_t* src_page, const int32_t* src_slot,
                         const int32_t* dst_page, const int32_t* dst_slot, int32_t n_moves, void* scratch,
                         cudaStream_t stream);

// Rotates the K row at (page[j], slot[j]) by delta[j] RoPE positions
// (cpu::rope_shift's math), in the storage dtype, for j < n. Element pages only.
cudaError_t kv_rope_shift(const KvPages& kv, const int32_t* page, const int32_t* slot, const int32_t* delta,
                          int32_t n, int32_t rope_dim, float theta, bool neox, cudaStream_t stream,
                          const RopeScaling& scaling = {});

// Turns the K row at (page[j], slot[j]) to delta[j] RoPE positions from its
// original, the K row at (origin_page[j], slot[j]) (cpu::rope_shift's math on
// the original, one rounding to kv.dtype), j < n. Where save[j] != 0 the row
// is its own original: its rotary dims are first copied there. (page, slot)
// pairs must be distinct, and no origin page a page of the call. Element pages only.
cudaError_t kv_rope_from_originals(const KvPages& kv, const int32_t* page, const int32_t* slot,
                                   const int32_t* origin_page, const int32_t* delta, const int32_t* save, int32_t n,
                                   int32_t rope_dim, float theta, bool neox, cudaStream_t stream,
                                   const RopeScaling& scaling = {});

// Copies whole pages src[j] -> dst[j], j < n. No page may be both a source and
// a destination of one call. Chunk bases must be 16-byte aligned (cudaMalloc's are).
cudaError_t kv_copy_pages(const KvPages& kv, const int32_t* src, const int32_t* dst, int32_t n,
                          cudaStream_t stream);

// The same from the pages of pool `from` into those of pool `to` (same page
// bytes and the same bit planes, if any; a saved prefill copied into the
// engine's pool).
cudaError_t kv_copy_pages(const KvPages& from, const KvPages& to, const int32_t* src, const int32_t* dst, int32_t n,
                          cudaStream_t stream);

// Slot planes (SlotPlane in the engine's KV cache): one 4-byte value per
// physical slot, at plane[page * page_size + slot].
// Sets the values of each kv head's new tokens first_token[g] .. + n_rows - 1
// (first_token a device array, as for kv_append).
cudaError_t slot_plane_fill(LayerPageTable table, const int32_t* first_token, int32_t n_rows, int32_t n_kv_heads,
                            int32_t page_size, uint32_t* plane, uint32_t value, cudaStream_t stream);
// The values of kv_move_rows' moves, every source read before any destination
// is written (through scratch: n_moves values).
cudaError_t slot_plane_move(uint32_t* plane, int32_t page_size, const int32_t* src_page, const int32_t* src_slot,
                            const int32_t* dst_page, const int32_t* dst_slot, int32_t n_moves, uint32_t* scratch,
                            cudaStream_t stream);
// The values of whole pages: to[dst[j] * page_size ...] = from[src[j] * page_size ...], j < n.
cudaError_t slot_plane_copy_pages(const uint32_t* from, uint32_t* to, int32_t page_size, const int32_t* src,
                                  const int32_t* dst, int32_t n, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
