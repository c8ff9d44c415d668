// Quantized-weight products (see quant_matmul.h). The integer path follows
// ggml's arithmetic block for block: per 32 values an exact integer dot,
// scaled by d_w * d_x in float (plus m_w * s_x for Q4_1), so results match
// llama.cpp's up to the order of float summation.
#include "cpu/quant_matmul.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstring>

#include "cpu/half_convert.h"
#include "cpu/sgemm_tiles.h"

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif
#if defined(__AVX2__) && defined(__FMA__)
#define INFERLAB_QUANT_AVX2 1
#endif

namespace inferlab::kernels::cpu {
namespace {

constexpr int64_t QK = kQuantBlock;
constexpr int64_t kParallelMinWork = 1 << 16;  // weight values below which one thread does it all

constexpr int64_t block_bytes(QuantType t) { return t == QuantType::Q4_0 ? 18 : t == QuantType::Q4_1 ? 20 : 34; }

inline float load_f16(const uint8_t* p) {
  uint16_t h;
  std::memcpy(&h, p, sizeof h);
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  return f16_to_float(h);
#endif
}

inline float round_f16(float v) { return f16_to_float(float_to_f16(v)); }

// Activations quantized per block, ggml's quantize_row_q8_{0,1}_ref: d = amax / 127,
// q = roundf(x / d); scales kept as floats already rounded through fp16.
struct QuantActs {
  const int8_t* qs;  // (m, k)
  const float* d;    // (m, nb)
  const float* s;    // (m, nb): fp16(d * sum(q)), for Q8_1
  int64_t k, nb;
};

QuantActs quantize_acts(const float* x, int64_t m, int64_t k, std::vector<uint8_t>& buf) {
  const int64_t nb = k / QK;
  buf.resize(size_t(m * k + 2 * m * nb * int64_t(sizeof(float))));
  auto* qs = reinterpret_cast<int8_t*>(buf.data());
  auto* d = reinterpret_cast<float*>(buf.data() + m * k);  // m * k % 32 == 0: aligned
  float* s = d + m * nb;
  for (int64_t b = 0; b < m * nb; ++b) {
    const float* xb = x + b * QK;
    float amax = 0.0f;
    for (int64_t j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(xb[j]));
    const float db = amax / 127.0f, id = db != 0.0f ? 1.0f / db : 0.0f;
    int sum = 0;
    for (int64_t j = 0; j < QK; ++j) {
      const int q = int(std::round(xb[j] * id));
      qs[b * QK + j] = int8_t(q);
      sum += q;
    }
    d[b] = round_f16(db);
    s[b] = round_f16(db * float(sum));
  }
  return {qs, d, s, k, nb};
}

#if defined(INFERLAB_QUANT_AVX2)
inline float hsum(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}

// 32 nibbles as bytes 0..15 in value order: low nibbles, then high nibbles.
inline __m256i unpack_nibbles(const uint8_t* p) {
  const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(raw, 4), raw), _mm256_set1_epi8(0x0f));
}
#endif

