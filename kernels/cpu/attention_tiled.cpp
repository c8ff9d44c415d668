#include "cpu/attention_tiled.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define INFERLAB_TILED_AVX2 1
#endif

namespace inferlab::kernels::cpu {

namespace {

constexpr int kTileKeys = 32;     // keys per tile: their K and V rows stay in L1 while every query reads them
constexpr int kMaxHeadDim = 256;  // the zero row that pads a tile is this long
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kNegInf = -std::numeric_limits<float>::infinity();

alignas(64) const float kZeroRow[kMaxHeadDim] = {};

// The key and value rows of one tile, padded with zero rows to kTileKeys.
struct KeyTile {
  const float* k[kTileKeys];
  const float* v[kTileKeys];
  int32_t first = 0;  // index of k[0] in the concatenation
  int32_t count = 0;  // real rows
};

// Walks the page concatenation from key `begin` in tiles. Rows of f16/bf16
// and bit-plane pages are widened into the walker's staging rows (one tile's worth, in L1),
// so the tile's consumers read float rows either way; a tile stays valid until
// the next call.
class TileWalker {
 public:
  TileWalker(const KvPageRef* pages, int64_t n_pages, int64_t head_dim, int64_t begin)
      : pages_(pages), n_pages_(n_pages), hd_(head_dim), key_(begin) {
    while (page_ < n_pages_ && offset_ + pages_[page_].n_tokens <= begin) offset_ += pages_[page_++].n_tokens;
    for (int64_t p = 0; p < n_pages_; ++p)
      if (pages_[p].widened()) {
        thread_local std::vector<float> stage;
        stage.resize(size_t(2 * kTileKeys * hd_));
        stage_ = stage.data();
        break;
      }
  }
  // The next tile of keys below `end`; false when none is left.
  bool next(int64_t end, KeyTile& tile) {
    tile.first = int32_t(key_);
    tile.count = 0;
    while (tile.count < kTileKeys && key_ < end && page_ < n_pages_) {
      const KvPageRef& p = pages_[page_];
      const int64_t in_page = key_ - offset_;
      if (in_page >= p.n_tokens) {
        offset_ += p.n_tokens;
        ++page_;
        continue;
      }
      float* stage_k = stage_ != nullptr ? stage_ + 2 * tile.count * hd_ : nullptr;  // f32 pages: not used
      tile.k[tile.count] = kv_row_f32(p, false, in_page, hd_, stage_k);
      tile.v[tile.count] = kv_row_f32(p, true, in_page, hd_, stage_k != nullptr ? stage_k + hd_ : nullptr);
      ++tile.count;
      ++key_;
    }
    for (int t = tile.count; t < kTileKeys; ++t) tile.k[t] = tile.v[t] = kZeroRow;
    return tile.count > 0;
  }

 private:
  const KvPageRef* pages_;
  int64_t n_pages_, hd_;
  int64_t key_;
  int64_t page_ = 0, offset_ = 0;  // the page holding key_ and its first key's index
  float* stage_ = nullptr;         // (kTileKeys, 2, head_dim) widened rows, for half-width pages
};

#if INFERLAB_TILED_AVX2

// 2^x for x <= 0 (x below -127 gives 0): 2^round(x) times a degree-7 series of
// e^(f ln 2), |f| <= 1/2; relative error below 1e-7.
inline __m256 exp2_ps(__m256 x) {
  x = _mm256_max_ps(x, _mm256_set1_ps(-127.0f));
  const __m256 n = _mm256_round_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  const __m256 y = _mm256_mul_ps(_mm256_sub_ps(x, n), _mm256_set1_ps(0.6931471805599453f));
  __m256 p = _mm256_set1_ps(1.0f / 5040);
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 720));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 120));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 24));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f / 6));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(0.5f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f));
  p = _mm256_fmadd_ps(p, y, _mm256_set1_ps(1.0f));
  const __m256i bits = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(p, _mm256_castsi256_ps(bits));
}

