#include "cpu/cpu_ops.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "cpu/half_convert.h"
#include "cpu/sgemm_tiles.h"

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>
#define INFERLAB_OPS_AVX2 1
#endif

namespace inferlab::kernels::cpu {

void widen_to_float(const void* x, DType dtype, int64_t n, float* out) {
  if (dtype == DType::F32) {
    std::copy_n(static_cast<const float*>(x), n, out);
    return;
  }
  const auto* h = static_cast<const uint16_t*>(x);
  int64_t i = 0;
#if INFERLAB_OPS_AVX2 && defined(__F16C__)
  if (dtype == DType::F16)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i))));
  else
    for (; i + 8 <= n; i += 8) {
      const __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(h + i)));
      _mm256_storeu_ps(out + i, _mm256_castsi256_ps(_mm256_slli_epi32(w, 16)));
    }
#endif
  for (; i < n; ++i) out[i] = dtype == DType::F16 ? f16_to_float(h[i]) : bf16_to_float(h[i]);
}

void bit_plane_encode(const float* x, int64_t head_dim, BitPlanes p, void* record) {
  auto* row = static_cast<uint8_t*>(record);
  std::fill_n(row, bit_plane_row_bytes(head_dim, p), uint8_t{0});
  float amax = 0.0f;
  for (int64_t i = 0; i < head_dim; ++i) amax = std::max(amax, std::fabs(x[i]));
  const int32_t qmax = (1 << (p.bits() - 1)) - 1;
  const float scale = amax / float(qmax);
  std::memcpy(row, &scale, 4);
  const float inv = scale > 0.0f ? 1.0f / scale : 0.0f;
  uint8_t* msb = row + 4;
  uint8_t* lsb = msb + bit_plane_bytes(head_dim, p.msb);
  const auto put = [](uint8_t* plane, int64_t i, int32_t bits, uint32_t value) {
    const int64_t bit = i * bits;
    const int32_t shift = int32_t(bit & 7);
    plane[bit >> 3] = uint8_t(plane[bit >> 3] | (value << shift));
    if (shift + bits > 8) plane[(bit >> 3) + 1] = uint8_t(plane[(bit >> 3) + 1] | (value >> (8 - shift)));
  };
  for (int64_t i = 0; i < head_dim; ++i) {
    const int32_t q = std::clamp(int32_t(std::lrint(x[i] * inv)), -qmax, qmax);
    const auto u = uint32_t(q + qmax + 1);
    put(msb, i, p.msb, u >> p.lsb);
    if (p.lsb > 0) put(lsb, i, p.lsb, u & ((1u << p.lsb) - 1u));
  }
}

namespace {

// The values of a plane of `bits` bits (1..8), 8 at a time: 8 values take
// exactly `bits` bytes, read as one little-endian word (head_dim % 8 == 0).
inline void unpack_plane(const uint8_t* plane, int64_t n, int32_t bits, uint32_t* out) {
  const uint64_t mask = (uint64_t{1} << bits) - 1;
  const int64_t groups = n / 8;
  // Whole 8-byte loads while they stay inside the plane; the last groups byte by byte.
  const int64_t bytes = n * bits / 8;
  const int64_t wide = bytes < 8 ? 0 : std::min(groups, (bytes - 8) / bits + 1);
  for (int64_t g = 0; g < groups; ++g) {
    uint64_t word = 0;
    if (g < wide) {
      std::memcpy(&word, plane + g * bits, 8);
    } else {
      for (int32_t b = 0; b < bits; ++b) word |= uint64_t(plane[g * bits + b]) << (8 * b);
    }
    for (int j = 0; j < 8; ++j) out[g * 8 + j] = uint32_t((word >> (j * bits)) & mask);
  }
}

}  // namespace