// y[(i0 + i) * ldy + r] = row r of the R weight rows at w (stride row_bytes) . activation
// row i0 + i, for r < R, i < M: each weight block is unpacked once for all M rows,
// each activation block loaded once for all R rows.
template <QuantType T, int R, int M>
void dot_tile(const uint8_t* w, int64_t row_bytes, const QuantActs& a, int64_t i0, float* y, int64_t ldy) {
  constexpr int64_t BB = block_bytes(T);
#if defined(INFERLAB_QUANT_AVX2)
  // Small tiles alternate blocks between U sets of accumulators: one FMA chain
  // per output would leave its 4-cycle latency exposed.
  constexpr int U = R * M <= 2 ? 2 : 1;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256 acc[U][R][M];
  float summ[U][R][M] = {};  // Q4_1: sum of m_w * s_x
  for (int u = 0; u < U; ++u)
    for (int r = 0; r < R; ++r)
      for (int i = 0; i < M; ++i) acc[u][r][i] = _mm256_setzero_ps();
  auto block = [&](int64_t b, __m256 (&ac)[R][M], float (&sm)[R][M]) {
    __m256i qy[M], bias[M];
    float dy[M];
    for (int i = 0; i < M; ++i) {
      qy[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a.qs + (i0 + i) * a.k + b * QK));
      dy[i] = a.d[(i0 + i) * a.nb + b];
      // Q4_0 dots unsigned nibbles (maddubs wants one unsigned side) and takes off
      // 8 * sum(q_x), lane by lane, so the int32 lanes equal sum((q_w - 8) * q_x).
      if constexpr (T == QuantType::Q4_0)
        bias[i] = _mm256_madd_epi16(_mm256_maddubs_epi16(_mm256_set1_epi8(8), qy[i]), ones);
    }
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * row_bytes + b * BB;
      const float dw = load_f16(blk);
      __m256i qx, ax = _mm256_setzero_si256();
      if constexpr (T == QuantType::Q8_0) {
        qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(blk + 2));
        ax = _mm256_sign_epi8(qx, qx);  // |q_w|; q_x takes q_w's sign instead
      } else {
        qx = unpack_nibbles(blk + (T == QuantType::Q4_1 ? 4 : 2));
      }
      for (int i = 0; i < M; ++i) {
        __m256i p;
        if constexpr (T == QuantType::Q8_0) {
          p = _mm256_madd_epi16(_mm256_maddubs_epi16(ax, _mm256_sign_epi8(qy[i], qx)), ones);
        } else {
          p = _mm256_madd_epi16(_mm256_maddubs_epi16(qx, qy[i]), ones);
          if constexpr (T == QuantType::Q4_0) p = _mm256_sub_epi32(p, bias[i]);
        }
        ac[r][i] = _mm256_fmadd_ps(_mm256_set1_ps(dw * dy[i]), _mm256_cvtepi32_ps(p), ac[r][i]);
        if constexpr (T == QuantType::Q4_1) sm[r][i] += load_f16(blk + 2) * a.s[(i0 + i) * a.nb + b];
      }
    }
  };
  int64_t b = 0;
  for (; b + U <= a.nb; b += U)
    for (int u = 0; u < U; ++u) block(b + u, acc[u], summ[u]);
  for (; b < a.nb; ++b) block(b, acc[0], summ[0]);
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) {
      __m256 v = acc[0][r][i];
      float sm = summ[0][r][i];
      for (int u = 1; u < U; ++u) v = _mm256_add_ps(v, acc[u][r][i]), sm += summ[u][r][i];
      y[(i0 + i) * ldy + r] = hsum(v) + sm;
    }
#else
  // Scalar reference of the same arithmetic.
  float acc[R][M] = {}, summ[R][M] = {};
  for (int64_t b = 0; b < a.nb; ++b) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* blk = w + r * row_bytes + b * BB;
      const float dw = load_f16(blk);
      int qw[QK];
      for (int j = 0; j < 16; ++j) {
        if constexpr (T == QuantType::Q8_0) {
          qw[j] = int8_t(blk[2 + j]), qw[j + 16] = int8_t(blk[18 + j]);
        } else {
          const uint8_t v = blk[(T == QuantType::Q4_1 ? 4 : 2) + j];
          const int off = T == QuantType::Q4_0 ? 8 : 0;
          qw[j] = (v & 15) - off, qw[j + 16] = (v >> 4) - off;
        }
      }
      for (int i = 0; i < M; ++i) {
        const int8_t* qy = a.qs + (i0 + i) * a.k + b * QK;
        int isum = 0;
        for (int j = 0; j < QK; ++j) isum += qw[j] * qy[j];
        acc[r][i] += dw * a.d[(i0 + i) * a.nb + b] * float(isum);
        if constexpr (T == QuantType::Q4_1) summ[r][i] += load_f16(blk + 2) * a.s[(i0 + i) * a.nb + b];
      }
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < M; ++i) y[(i0 + i) * ldy + r] = acc[r][i] + summ[r][i];
#endif
}

// Weight rows per tile. Q4 tiles of 4 (2 for batches) share each activation block
// and hide latency; Q8_0 streams one row at a time, as several interleaved Q8_0
// row streams ran ~3x slower once W left the cache (measured, Zen; 34-byte blocks).
constexpr int tile_rows(QuantType t, int64_t m) { return t == QuantType::Q8_0 ? 1 : m == 1 ? 4 : 2; }