// The eight dot products q . k[t], t < 8, as one vector.
inline __m256 dot8(const float* q, const float* const* k, int64_t hd) {
  __m256 a[8];
  for (int t = 0; t < 8; ++t) a[t] = _mm256_setzero_ps();
  for (int64_t d = 0; d < hd; d += 8) {
    const __m256 qv = _mm256_loadu_ps(q + d);
    for (int t = 0; t < 8; ++t) a[t] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k[t] + d), a[t]);
  }
  const __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
  const __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

// o[0 .. 8*NV) = alpha * o + sum_t p[t] * v[t][...], for `count` keys.
template <int NV>
inline void accumulate(float* o, float alpha, const float* p, const float* const* v, int count, int64_t d0) {
  __m256 acc[NV];
  const __m256 a = _mm256_set1_ps(alpha);
  for (int u = 0; u < NV; ++u) acc[u] = _mm256_mul_ps(a, _mm256_loadu_ps(o + 8 * u));
  for (int t = 0; t < count; ++t) {
    const __m256 pt = _mm256_set1_ps(p[t]);
    const float* vt = v[t] + d0;
    for (int u = 0; u < NV; ++u) acc[u] = _mm256_fmadd_ps(pt, _mm256_loadu_ps(vt + 8 * u), acc[u]);
  }
  for (int u = 0; u < NV; ++u) _mm256_storeu_ps(o + 8 * u, acc[u]);
}

// Scores s (raw dot products, `count` of them visible) of one query against a
// tile become probabilities exp2(s * scale2 - m_new); m and l are updated and
// the factor the old output is scaled by is returned.
float softmax_step(float* s, int count, float scale2, float& m, float& l) {
  const int groups = (count + 7) / 8;
  __m256 vmax = _mm256_set1_ps(kNegInf);
  const __m256 sc = _mm256_set1_ps(scale2);
  for (int g = 0; g < groups; ++g) {
    __m256 v = _mm256_mul_ps(_mm256_load_ps(s + 8 * g), sc);
    if (8 * g + 8 > count) {  // mask the keys this query does not see
      const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7);
      const __m256 keep = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(count - 8 * g), lane));
      v = _mm256_blendv_ps(_mm256_set1_ps(kNegInf), v, keep);
    }
    _mm256_store_ps(s + 8 * g, v);
    vmax = _mm256_max_ps(vmax, v);
  }
  __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(vmax), _mm256_extractf128_ps(vmax, 1));
  m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
  m4 = _mm_max_ss(m4, _mm_shuffle_ps(m4, m4, 1));
  const float m_new = std::max(m, _mm_cvtss_f32(m4));
  const float alpha = m == kNegInf ? 0.0f : std::exp2(m - m_new);
  const __m256 mv = _mm256_set1_ps(m_new);
  __m256 sum = _mm256_setzero_ps();
  for (int g = 0; g < groups; ++g) {
    const __m256 p = exp2_ps(_mm256_sub_ps(_mm256_load_ps(s + 8 * g), mv));
    _mm256_store_ps(s + 8 * g, p);
    sum = _mm256_add_ps(sum, p);
  }
  __m128 s4 = _mm_add_ps(_mm256_castps256_ps128(sum), _mm256_extractf128_ps(sum, 1));
  s4 = _mm_hadd_ps(s4, s4);
  s4 = _mm_hadd_ps(s4, s4);
  l = l * alpha + _mm_cvtss_f32(s4);
  m = m_new;
  return alpha;
}

// One query vector against one tile: updates (o, m, l) with its `count` visible keys.
void tile_update(const float* q, const KeyTile& tile, int count, int64_t hd, float scale2, float* o, float& m,
                 float& l) {
  alignas(32) float s[kTileKeys];
  for (int g = 0; g < (count + 7) / 8; ++g) _mm256_store_ps(s + 8 * g, dot8(q, tile.k + 8 * g, hd));
  const float alpha = softmax_step(s, count, scale2, m, l);
  int64_t d = 0;
  for (; d + 64 <= hd; d += 64) accumulate<8>(o + d, alpha, s, tile.v, count, d);
  for (; d + 8 <= hd; d += 8) accumulate<1>(o + d, alpha, s, tile.v, count, d);
}

