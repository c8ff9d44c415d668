// CPU twins of the CUDA kernels that have no counterpart in cpu_ops.h (those
// of rmsnorm, rope, silu_mul, add_inplace and argmax are the twins already).
// Same descriptors and layouts as the kernels, over host memory: KvPages'
// chunk_base holds host pointers. The GPU tests compare each kernel with these.
#pragma once

#include <cstdint>
#include <vector>

#include "counter_rng.h"
#include "kernel_types.h"

namespace inferlab::kernels::cpu {

struct KvPageRef;  // cpu_ops.h

// out(n) of dtype = x(n), round to nearest even; and back.
void convert_from_float(const float* x, int64_t n, void* out, DType dtype);
void convert_to_float(const void* x, DType dtype, int64_t n, float* out);

// out(n, n_embd) float = table[ids[i], :]; table (n_vocab, n_embd) of dtype
// (f16/bf16 as their uint16 bits).
void embedding_lookup(const void* table, DType dtype, int64_t n_embd, const int32_t* ids, int64_t n, float* out);

// norms(n_heads)[h] = sum over rows of ||attn[r, h*head_dim : (h+1)*head_dim]||_2,
// attn (n_rows, n_heads * head_dim); l1 (when not null) the same with the L1
// norm (sum of |x|), SpAtten's head importance.
void head_output_norms(const float* attn, int32_t n_rows, int32_t n_heads, int32_t head_dim, float* norms,
                       float* l1 = nullptr);

// out(n_rows, row_len) = w[rows[i], :], both of dtype.
void gather_rows(const void* w, DType dtype, int64_t row_len, const int32_t* rows, int64_t n_rows, void* out);

// KV cache twins: see kernels/cuda/kv_cache_ops.cuh for the contracts.
void kv_append(const KvPages& kv, LayerPageTable table, const int32_t* first_token, const float* k, const float* v,
               int32_t n_rows, int32_t n_kv_heads);
void kv_move_rows(const KvPages& kv, const int32_t* src_page, const int32_t* src_slot, const int32_t* dst_page,
                  const int32_t* dst_slot, int32_t n_moves);
void kv_rope_shift(const KvPages& kv, const int32_t* page, const int32_t* slot, const int32_t* delta, int32_t n,
                   int32_t rope_dim, float theta, bool neox, const RopeScaling& scaling = {});
void kv_rope_from_originals(const KvPages& kv, const int32_t* page, const int32_t* slot, const int32_t* origin_page,
                            const int32_t* delta, const int32_t* save, int32_t n, int32_t rope_dim, float theta,
                            bool neox, const RopeScaling& scaling = {});
void kv_copy_pages(const KvPages& kv, const int32_t* src, const int32_t* dst, int32_t n);

// Key bounds of pages (layout: PageSelectCall in kernel_types.h): for j < n,
// the bounds of physical page pages[j] become the extrema of its first
// counts[j] slots' keys (counts[j] >= 1), stored in kv.dtype.
void page_bounds_update(const KvPages& kv, void* bounds, const int32_t* pages, const int32_t* counts, int32_t n);
// The selection by bound of PageSelectCall. A score accumulates in float, over
// query heads then channels, in that order (the CPU engine's reference). With
// per_head, marks is not used (call.scores still is).
void page_select(const PageSelectCall& call);

// Slot planes (kv_cache_ops.cuh): one 4-byte value per physical slot.
void slot_plane_fill(LayerPageTable table, const int32_t* first_token, int32_t n_rows, int32_t n_kv_heads,
                     int32_t page_size, uint32_t* plane, uint32_t value);
void slot_plane_move(uint32_t* plane, int32_t page_size, const int32_t* src_page, const int32_t* src_slot,
                     const int32_t* dst_page, const int32_t* dst_slot, int32_t n_moves);
void slot_plane_copy_pages(const uint32_t* from, uint32_t* to, int32_t page_size, const int32_t* src,
                           const int32_t* dst, int32_t n);

// Engine-side retention (RetentionCall in kernel_types.h). The choice itself:
// the stored tokens of one head that leave (ascending), all but its first
// `sink`, its last `recent` and its `heavy` best-scoring others (score
// descending, ties to the earlier token; a NaN ranks last). Nothing when heavy
// < 0 or n <= sink + recent + heavy. The CPU backend and the device kernels
// make exactly this choice.
void retention_drops(const float* score, int32_t n, int32_t sink, int32_t recent, int32_t heavy,
                     std::vector<int32_t>& drop);
// The kernels' twins over host arrays (max_tokens as for the kernel).
void retention_update(const RetentionCall& call);
void retention_select(const RetentionCall& call);

// Retention per sequence (SequenceRetentionCall in kernel_types.h); scratch unused.
void sequence_retention_update(const SequenceRetentionCall& call);
void sequence_retention_select(const SequenceRetentionCall& call);

// Element `index` of a K (value = false) or V row at (page, slot), widened to
// float (bit-plane pages: decoded from both planes).
float kv_load(const KvPages& kv, int32_t page, int32_t slot, bool value, int32_t index);

// Progressive quantization of one query row (cuda::attention_progressive's
// twin, row by row): attention_row_value_topk over bit-plane `pages` read from
// their MSB planes; when the row's largest probability is below `threshold`,
// again from both planes, its output, probabilities and kept keys replacing
// the first pass's (the CPU backend's decision). Returns whether it was
// recomputed. keep 1.0: every key kept (no value pruning).
bool attention_row_progressive(const float* q, const KvPageRef* pages, int64_t n_pages, int64_t n_visible,
                               int64_t head_dim, float scale, double keep, bool renormalize, float threshold,
                               float* out, float* probs, uint8_t* kept);

// A token drawn from softmax(logits(n) / temperature) restricted to the
// smallest most-probable set of mass >= top_p (cuda::sample_top_p's contract),
// in double precision.
int32_t sample_top_p(const float* logits, int64_t n, float temperature, float top_p, float uniform);

// The standard normal of (seed, i), bit-identical to the device's.
using kernels::random_normal_value;

// out(n) of dtype = stddev * random_normal_value(seed, i), rounded to dtype.
void fill_random_normal(void* out, DType dtype, int64_t n, uint64_t seed, float stddev);

}  // namespace inferlab::kernels::cpu
