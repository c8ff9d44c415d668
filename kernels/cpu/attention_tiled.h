// Tiled attention for the CPU backend: the query vectors of one GQA group
// (its query heads x a tile of rows) against tiles of 32 keys, with an online
// softmax in the log2 domain (as the CUDA kernels), vectorized scores and
// value accumulation. Each key and value row is read once per tile for all of
// the group's queries. A key range can be computed on its own and merged
// (split-key decode, one thread per key slice).
//
// attention_paged (cpu_ops.h) stays the exact two-pass reference; it also
// serves the calls that need attention statistics.
#pragma once

#include <cstdint>

#include "cpu/cpu_ops.h"

namespace inferlab::kernels::cpu {

// The query vectors of one call: n_rows rows x n_heads heads, vector (i, j) at
// q + i * row_stride + j * head_stride; likewise for out. Row i sees the first
// n_visible[i] keys of the page concatenation (causality, prefix limits).
struct QueryTile {
  const float* q = nullptr;
  int64_t n_rows = 0;
  int64_t n_heads = 1;
  int64_t row_stride = 0;
  int64_t head_stride = 0;
  const int32_t* n_visible = nullptr;
  float* out = nullptr;
  int64_t out_row_stride = 0;
  int64_t out_head_stride = 0;
  int64_t n_vectors() const { return n_rows * n_heads; }
};

// Softmax partials of the keys [key_begin, key_end) for every query vector v =
// i * n_heads + j: o (n_vectors, head_dim) unnormalized output, m running max
// and l sum of exp2(score - m), scores in the log2 domain. A vector that saw no
// key has m = -inf, l = 0 and o = 0.
struct SoftmaxPartial {
  float* o = nullptr;
  float* m = nullptr;
  float* l = nullptr;
};

// Whether the tiled kernels handle this head size (else use attention_paged).
bool attention_tiled_supports(int64_t head_dim);

// Exact attention of every query vector of `tile` (normalized into tile.out).
void attention_tiled(const QueryTile& tile, const KvPageRef* pages, int64_t n_pages, int64_t head_dim, float scale);

// Partials of the keys [key_begin, key_end) of the concatenation (visibility
// still applies); tile.out is not written.
void attention_tiled_partial(const QueryTile& tile, const KvPageRef* pages, int64_t n_pages, int64_t head_dim,
                             float scale, int64_t key_begin, int64_t key_end, const SoftmaxPartial& part);

// Combines n_parts partials of the same query vectors (part p's arrays at
// parts[p]) into tile.out, normalized. A vector no part saw gets zeros.
void attention_merge(const QueryTile& tile, const SoftmaxPartial* parts, int64_t n_parts, int64_t head_dim);

// Attention statistics after the fact (as the CUDA kernels): adds to mass[t]
// the softmax probability each visible key t of the concatenation received
// from each row of a one-head tile, given the row's final max m[i] and sum
// l[i] (log2 domain, as attention_tiled_partial left them for all keys).
void attention_key_mass(const QueryTile& tile, const KvPageRef* pages, int64_t n_pages, int64_t head_dim, float scale,
                        const float* m, const float* l, float* mass);

}  // namespace inferlab::kernels::cpu