// NQ query vectors (heads of one kv group, same visible keys) against one tile:
// each K and V row is loaded once for all of them (decode reads every key from
// memory once; the queries share the load). Scores four keys at a time,
// values 32 dimensions at a time.
template <int NQ>
void tile_update_heads(const float* const* q, const KeyTile& tile, int count, int64_t hd, float scale2,
                       float* const* o, float* m, float* l) {
  alignas(32) float s[NQ][kTileKeys];
  for (int g = 0; g < (count + 3) / 4; ++g) {
    __m256 acc[NQ][4];
    for (int j = 0; j < NQ; ++j)
      for (int t = 0; t < 4; ++t) acc[j][t] = _mm256_setzero_ps();
    const float* const* k = tile.k + 4 * g;
    for (int64_t d = 0; d < hd; d += 8) {
      const __m256 k0 = _mm256_loadu_ps(k[0] + d), k1 = _mm256_loadu_ps(k[1] + d), k2 = _mm256_loadu_ps(k[2] + d),
                   k3 = _mm256_loadu_ps(k[3] + d);
      for (int j = 0; j < NQ; ++j) {
        const __m256 qv = _mm256_loadu_ps(q[j] + d);
        acc[j][0] = _mm256_fmadd_ps(qv, k0, acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(qv, k1, acc[j][1]);
        acc[j][2] = _mm256_fmadd_ps(qv, k2, acc[j][2]);
        acc[j][3] = _mm256_fmadd_ps(qv, k3, acc[j][3]);
      }
    }
    for (int j = 0; j < NQ; ++j) {
      const __m256 u = _mm256_hadd_ps(_mm256_hadd_ps(acc[j][0], acc[j][1]), _mm256_hadd_ps(acc[j][2], acc[j][3]));
      _mm_store_ps(&s[j][4 * g], _mm_add_ps(_mm256_castps256_ps128(u), _mm256_extractf128_ps(u, 1)));
    }
  }
  float alpha[NQ];
  for (int j = 0; j < NQ; ++j) alpha[j] = softmax_step(s[j], count, scale2, m[j], l[j]);
  int64_t d = 0;
  for (; d + 32 <= hd; d += 32) {
    __m256 acc[NQ][4];
    for (int j = 0; j < NQ; ++j)
      for (int u = 0; u < 4; ++u) acc[j][u] = _mm256_mul_ps(_mm256_set1_ps(alpha[j]), _mm256_loadu_ps(o[j] + d + 8 * u));
    for (int t = 0; t < count; ++t) {
      const float* vt = tile.v[t] + d;
      const __m256 v0 = _mm256_loadu_ps(vt), v1 = _mm256_loadu_ps(vt + 8), v2 = _mm256_loadu_ps(vt + 16),
                   v3 = _mm256_loadu_ps(vt + 24);
      for (int j = 0; j < NQ; ++j) {
        const __m256 p = _mm256_set1_ps(s[j][t]);
        acc[j][0] = _mm256_fmadd_ps(p, v0, acc[j][0]);
        acc[j][1] = _mm256_fmadd_ps(p, v1, acc[j][1]);
        acc[j][2] = _mm256_fmadd_ps(p, v2, acc[j][2]);
        acc[j][3] = _mm256_fmadd_ps(p, v3, acc[j][3]);
      }
    }
    for (int j = 0; j < NQ; ++j)
      for (int u = 0; u < 4; ++u) _mm256_storeu_ps(o[j] + d + 8 * u, acc[j][u]);
  }
  for (; d + 8 <= hd; d += 8)
    for (int j = 0; j < NQ; ++j) accumulate<1>(o[j] + d, alpha[j], s[j], tile.v, count, d);
}

// The heads of row i from head j on, at most three at a time.
void update_heads(const QueryTile& tile, int64_t i, const KeyTile& kt, int count, int64_t hd, float scale2,
                  const SoftmaxPartial& part) {
  for (int64_t j = 0; j < tile.n_heads;) {
    const int n = int(std::min<int64_t>(3, tile.n_heads - j));
    const float* q[3];
    float* o[3];
    const int64_t v0 = i * tile.n_heads + j;
    for (int x = 0; x < n; ++x) {
      q[x] = tile.q + i * tile.row_stride + (j + x) * tile.head_stride;
      o[x] = part.o + (v0 + x) * hd;
    }
    if (n == 3) tile_update_heads<3>(q, kt, count, hd, scale2, o, part.m + v0, part.l + v0);
    else if (n == 2) tile_update_heads<2>(q, kt, count, hd, scale2, o, part.m + v0, part.l + v0);
    else tile_update(q[0], kt, count, hd, scale2, o[0], part.m[v0], part.l[v0]);
    j += n;
  }
}

// p[t] = exp2(q . k[t] * scale2 - m) * inv_l for the tile's first `count` keys.
void tile_probabilities(const float* q, const KeyTile& tile, int count, int64_t hd, float scale2, float m,
                        float inv_l, float* p) {
  for (int g = 0; g < (count + 7) / 8; ++g) {
    const __m256 s = _mm256_fmsub_ps(dot8(q, tile.k + 8 * g, hd), _mm256_set1_ps(scale2), _mm256_set1_ps(m));
    _mm256_storeu_ps(p + 8 * g, _mm256_mul_ps(exp2_ps(s), _mm256_set1_ps(inv_l)));
  }
}

#else  // portable fallback: the same arithmetic, one key at a time

void tile_probabilities(const float* q, const KeyTile& tile, int count, int64_t hd, float scale2, float m,
                        float inv_l, float* p) {
  for (int t = 0; t < count; ++t) {
    float acc = 0.0f;
    for (int64_t d = 0; d < hd; ++d) acc += q[d] * tile.k[t][d];
    p[t] = std::exp2(acc * scale2 - m) * inv_l;
  }
}

void tile_update(const float* q, const KeyTile& tile, int count, int64_t hd, float scale2, float* o, float& m,
                 float& l) {
  float s[kTileKeys];
  float tmax = kNegInf;
  for (int t = 0; t < count; ++t) {
    float acc = 0.0f;
    for (int64_t d = 0; d < hd; ++d) acc += q[d] * tile.k[t][d];
    s[t] = acc * scale2;
    tmax = std::max(tmax, s[t]);
  }
  const float m_new = std::max(m, tmax);
  const float alpha = m == kNegInf ? 0.0f : std::exp2(m - m_new);
  float sum = 0.0f;
  for (int t = 0; t < count; ++t) sum += s[t] = std::exp2(s[t] - m_new);
  l = l * alpha + sum;
  m = m_new;
  for (int64_t d = 0; d < hd; ++d) {
    float acc = o[d] * alpha;
    for (int t = 0; t < count; ++t) acc += s[t] * tile.v[t][d];
    o[d] = acc;
  }
}

void update_heads(const QueryTile& tile, int64_t i, const KeyTile& kt, int count, int64_t hd, float scale2,
                  const SoftmaxPartial& part) {
  for (int64_t j = 0; j < tile.n_heads; ++j) {
    const int64_t v = i * tile.n_heads + j;
    tile_update(tile.q + i * tile.row_stride + j * tile.head_stride, kt, count, hd, scale2, part.o + v * hd,
                part.m[v], part.l[v]);
  }
}

#endif

}  // namespace

