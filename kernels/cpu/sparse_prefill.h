// MInference's online index estimation for sparse prefill (PrefillPattern), on
// the CPU: the scores a vertical-slash head and a block-top-k head pick their
// keys from, and the top-k choice. One query head per call; the backend runs
// heads in parallel.
#pragma once

#include <cstdint>
#include <vector>

#include "cpu/cpu_ops.h"

namespace inferlab::kernels::cpu {

// Vertical and slash scores of one query head. Query row i < n_rows (its
// vector at q + i * q_stride, after RoPE) sits at stored position self[i] and
// sees keys 0 .. self[i] of the concatenation `pages` (stored order). With
// p_i = softmax over those keys of scale * q_i . k:
//   vertical[k] += p_i[k]   and   slash[self[i] - k] += p_i[k].
// Both arrays hold at least max(self) + 1 entries; `scratch` is resized.
void vertical_slash_scores(const float* q, int64_t n_rows, int64_t q_stride, const int32_t* self,
                           const KvPageRef* pages, int64_t n_pages, int64_t head_dim, float scale, float* vertical,
                           float* slash, std::vector<float>& scratch);

// Mean of each block of `block_size` keys of the concatenation (the last block
// may be partial): out (ceil(n_keys / block_size), head_dim).
void mean_pool_keys(const KvPageRef* pages, int64_t n_pages, int64_t n_keys, int64_t head_dim, int64_t block_size,
                    float* out);

// Mean of query rows by block: row i sits at stored position first + i and
// belongs to block (first + i) / block_size; out row b - first / block_size is
// block b's mean over the rows it holds.
void mean_pool_rows(const float* q, int64_t n_rows, int64_t q_stride, int64_t first, int64_t head_dim,
                    int64_t block_size, float* out);

// The k best of scores[0 .. n) (NaN counts lowest; ties to the lower index),
// their indices ascending in `out`. k >= n keeps all.
void top_k_ascending(const float* scores, int64_t n, int64_t k, std::vector<int32_t>& out);

}  // namespace inferlab::kernels::cpu