void bit_plane_decode(const void* record, int64_t head_dim, BitPlanes p, bool full, float* out) {
  const auto* row = static_cast<const uint8_t*>(record);
  const float scale = bit_plane_scale(row);
  const uint8_t* msb = row + 4;
  const uint8_t* lsb = msb + bit_plane_bytes(head_dim, p.msb);
  const float offset = float(1u << (p.bits() - 1));
  const bool with_lsb = full && p.lsb > 0;
  const float middle = 0.5f * float((1u << p.lsb) - 1u) - offset;  // the middle of each MSB bucket
  if (head_dim % 8 == 0 && head_dim <= 512) {  // word-wise unpacking (the same values as bit_plane_get)
    uint32_t hi[512], lo[512];
    unpack_plane(msb, head_dim, p.msb, hi);
    if (with_lsb) {
      unpack_plane(lsb, head_dim, p.lsb, lo);
      for (int64_t i = 0; i < head_dim; ++i) out[i] = (float((hi[i] << p.lsb) | lo[i]) - offset) * scale;
    } else {
      for (int64_t i = 0; i < head_dim; ++i) out[i] = (float(hi[i] << p.lsb) + middle) * scale;
    }
    return;
  }
  for (int64_t i = 0; i < head_dim; ++i) out[i] = bit_plane_value(row, head_dim, p, i, full);  // other head sizes
}

const float* kv_row_f32(const KvPageRef& page, bool value, int64_t t, int64_t head_dim, float* scratch) {
  const void* base = value ? page.v : page.k;
  if (page.planes.active()) {
    bit_plane_decode(static_cast<const uint8_t*>(base) + t * bit_plane_row_bytes(head_dim, page.planes), head_dim,
                     page.planes, page.lsb, scratch);
    return scratch;
  }
  if (page.dtype == DType::F32) return static_cast<const float*>(base) + t * head_dim;
  widen_to_float(static_cast<const uint16_t*>(base) + t * head_dim, page.dtype, head_dim, scratch);
  return scratch;
}

void load_kv_rows(const KvPageRef& page, bool value, int64_t t0, int64_t n, int64_t head_dim, float* out) {
  const void* base = value ? page.v : page.k;
  if (page.planes.active()) {
    const int64_t rb = bit_plane_row_bytes(head_dim, page.planes);
    for (int64_t t = 0; t < n; ++t)
      bit_plane_decode(static_cast<const uint8_t*>(base) + (t0 + t) * rb, head_dim, page.planes, page.lsb,
                       out + t * head_dim);
    return;
  }
  const int64_t eb = dtype_bytes(page.dtype);
  widen_to_float(static_cast<const char*>(base) + t0 * head_dim * eb, page.dtype, n * head_dim, out);
}

void rmsnorm(float* out, const float* x, const float* weight, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for if (rows > 4)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    float* outr = out + r * n;
    double sum_sq = 0.0;
    for (int64_t i = 0; i < n; ++i) sum_sq += double(xr[i]) * double(xr[i]);
    const float inv = 1.0f / std::sqrt(float(sum_sq / double(n)) + eps);
    for (int64_t i = 0; i < n; ++i) outr[i] = xr[i] * inv * weight[i];
  }
}

void rope(float* x, int64_t rows, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
          const int32_t* positions, float theta, bool neox, const RopeScaling& scaling) {
  rope_strided(x, rows, n_heads * head_dim, n_heads, head_dim, rope_dim, positions, theta, neox, scaling);
}

void rope_strided(float* x, int64_t rows, int64_t row_stride, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                  const int32_t* positions, float theta, bool neox, const RopeScaling& scaling) {
  const int64_t half = rope_dim / 2;
  // Inverse frequencies: theta^(-2i/rope_dim) (scaled), computed once per call.
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i) inv_freq[size_t(i)] = rope_inv_freq(i, rope_dim, theta, scaling);
#pragma omp parallel for if (rows > 4)
  for (int64_t r = 0; r < rows; ++r) {
    const float pos = float(positions[r]);
    for (int64_t i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[size_t(i)];
      const float c = std::cos(angle), s = std::sin(angle);
      for (int64_t h = 0; h < n_heads; ++h) {
        float* head = x + r * row_stride + h * head_dim;
        const int64_t a = neox ? i : 2 * i;
        const int64_t b = neox ? i + half : 2 * i + 1;
        const float x0 = head[a], x1 = head[b];
        head[a] = x0 * c - x1 * s;
        head[b] = x0 * s + x1 * c;
      }
    }
  }
}