bool attention_tiled_supports(int64_t head_dim) { return head_dim > 0 && head_dim % 8 == 0 && head_dim <= kMaxHeadDim; }

void attention_tiled_partial(const QueryTile& tile, const KvPageRef* pages, int64_t n_pages, int64_t head_dim,
                             float scale, int64_t key_begin, int64_t key_end, const SoftmaxPartial& part) {
  const int64_t nv = tile.n_vectors();
  std::fill(part.o, part.o + nv * head_dim, 0.0f);
  std::fill(part.m, part.m + nv, kNegInf);
  std::fill(part.l, part.l + nv, 0.0f);
  int64_t max_visible = 0;
  for (int64_t i = 0; i < tile.n_rows; ++i) max_visible = std::max<int64_t>(max_visible, tile.n_visible[i]);
  const int64_t end = std::min(key_end, max_visible);
  if (key_begin >= end) return;
  const float scale2 = scale * kLog2e;
  TileWalker walker(pages, n_pages, head_dim, key_begin);
  KeyTile kt;
  while (walker.next(end, kt)) {
    for (int64_t i = 0; i < tile.n_rows; ++i) {
      const int count = int(std::min<int64_t>(kt.count, int64_t(tile.n_visible[i]) - kt.first));
      if (count <= 0) continue;
      update_heads(tile, i, kt, count, head_dim, scale2, part);
    }
  }
}

