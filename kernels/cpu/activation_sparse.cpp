#include "cpu/activation_sparse.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace inferlab::kernels::cpu {

namespace {

// y[c0, c1) += xi * w[c0, c1)
inline void axpy(float* y, const float* w, float xi, int64_t c0, int64_t c1) {
  const __m256 s = _mm256_set1_ps(xi);
  int64_t j = c0;
  for (; j + 32 <= c1; j += 32) {
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(s, _mm256_loadu_ps(w + j), _mm256_loadu_ps(y + j)));
    _mm256_storeu_ps(y + j + 8, _mm256_fmadd_ps(s, _mm256_loadu_ps(w + j + 8), _mm256_loadu_ps(y + j + 8)));
    _mm256_storeu_ps(y + j + 16, _mm256_fmadd_ps(s, _mm256_loadu_ps(w + j + 16), _mm256_loadu_ps(y + j + 16)));
    _mm256_storeu_ps(y + j + 24, _mm256_fmadd_ps(s, _mm256_loadu_ps(w + j + 24), _mm256_loadu_ps(y + j + 24)));
  }
  for (; j + 8 <= c1; j += 8)
    _mm256_storeu_ps(y + j, _mm256_fmadd_ps(s, _mm256_loadu_ps(w + j), _mm256_loadu_ps(y + j)));
  for (; j < c1; ++j) y[j] = std::fma(xi, w[j], y[j]);
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), a1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
  float sum = 0;
  for (const float v : lanes) sum += v;
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

}  // namespace

int64_t sparse_input_gemv(float* y, const float* x, const float* wt, int64_t in, int64_t out, float threshold) {
  std::vector<int32_t> kept;
  kept.reserve(size_t(in));
  for (int64_t i = 0; i < in; ++i)
    if (std::fabs(x[i]) > threshold) kept.push_back(int32_t(i));
  const int64_t n_kept = int64_t(kept.size());
  // Each thread a contiguous range of columns (multiples of 8), every kept
  // input row streamed over it in order.
#pragma omp parallel if (n_kept * out >= (1 << 15))
  {
    const int64_t nt = omp_get_num_threads(), t = omp_get_thread_num(), blocks = (out + 7) / 8;
    const int64_t c0 = std::min(out, blocks * t / nt * 8), c1 = std::min(out, blocks * (t + 1) / nt * 8);
    for (int64_t j = c0; j < c1; ++j) y[j] = 0.0f;
    for (const int32_t i : kept) axpy(y, wt + int64_t(i) * out, x[i], c0, c1);
  }
  return in - n_kept;
}

int64_t sparsify(float* dst, const float* x, int64_t count, float threshold) {
  int64_t zeros = 0;
  for (int64_t i = 0; i < count; ++i) {
    const bool zero = std::fabs(x[i]) <= threshold;
    zeros += zero;
    dst[i] = zero ? 0.0f : x[i];
  }
  return zeros;
}

int64_t gated_silu_up(float* act, const float* gate, const float* x, const float* w_up, int64_t n_ff, int64_t in,
                      float threshold) {
  int64_t zeros = 0;
#pragma omp parallel for reduction(+ : zeros) if (n_ff * in >= (1 << 15))
  for (int64_t j = 0; j < n_ff; ++j) {
    const float s = silu(gate[j]);
    if (std::fabs(s) <= threshold) {
      act[j] = 0.0f;
      ++zeros;
    } else {
      act[j] = s * dot(w_up + j * in, x, in);
    }
  }
  return zeros;
}

int64_t gated_silu_mul(float* act, const float* gate, const float* up, int64_t count, float threshold) {
  int64_t zeros = 0;
#pragma omp parallel for reduction(+ : zeros) if (count > 65536)
  for (int64_t i = 0; i < count; ++i) {
    const float s = silu(gate[i]);
    const bool zero = std::fabs(s) <= threshold;
    zeros += zero;
    act[i] = zero ? 0.0f : s * up[i];
  }
  return zeros;
}

}  // namespace inferlab::kernels::cpu
