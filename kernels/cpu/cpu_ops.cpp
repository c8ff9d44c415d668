#include "cpu/cpu_ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace inferlab::kernels::cpu {

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
          const int32_t* positions, float theta, bool neox) {
  rope_strided(x, rows, n_heads * head_dim, n_heads, head_dim, rope_dim, positions, theta, neox);
}

void rope_strided(float* x, int64_t rows, int64_t row_stride, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                  const int32_t* positions, float theta, bool neox) {
  const int64_t half = rope_dim / 2;
  // Inverse frequencies: theta^(-2i/rope_dim), computed once per call.
  std::vector<float> inv_freq(static_cast<size_t>(half));
  for (int64_t i = 0; i < half; ++i)
    inv_freq[size_t(i)] = std::pow(theta, -float(2 * i) / float(rope_dim));
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
                float theta, bool neox) {
  (void)head_dim;
  const int64_t half = rope_dim / 2;
  std::vector<float> cs(static_cast<size_t>(2 * half));
  for (int64_t i = 0; i < half; ++i) {
    const float angle = float(delta) * std::pow(theta, -float(2 * i) / float(rope_dim));
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

namespace {
// Y = X * W^T + beta * Y (GEMV for one row).
void matmul_xwt_beta(float* y, const float* x, const float* w, int64_t m, int64_t n, int64_t k, float beta) {
  if (m == 1) {
    cblas_sgemv(CblasRowMajor, CblasNoTrans, int(n), int(k), 1.0f, w, int(k), x, 1, beta, y, 1);
    return;
  }
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, int(m), int(n), int(k), 1.0f, x, int(k), w,
              int(k), beta, y, int(n));
}
}  // namespace

void matmul_xwt(float* y, const float* x, const float* w, int64_t m, int64_t n, int64_t k) {
  matmul_xwt_beta(y, x, w, m, n, k, 0.0f);
}

void matmul_xwt_add(float* y, const float* x, const float* w, int64_t m, int64_t n, int64_t k) {
  matmul_xwt_beta(y, x, w, m, n, k, 1.0f);
}

void matmul_xwt_rows(float* y, const float* x, const float* w, const int32_t* rows, int64_t m, int64_t n_sel,
                     int64_t k) {
#pragma omp parallel for schedule(static) if (n_sel * k > (1 << 16))
  for (int64_t j = 0; j < n_sel; ++j) {
    const float* wr = w + int64_t(rows[j]) * k;
    for (int64_t r = 0; r < m; ++r) y[r * n_sel + j] = cblas_sdot(int(k), x + r * k, 1, wr, 1);
  }
}

void matmul_x_rows(float* y, const float* x, const float* w, const int32_t* rows, int64_t m, int64_t n_sel,
                   int64_t n) {
  // Parallel over output columns in blocks, so each thread owns its slice of y.
  constexpr int64_t kBlock = 256;
  const int64_t n_blocks = (n + kBlock - 1) / kBlock;
#pragma omp parallel for schedule(static) if (n_sel * n > (1 << 16))
  for (int64_t b = 0; b < n_blocks; ++b) {
    const int64_t c0 = b * kBlock, cols = std::min(kBlock, n - c0);
    for (int64_t r = 0; r < m; ++r) {
      float* yr = y + r * n + c0;
      std::fill(yr, yr + cols, 0.0f);
      for (int64_t j = 0; j < n_sel; ++j) cblas_saxpy(int(cols), x[r * n_sel + j], w + int64_t(rows[j]) * n + c0, 1, yr, 1);
    }
  }
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
  std::vector<float> scores;
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
        const float s = dot(qi, pages[p].k + t * head_dim, head_dim) * scale;
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
        axpy(oi, scores[size_t(key + t)] * inv_sum, pages[p].v + t * head_dim, head_dim);
      key += take;
    }
    if (key_mass != nullptr)
      for (int64_t j = 0; j < n_keys; ++j) key_mass[j] += scores[size_t(j)] * inv_sum;
  }
}

int64_t argmax(const float* x, int64_t n) {
  int64_t best = 0;
  for (int64_t i = 1; i < n; ++i)
    if (x[i] > x[best]) best = i;
  return best;
}

}  // namespace inferlab::kernels::cpu