void attention_merge(const QueryTile& tile, const SoftmaxPartial* parts, int64_t n_parts, int64_t head_dim) {
  for (int64_t i = 0; i < tile.n_rows; ++i)
    for (int64_t j = 0; j < tile.n_heads; ++j) {
      const int64_t v = i * tile.n_heads + j;
      float* out = tile.out + i * tile.out_row_stride + j * tile.out_head_stride;
      float m = kNegInf;
      for (int64_t p = 0; p < n_parts; ++p) m = std::max(m, parts[p].m[v]);
      std::fill(out, out + head_dim, 0.0f);
      if (m == kNegInf) continue;
      float l = 0.0f;
      for (int64_t p = 0; p < n_parts; ++p) {
        if (parts[p].m[v] == kNegInf) continue;
        const float w = std::exp2(parts[p].m[v] - m);
        l += w * parts[p].l[v];
        const float* o = parts[p].o + v * head_dim;
        for (int64_t d = 0; d < head_dim; ++d) out[d] += w * o[d];
      }
      const float inv = 1.0f / l;
      for (int64_t d = 0; d < head_dim; ++d) out[d] *= inv;
    }
}

void attention_key_mass(const QueryTile& tile, const KvPageRef* pages, int64_t n_pages, int64_t head_dim, float scale,
                        const float* m, const float* l, float* mass) {
  int64_t max_visible = 0;
  for (int64_t i = 0; i < tile.n_rows; ++i) max_visible = std::max<int64_t>(max_visible, tile.n_visible[i]);
  const float scale2 = scale * kLog2e;
  TileWalker walker(pages, n_pages, head_dim, 0);
  KeyTile kt;
  alignas(32) float p[kTileKeys];
  while (walker.next(max_visible, kt))
    for (int64_t i = 0; i < tile.n_rows; ++i) {
      const int count = int(std::min<int64_t>(kt.count, int64_t(tile.n_visible[i]) - kt.first));
      if (count <= 0 || !(l[i] > 0.0f)) continue;
      tile_probabilities(tile.q + i * tile.row_stride, kt, count, head_dim, scale2, m[i], 1.0f / l[i], p);
      for (int t = 0; t < count; ++t) mass[kt.first + t] += p[t];
    }
}

void attention_tiled(const QueryTile& tile, const KvPageRef* pages, int64_t n_pages, int64_t head_dim, float scale) {
  thread_local std::vector<float> o, m, l;
  const int64_t nv = tile.n_vectors();
  o.resize(size_t(nv * head_dim));
  m.resize(size_t(nv));
  l.resize(size_t(nv));
  const SoftmaxPartial part{o.data(), m.data(), l.data()};
  attention_tiled_partial(tile, pages, n_pages, head_dim, scale, 0, std::numeric_limits<int32_t>::max(), part);
  attention_merge(tile, &part, 1, head_dim);
}

}  // namespace inferlab::kernels::cpu