// Output rows [r0, r1) for all m activation rows: R weight rows at a time, the
// activations two at a time when there are several (they stay in L1).
template <QuantType T, int R>
void integer_rows(float* y, const QuantActs& a, const QuantMatrixRef& w, int64_t m, int64_t r0, int64_t r1) {
  const int64_t rb = w.row_bytes();
  auto tile = [&]<int TR>(int64_t r) {
    const uint8_t* wr = w.data + r * rb;
    int64_t i = 0;
    for (; i + 2 <= m; i += 2) dot_tile<T, TR, 2>(wr, rb, a, i, y + r, w.rows);
    for (; i < m; ++i) dot_tile<T, TR, 1>(wr, rb, a, i, y + r, w.rows);
  };
  int64_t r = r0;
  for (; r + R <= r1; r += R) tile.template operator()<R>(r);
  for (; r < r1; ++r) tile.template operator()<1>(r);
}

// Output rows [r0, r1) of w, whatever its type.
void integer_rows_any(float* y, const QuantActs& a, const QuantMatrixRef& w, int64_t m, int64_t r0, int64_t r1) {
  auto run = [&]<QuantType T>() {
    if (tile_rows(T, m) == 4) integer_rows<T, 4>(y, a, w, m, r0, r1);
    else if (tile_rows(T, m) == 2) integer_rows<T, 2>(y, a, w, m, r0, r1);
    else integer_rows<T, 1>(y, a, w, m, r0, r1);
  };
  switch (w.type) {
    case QuantType::Q4_0: return run.template operator()<QuantType::Q4_0>();
    case QuantType::Q4_1: return run.template operator()<QuantType::Q4_1>();
    case QuantType::Q8_0: return run.template operator()<QuantType::Q8_0>();
  }
}

// The targets' output rows as one list cut into equal contiguous slices, one
// per thread, in groups of G rows (a multiple of every tile): one fork and join
// for several matrices that read the same activations (Q, K, V; gate, up).
void integer_group(const QuantTarget* targets, int count, const float* x, int64_t m, QuantScratch& scratch) {
  const QuantActs a = quantize_acts(x, m, targets[0].w.cols, scratch.activations);
  constexpr int64_t G = 4;
  std::vector<int64_t> first(size_t(count) + 1, 0);  // first group of each target
  int64_t work = 0;
  for (int i = 0; i < count; ++i) {
    first[size_t(i) + 1] = first[size_t(i)] + (targets[i].w.rows + G - 1) / G;
    work += targets[i].w.rows * targets[i].w.cols;
  }
  const int64_t groups = first[size_t(count)];
#pragma omp parallel if (work >= kParallelMinWork)
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num();
    const int64_t g0 = groups * t / nt, g1 = groups * (t + 1) / nt;
    for (int i = 0; i < count; ++i) {
      const int64_t lo = std::max(g0, first[size_t(i)]), hi = std::min(g1, first[size_t(i) + 1]);
      if (lo >= hi) continue;
      const QuantMatrixRef& w = targets[i].w;
      const int64_t r0 = (lo - first[size_t(i)]) * G, r1 = std::min(w.rows, (hi - first[size_t(i)]) * G);
      integer_rows_any(targets[i].y, a, w, m, r0, r1);
    }
  }
}