void rope_shift(float* x, int64_t rows, int64_t row_stride, int64_t head_dim, int64_t rope_dim, int32_t delta,
                float theta, bool neox, const RopeScaling& scaling) {
  (void)head_dim;
  const int64_t half = rope_dim / 2;
  std::vector<float> cs(static_cast<size_t>(2 * half));
  for (int64_t i = 0; i < half; ++i) {
    const float angle = float(delta) * rope_inv_freq(i, rope_dim, theta, scaling);
    cs[size_t(2 * i)] = std::cos(angle);
    cs[size_t(2 * i + 1)] = std::sin(angle);
  }
  for (int64_t r = 0; r < rows; ++r) {
    float* head = x + r * row_stride;
    for (int64_t i = 0; i < half; ++i) {
      const int64_t a = neox ? i : 2 * i, b = neox ? i + half : 2 * i + 1;
      const float c = cs[size_t(2 * i)], s = cs[size_t(2 * i + 1)], x0 = head[a], x1 = head[b];
      head[a] = x0 * c - x1 * s;
      head[b] = x0 * s + x1 * c;
    }
  }
}

void silu_mul(float* gate, const float* up, int64_t rows, int64_t n) {
  const int64_t total = rows * n;
#pragma omp parallel for if (total > 65536)
  for (int64_t i = 0; i < total; ++i) {
    const float g = gate[i];
    gate[i] = g / (1.0f + std::exp(-g)) * up[i];
  }
}

void add_inplace(float* y, const float* x, int64_t rows, int64_t n) {
  const int64_t total = rows * n;
#pragma omp parallel for if (total > 65536)
  for (int64_t i = 0; i < total; ++i) y[i] += x[i];
}

void add_row_bias(float* y, const float* bias, int64_t rows, int64_t n) {
#pragma omp parallel for if (rows * n > 65536)
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < n; ++j) y[i * n + j] += bias[j];
}

namespace {
// Y = X * W^T + beta * Y (GEMV for one row).
#if INFERLAB_OPS_AVX2
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// Rows [r0, r1) of y = W x + beta y, one row at a time with four accumulators:
// W is read as one sequential stream, which the hardware prefetcher follows at
// close to the memory bandwidth (four rows interleaved, 2-6 KiB apart, ran
// about 20% slower in decode on the 2-core EPYC VM). With m rows of x (a
// decode step of several sequences), each row of W is read from memory once
// and dotted with every x row from L1: every row's sums are those of the
// one-row product, bit for bit, while W's traffic is paid once.
// IB rows of x against one row of W, each row's four accumulators exactly
// as the one-row product sums (so its result is the same bit for bit): W's
// chunk is loaded once and fed to IB rows (12 accumulators at IB = 3).
template <int IB>
inline void dot_rows(float* y, int64_t ldy, const float* x, int64_t k, const float* wr, float beta) {
  __m256 a[IB][4];
  for (int i = 0; i < IB; ++i) a[i][0] = a[i][1] = a[i][2] = a[i][3] = _mm256_setzero_ps();
  int64_t d = 0;
  for (; d + 32 <= k; d += 32)
    for (int j = 0; j < 4; ++j) {
      const __m256 wv = _mm256_loadu_ps(wr + d + 8 * j);
      for (int i = 0; i < IB; ++i) a[i][j] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * k + d + 8 * j), a[i][j]);
    }
  for (; d < k; d += 8) {
    const __m256 wv = _mm256_loadu_ps(wr + d);
    for (int i = 0; i < IB; ++i) a[i][0] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x + i * k + d), a[i][0]);
  }
  for (int i = 0; i < IB; ++i) {
    const float v = hsum(_mm256_add_ps(_mm256_add_ps(a[i][0], a[i][1]), _mm256_add_ps(a[i][2], a[i][3])));
    float& out = y[i * ldy];
    out = beta == 0.0f ? v : v + beta * out;
  }
}

