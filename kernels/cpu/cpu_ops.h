// CPU reference kernels. Plain float32, row-major. Every CUDA kernel in
// kernels/cuda has its twin here; the engine's CPU backend calls these.
#pragma once

#include <cstdint>

#include "kernel_types.h"
#include "bit_planes.h"

namespace inferlab::kernels::cpu {

// out(rows, n) = x(rows, n) * rsqrt(mean(x^2) + eps) * weight(n)
void rmsnorm(float* out, const float* x, const float* weight, int64_t rows, int64_t n, float eps);

// Rotary embedding applied in place to x(rows, n_heads, head_dim), row r at
// position positions[r]. Only the first rope_dim dims of a head rotate.
// neox = false: pairs (2i, 2i+1) (GGUF "llama"); neox = true: pairs (i, i + rope_dim/2).
void rope(float* x, int64_t rows, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
          const int32_t* positions, float theta, bool neox, const RopeScaling& scaling = {});

// The same on rows `row_stride` floats apart, each holding n_heads heads.
void rope_strided(float* x, int64_t rows, int64_t row_stride, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                  const int32_t* positions, float theta, bool neox, const RopeScaling& scaling = {});

// Rotates `rows` single-head rows (row_stride floats apart) by the same RoPE
// position offset `delta` (rotations compose): the angles are computed once.
void rope_shift(float* x, int64_t rows, int64_t row_stride, int64_t head_dim, int64_t rope_dim, int32_t delta,
                float theta, bool neox, const RopeScaling& scaling = {});

// gate(rows, n) = silu(gate) * up, in place.
void silu_mul(float* gate, const float* up, int64_t rows, int64_t n);

// y(rows, n) += x(rows, n)
void add_inplace(float* y, const float* x, int64_t rows, int64_t n);
// y[i, j] += bias[j] over `rows` rows of n.
void add_row_bias(float* y, const float* bias, int64_t rows, int64_t n);

// Y(m, n) = X(m, k) * W(n, k)^T — W is the GGUF/row-major (out, in) layout.
// Up to kGemvMaxRows rows: the GEMV, W read once for all rows and each row's
// sums those of a one-row product (a decode step's result does not depend on
// how many sequences share it); more: OpenBLAS sgemm.
inline constexpr int64_t kGemvMaxRows = 16;
void matmul_xwt(float* y, const float* x, const float* w, int64_t m, int64_t n, int64_t k);
// Y(m, n) += X(m, k) * W(n, k)^T (adapters on top of a projection).
void matmul_xwt_add(float* y, const float* x, const float* w, int64_t m, int64_t n, int64_t k);

// Rows x(m, k), m <= kGemvMaxRows, against several matrices: targets[i].y(m, n)
// = x W_i(n, k)^T, in one parallel region (Q, K and V; gate and up).
struct GemvTarget {
  float* y = nullptr;
  const float* w = nullptr;
  int64_t n = 0;
};
void gemv_group(const GemvTarget* targets, int count, const float* x, int64_t m, int64_t k);

// Y(m, n_sel) = X(m, k) * W[rows]^T: only the selected rows of W(·, k) are read
// (sparse FFN up/gate projections). rows: n_sel ascending row indices.
void matmul_xwt_rows(float* y, const float* x, const float* w, const int32_t* rows, int64_t m, int64_t n_sel,
                     int64_t k);

// Y(m, n) = X(m, n_sel) * W[rows]: W(·, n) row-major, only the selected rows are
// read (sparse FFN down projection, with W the transposed down weight).
void matmul_x_rows(float* y, const float* x, const float* w, const int32_t* rows, int64_t m, int64_t n_sel,
                   int64_t n);

// One page of one KV head: `n_tokens` rows of K and V, each (n_tokens,
// head_dim), stored as `dtype` (f16/bf16 as their uint16 bits). Kernels widen
// rows to float as they read them (kv_row_f32), so a half-width cache halves
// the bytes attention streams.
//
// Bit-plane pages (planes.active(), dtype unused) hold each row as a record
// of bit_plane_row_bytes (bit_planes.h); `lsb` false reads the MSB planes only.
struct KvPageRef {
  const void* k;
  const void* v;
  int32_t n_tokens;
  DType dtype = DType::F32;
  BitPlanes planes{};
  bool lsb = true;
  bool widened() const { return dtype != DType::F32 || planes.active(); }
};

// Row t of the page's K (value = false) or V as float: the stored row itself
// for f32 pages, else widened into `scratch` (head_dim floats).
const float* kv_row_f32(const KvPageRef& page, bool value, int64_t t, int64_t head_dim, float* scratch);
// Rows [t0, t0 + n) of K or V widened into out (n, head_dim).
void load_kv_rows(const KvPageRef& page, bool value, int64_t t0, int64_t n, int64_t head_dim, float* out);
// n values of `dtype` widened to float (vectorized; cpu_twins' convert_to_float is the scalar reference).
void widen_to_float(const void* x, DType dtype, int64_t n, float* out);

// A row to the symmetric grid of p.bits() bits (scale from its largest
// magnitude) as a bit-plane record; and back, from the MSB plane alone (full
// false) or both planes.
void bit_plane_encode(const float* x, int64_t head_dim, BitPlanes p, void* record);
void bit_plane_decode(const void* record, int64_t head_dim, BitPlanes p, bool full, float* out);

// Attention of `n_q` query rows of one head against the concatenation of `pages`
// (one KV head): scores for one query row at a time (never an (n_q, n_keys)
// matrix), exact softmax. Query row i sees the first
// n_visible[i] keys of the concatenation (causality and any prefix restriction).
// q(n_q, head_dim) with row stride q_stride; out likewise with out_stride.
// If key_mass is non-null, the softmax probability each key receives is added to
// key_mass[key_index] (attention statistics).
void attention_paged(const float* q, int64_t n_q, int64_t q_stride, const KvPageRef* pages,
                     int64_t n_pages, const int32_t* n_visible, int64_t head_dim, float scale,
                     float* out, int64_t out_stride, float* key_mass);

// One query row against the first n_visible keys of `pages` with local value
// pruning (SpAtten): p = softmax(scale * q.k) over every visible key, then
// out(head_dim) = sum over the kept keys of p * v (divided by their total when
// renormalize), the kept keys being the ceil(keep * n_visible) largest p (ties
// to the earlier key; at least one). probs (n_visible) receives every p; kept
// (n_visible, when not null) 1 for the kept keys, else 0. Returns how many
// were kept. The values are accumulated in key order.
int64_t attention_row_value_topk(const float* q, const KvPageRef* pages, int64_t n_pages, int64_t n_visible,
                                 int64_t head_dim, float scale, double keep, bool renormalize, float* out,
                                 float* probs, uint8_t* kept);

// Index of the largest value (first on ties).
int64_t argmax(const float* x, int64_t n);

}  // namespace inferlab::kernels::cpu