template <QuantType T>
void dequant_row(const uint8_t* row, int64_t nb, float* out) {
  constexpr int64_t BB = block_bytes(T);
  for (int64_t b = 0; b < nb; ++b, row += BB, out += QK) {
    const float d = load_f16(row);
#if defined(INFERLAB_QUANT_AVX2)
    const __m256 vd = _mm256_set1_ps(d);
    if constexpr (T == QuantType::Q8_0) {
      for (int j = 0; j < 32; j += 8) {
        const __m256i q = _mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(row + 2 + j)));
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_cvtepi32_ps(q), vd));
      }
    } else {
      alignas(32) uint8_t q[32];
      _mm256_store_si256(reinterpret_cast<__m256i*>(q), unpack_nibbles(row + (T == QuantType::Q4_1 ? 4 : 2)));
      const __m256 vm = _mm256_set1_ps(T == QuantType::Q4_1 ? load_f16(row + 2) : 0.0f);
      for (int j = 0; j < 32; j += 8) {
        __m256i qi = _mm256_cvtepu8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(q + j)));
        if constexpr (T == QuantType::Q4_0) qi = _mm256_sub_epi32(qi, _mm256_set1_epi32(8));
        __m256 v = _mm256_mul_ps(_mm256_cvtepi32_ps(qi), vd);
        if constexpr (T == QuantType::Q4_1) v = _mm256_add_ps(v, vm);
        _mm256_storeu_ps(out + j, v);
      }
    }
#else
    if constexpr (T == QuantType::Q8_0) {
      for (int j = 0; j < 32; ++j) out[j] = float(int8_t(row[2 + j])) * d;
    } else {
      const uint8_t* qs = row + (T == QuantType::Q4_1 ? 4 : 2);
      const float m = T == QuantType::Q4_1 ? load_f16(row + 2) : 0.0f;
      const int off = T == QuantType::Q4_0 ? 8 : 0;
      for (int j = 0; j < 16; ++j) {
        float lo = float((qs[j] & 15) - off) * d, hi = float((qs[j] >> 4) - off) * d;
        if constexpr (T == QuantType::Q4_1) lo += m, hi += m;
        out[j] = lo, out[j + 16] = hi;
      }
    }
#endif
  }
}

void dequant_rows(const QuantMatrixRef& w, int64_t r0, int64_t count, float* out) {
  const int64_t rb = w.row_bytes(), nb = w.cols / QK;
  auto run = [&](auto fn) {
#pragma omp parallel for schedule(static) if (count * w.cols >= kParallelMinWork)
    for (int64_t r = 0; r < count; ++r) fn(w.data + (r0 + r) * rb, nb, out + r * w.cols);
  };
  switch (w.type) {
    case QuantType::Q4_0: return run(dequant_row<QuantType::Q4_0>);
    case QuantType::Q4_1: return run(dequant_row<QuantType::Q4_1>);
    case QuantType::Q8_0: return run(dequant_row<QuantType::Q8_0>);
  }
}

}  // namespace

int64_t quant_block_bytes(QuantType type) { return block_bytes(type); }

void quant_dequantize_rows(const QuantMatrixRef& w, int64_t r0, int64_t count, float* out) {
  if (count > 0) dequant_rows(w, r0, count, out);
}

void quant_matmul_xwt(float* y, const float* x, const QuantMatrixRef& w, int64_t m, QuantScratch& scratch) {
  const int64_t n = w.rows, k = w.cols;
  if (m <= 0 || n <= 0) return;
  if (m <= kQuantMatmulMaxIntegerRows) {
    const QuantTarget one{y, w};
    return integer_group(&one, 1, x, m, scratch);
  }
  // Prefill: dequantize a few MiB of rows at a time (bounded scratch, still in
  // L3 when sgemm packs them) and multiply into the matching columns of y.
  const int64_t chunk = std::min(n, std::max<int64_t>(64, (int64_t(1) << 20) / k));
  scratch.dequant.resize(size_t(chunk * k));
  for (int64_t r0 = 0; r0 < n; r0 += chunk) {
    const int64_t rows = std::min(chunk, n - r0);
    dequant_rows(w, r0, rows, scratch.dequant.data());
    sgemm_tiles(true, m, rows, k, 1.0f, x, k, scratch.dequant.data(), k, 0.0f, y + r0, n);
  }
}

void quant_matmul_group(const QuantTarget* targets, int count, const float* x, int64_t m, QuantScratch& scratch) {
  if (count <= 0 || m <= 0) return;
  if (m <= kQuantMatmulMaxIntegerRows) return integer_group(targets, count, x, m, scratch);
  for (int i = 0; i < count; ++i) quant_matmul_xwt(targets[i].y, x, targets[i].w, m, scratch);
}

}  // namespace inferlab::kernels::cpu