void gemv_slice(float* y, const float* x, const float* w, int64_t r0, int64_t r1, int64_t k, float beta, int64_t m,
                int64_t n) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = w + r * k;
    int64_t i = 0;
    for (; i + 3 <= m; i += 3) dot_rows<3>(y + i * n + r, n, x + i * k, k, wr, beta);
    if (m - i == 2) dot_rows<2>(y + i * n + r, n, x + i * k, k, wr, beta);
    if (m - i == 1) dot_rows<1>(y + i * n + r, n, x + i * k, k, wr, beta);
  }
}

__attribute__((target("avx512f,avx512dq"))) inline float hsum512(__m512 v) {
  return hsum(_mm256_add_ps(_mm512_extractf32x8_ps(v, 0), _mm512_extractf32x8_ps(v, 1)));
}

// The same with 512-bit vectors, k % 16 == 0, for CPUs that have them (chosen
// at run time; the build targets AVX2): decode streams W ~7% faster on Zen 4.
template <int IB>
__attribute__((target("avx512f,avx512dq"))) inline void dot_rows_512(float* y, int64_t ldy, const float* x, int64_t k,
                                                                    const float* wr, float beta) {
  __m512 a[IB][4];
  for (int i = 0; i < IB; ++i) a[i][0] = a[i][1] = a[i][2] = a[i][3] = _mm512_setzero_ps();
  int64_t d = 0;
  for (; d + 64 <= k; d += 64)
    for (int j = 0; j < 4; ++j) {
      const __m512 wv = _mm512_loadu_ps(wr + d + 16 * j);
      for (int i = 0; i < IB; ++i) a[i][j] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + i * k + d + 16 * j), a[i][j]);
    }
  for (; d < k; d += 16) {
    const __m512 wv = _mm512_loadu_ps(wr + d);
    for (int i = 0; i < IB; ++i) a[i][0] = _mm512_fmadd_ps(wv, _mm512_loadu_ps(x + i * k + d), a[i][0]);
  }
  for (int i = 0; i < IB; ++i) {
    const float v = hsum512(_mm512_add_ps(_mm512_add_ps(a[i][0], a[i][1]), _mm512_add_ps(a[i][2], a[i][3])));
    float& out = y[i * ldy];
    out = beta == 0.0f ? v : v + beta * out;
  }
}

// One row of x is dot_rows_512<1>; more rows go three at a time (24 of the 32
// registers), each row's sums those of the one-row product.
__attribute__((target("avx512f,avx512dq"))) void gemv_slice_512(float* y, const float* x, const float* w, int64_t r0,
                                                       int64_t r1, int64_t k, float beta, int64_t m, int64_t n) {
  for (int64_t r = r0; r < r1; ++r) {
    const float* wr = w + r * k;
    int64_t i = 0;
    for (; i + 3 <= m; i += 3) dot_rows_512<3>(y + i * n + r, n, x + i * k, k, wr, beta);
    if (m - i == 2) dot_rows_512<2>(y + i * n + r, n, x + i * k, k, wr, beta);
    if (m - i == 1) dot_rows_512<1>(y + i * n + r, n, x + i * k, k, wr, beta);
  }
}

const bool kHaveAvx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq");

// One row of activations against several matrices, k % 8 == 0: the matrices'
// rows as one list, each thread a contiguous slice of it (groups of four rows),
// one fork and join. Decode is bound by reading W; this streams it a few GB/s
// faster than OpenBLAS's sgemv on the small matrices of a layer.
void gemv_targets(const GemvTarget* targets, int count, const float* x, int64_t m, int64_t k, float beta) {
  std::vector<int64_t> first(size_t(count) + 1, 0);
  for (int i = 0; i < count; ++i) first[size_t(i) + 1] = first[size_t(i)] + (targets[i].n + 3) / 4;
  const int64_t groups = first[size_t(count)];
#pragma omp parallel if (groups * 4 * k * m >= (1 << 16))
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t g0 = groups * t / nt, g1 = groups * (t + 1) / nt;
    for (int i = 0; i < count; ++i) {
      const int64_t lo = std::max(g0, first[size_t(i)]), hi = std::min(g1, first[size_t(i) + 1]);
      if (lo >= hi) continue;
      const int64_t r0 = (lo - first[size_t(i)]) * 4, r1 = std::min(targets[i].n, (hi - first[size_t(i)]) * 4);
      if (kHaveAvx512 && k % 16 == 0) gemv_slice_512(targets[i].y, x, targets[i].w, r0, r1, k, beta, m, targets[i].n);
      else gemv_slice(targets[i].y, x, targets[i].w, r0, r1, k, beta, m, targets[i].n);
    }
  }
}
#endif

void matmul_xwt_beta(float* y, const float* x, const float* w, int64_t m, int64_t n, int64_t k, float beta) {
#if INFERLAB_OPS_AVX2
  if (m >= 1 && m <= kGemvMaxRows && k % 8 == 0) {
    const GemvTarget one{y, w, n};
    return gemv_targets(&one, 1, x, m, k, beta);
  }
#endif
  sgemm_tiles(true, m, n, k, 1.0f, x, k, w, k, beta, y, n);
}
}  // namespace

void matmul_xwt(float* y, const float* x, const float* w, int64_t m, int64_t n, int64_t k) {
  matmul_xwt_beta(y, x, w, m, n, k, 0.0f);
}

void matmul_xwt_add(float* y, const float* x, const float* w, int64_t m, int64_t n, int64_t k) {
  matmul_xwt_beta(y, x, w, m, n, k, 1.0f);
}

void gemv_group(const GemvTarget* targets, int count, const float* x, int64_t m, int64_t k) {
#if INFERLAB_OPS_AVX2
  if (k % 8 == 0 && m <= kGemvMaxRows) return gemv_targets(targets, count, x, m, k, 0.0f);
#endif
  for (int i = 0; i < count; ++i) matmul_xwt(targets[i].y, x, targets[i].w, m, targets[i].n, k);
}

void matmul_xwt_rows(float* y, const float* x, const float* w, const int32_t* rows, int64_t m, int64_t n_sel,
                     int64_t k) {
  if (m > 1) {  // many rows: the selected rows gathered once, then one GEMM
    thread_local std::vector<float> picked;
    picked.resize(size_t(n_sel * k));
    for (int64_t j = 0; j < n_sel; ++j)
      std::copy(w + int64_t(rows[j]) * k, w + int64_t(rows[j] + 1) * k, picked.begin() + j * k);
    matmul_xwt(y, x, picked.data(), m, n_sel, k);
    return;
  }
#pragma omp parallel for schedule(static) if (n_sel * k > (1 << 16))
  for (int64_t j = 0; j < n_sel; ++j) y[j] = cblas_sdot(int(k), x, 1, w + int64_t(rows[j]) * k, 1);
}
void matmul_x_rows(float* y, const float* x, const float* w, const int32_t* rows, int64_t m, int64_t n_sel,
                   int64_t n) {
  // The selected rows gathered once, then one GEMM (one row: gather_rows_gemv reads them in place).
  thread_local std::vector<float> picked;
  picked.resize(size_t(n_sel * n));
  for (int64_t j = 0; j < n_sel; ++j)
    std::copy(w + int64_t(rows[j]) * n, w + int64_t(rows[j] + 1) * n, picked.begin() + j * n);
  if (n_sel == 0) {
    std::fill(y, y + m * n, 0.0f);
    return;
  }
  sgemm_tiles(false, m, n, n_sel, 1.0f, x, n_sel, picked.data(), n, 0.0f, y, n);
}

namespace {

float dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

void axpy(float* y, float alpha, const float* x, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += alpha * x[i];
}

}  // namespace

void attention_paged(const float* q, int64_t n_q, int64_t q_stride, const KvPageRef* pages,
                     int64_t n_pages, const int32_t* n_visible, int64_t head_dim, float scale,
                     float* out, int64_t out_stride, float* key_mass) {
  // Two passes per query row over a row buffer of scores: (n_visible) floats,
  // never an (n_q, n_keys) matrix.
  std::vector<float> scores, row(static_cast<size_t>(head_dim));
  for (int64_t i = 0; i < n_q; ++i) {
    const float* qi = q + i * q_stride;
    float* oi = out + i * out_stride;
    const int64_t visible = n_visible[i];
    std::fill(oi, oi + head_dim, 0.0f);
    if (visible <= 0) continue;
    scores.resize(size_t(visible));
    float max_score = -std::numeric_limits<float>::infinity();
    int64_t key = 0;
    for (int64_t p = 0; p < n_pages && key < visible; ++p) {
      const int64_t take = std::min<int64_t>(pages[p].n_tokens, visible - key);
      for (int64_t t = 0; t < take; ++t) {
        const float s = dot(qi, kv_row_f32(pages[p], false, t, head_dim, row.data()), head_dim) * scale;
        scores[size_t(key + t)] = s;
        max_score = std::max(max_score, s);
      }
      key += take;
    }
    const int64_t n_keys = key;
    float sum = 0.0f;
    for (int64_t j = 0; j < n_keys; ++j) {
      const float e = std::exp(scores[size_t(j)] - max_score);
      scores[size_t(j)] = e;
      sum += e;
    }
    const float inv_sum = 1.0f / sum;
    key = 0;
    for (int64_t p = 0; p < n_pages && key < n_keys; ++p) {
      const int64_t take = std::min<int64_t>(pages[p].n_tokens, n_keys - key);
      for (int64_t t = 0; t < take; ++t)
        axpy(oi, scores[size_t(key + t)] * inv_sum, kv_row_f32(pages[p], true, t, head_dim, row.data()), head_dim);
      key += take;
    }
    if (key_mass != nullptr)
      for (int64_t j = 0; j < n_keys; ++j) key_mass[j] += scores[size_t(j)] * inv_sum;
  }
}

int64_t attention_row_value_topk(const float* q, const KvPageRef* pages, int64_t n_pages, int64_t n_visible,
                                 int64_t head_dim, float scale, double keep, bool renormalize, float* out,
                                 float* probs, uint8_t* kept) {
  std::fill(out, out + head_dim, 0.0f);
  if (n_visible <= 0) return 0;
  std::vector<float> row(static_cast<size_t>(head_dim));
  // Every visible key's score, then its probability.
  float max_score = -std::numeric_limits<float>::infinity();
  std::vector<std::pair<int64_t, int64_t>> where;  // (page, slot) of each key
  where.reserve(size_t(n_visible));
  for (int64_t p = 0, key = 0; p < n_pages && key < n_visible; ++p)
    for (int64_t t = 0; t < pages[p].n_tokens && key < n_visible; ++t, ++key) {
      probs[key] = dot(q, kv_row_f32(pages[p], false, t, head_dim, row.data()), head_dim) * scale;
      max_score = std::max(max_score, probs[key]);
      where.emplace_back(p, t);
    }
  const int64_t n = int64_t(where.size());
  float sum = 0.0f;
  for (int64_t j = 0; j < n; ++j) sum += probs[j] = std::exp(probs[j] - max_score);
  const float inv_sum = 1.0f / sum;
  for (int64_t j = 0; j < n; ++j) probs[j] *= inv_sum;
  // The k most probable, ties to the earlier key.
  const int64_t k = std::clamp<int64_t>(int64_t(std::ceil(keep * double(n))), 1, n);
  std::vector<int64_t> order(static_cast<size_t>(n));
  for (int64_t j = 0; j < n; ++j) order[size_t(j)] = j;
  std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), [&](int64_t a, int64_t b) {
    return probs[a] > probs[b] || (probs[a] == probs[b] && a < b);
  });
  std::vector<uint8_t> mark(static_cast<size_t>(n), 0);
  float kept_sum = 0.0f;
  for (int64_t i = 0; i < k; ++i) mark[size_t(order[size_t(i)])] = 1;
  for (int64_t j = 0; j < n; ++j)
    if (mark[size_t(j)] != 0) kept_sum += probs[j];
  const float scale_kept = renormalize && kept_sum > 0.0f ? 1.0f / kept_sum : 1.0f;
  for (int64_t j = 0; j < n; ++j) {
    if (kept != nullptr) kept[j] = mark[size_t(j)];
    if (mark[size_t(j)] == 0) continue;
    const auto [p, t] = where[size_t(j)];
    axpy(out, probs[j] * scale_kept, kv_row_f32(pages[p], true, t, head_dim, row.data()), head_dim);
  }
  return k;
}

int64_t argmax(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

}  // namespace inferlab::kernels::cpu
