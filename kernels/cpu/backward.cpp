#include "backward.h"

#include "cpu_ops.h"

#include <cblas.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace inferlab::kernels::cpu {

void rmsnorm_inverse(float* inv, const float* x, int64_t rows, int64_t n, float eps) {
#pragma omp parallel for if (rows > 4)
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * n;
    double sum_sq = 0.0;
    for (int64_t i = 0; i < n; ++i) sum_sq += double(xr[i]) * double(xr[i]);
    inv[r] = 1.0f / std::sqrt(float(sum_sq / double(n)) + eps);
  }
}

void rmsnorm_backward(float* dx, const float* dy, const float* x, const float* inv, const float* weight,
                      int64_t rows, int64_t n, bool accumulate) {
#pragma omp parallel for if (rows > 4)
  for (int64_t r = 0; r < rows; ++r) {
    const float* dyr = dy + r * n;
    const float* xr = x + r * n;
    float* dxr = dx + r * n;
    double dot = 0.0;
    for (int64_t i = 0; i < n; ++i) dot += double(dyr[i]) * double(weight[i]) * double(xr[i]);
    const float s = inv[r];
    const float c = float(double(s) * double(s) * double(s) * dot / double(n));
    for (int64_t i = 0; i < n; ++i) {
      const float g = s * dyr[i] * weight[i] - xr[i] * c;
      dxr[i] = accumulate ? dxr[i] + g : g;
    }
  }
}

void rope_backward(float* dx, int64_t rows, int64_t row_stride, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                   const int32_t* positions, float theta, bool neox, const RopeScaling& scaling) {
  // Rotating by -p * f: (-p) * f is exactly -(p * f), cos is even and sin odd,
  // so this is the forward rotation's transpose to the bit.
  std::vector<int32_t> negated(static_cast<size_t>(rows));
  for (int64_t r = 0; r < rows; ++r) negated[size_t(r)] = -positions[r];
  rope_strided(dx, rows, row_stride, n_heads, head_dim, rope_dim, negated.data(), theta, neox, scaling);
}

void silu_mul_backward(float* dgate, float* dup, const float* dact, const float* gate, const float* up, int64_t count) {
#pragma omp parallel for if (count > 4096)
  for (int64_t i = 0; i < count; ++i) {
    const float g = gate[i];
    const float s = 1.0f / (1.0f + std::exp(-g));
    const float d = dact[i];
    dup[i] = d * g * s;
    dgate[i] = d * up[i] * s * (1.0f + g * (1.0f - s));
  }
}

namespace {

// P (seq_len, seq_len): row i holds exp(scale q_i . k_j - lse_i) for j <= i, 0 after.
void causal_probabilities(float* p, const float* q, int64_t q_stride, const float* k, int64_t k_stride,
                          const float* lse, int64_t seq_len, int64_t head_dim, float scale) {
  const int t = int(seq_len);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t, t, int(head_dim), scale, q, int(q_stride), k,
              int(k_stride), 0.0f, p, t);
  for (int64_t i = 0; i < seq_len; ++i) {
    float* row = p + i * seq_len;
    for (int64_t j = 0; j <= i; ++j) row[j] = std::exp(row[j] - lse[i]);
    std::fill(row + i + 1, row + seq_len, 0.0f);
  }
}

}  // namespace

void causal_attention_forward(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                              int64_t seq_len, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale) {
  const int64_t qs = n_heads * head_dim, ks = n_kv_heads * head_dim, group = n_heads / n_kv_heads;
  const int t = int(seq_len);
#pragma omp parallel
  {
    std::vector<float> p(static_cast<size_t>(seq_len * seq_len));
#pragma omp for schedule(static)
    for (int64_t bh = 0; bh < batch * n_heads; ++bh) {
      const int64_t b = bh / n_heads, h = bh % n_heads, g = h / group;
      const float* qh = q + b * seq_len * qs + h * head_dim;
      const float* kg = k + b * seq_len * ks + g * head_dim;
      const float* vg = v + b * seq_len * ks + g * head_dim;
      float* l = lse + (b * n_heads + h) * seq_len;
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t, t, int(head_dim), scale, qh, int(qs), kg, int(ks),
                  0.0f, p.data(), t);
      for (int64_t i = 0; i < seq_len; ++i) {
        float* row = p.data() + i * seq_len;
        const float m = *std::max_element(row, row + i + 1);
        double sum = 0.0;
        for (int64_t j = 0; j <= i; ++j) sum += std::exp(double(row[j]) - double(m));
        l[i] = m + float(std::log(sum));
        for (int64_t j = 0; j <= i; ++j) row[j] = std::exp(row[j] - l[i]);
        std::fill(row + i + 1, row + seq_len, 0.0f);
      }
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t, int(head_dim), t, 1.0f, p.data(), t, vg, int(ks),
                  0.0f, out + b * seq_len * qs + h * head_dim, int(qs));
    }
  }
}

void causal_attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                               const float* v, const float* out, const float* lse, int64_t batch, int64_t seq_len,
                               int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale) {
  const int64_t qs = n_heads * head_dim, ks = n_kv_heads * head_dim, group = n_heads / n_kv_heads;
  const int t = int(seq_len), d = int(head_dim);
#pragma omp parallel
  {
    std::vector<float> p(static_cast<size_t>(seq_len * seq_len)), dp(p.size()), delta(static_cast<size_t>(seq_len));
#pragma omp for schedule(static)
    for (int64_t bg = 0; bg < batch * n_kv_heads; ++bg) {
      const int64_t b = bg / n_kv_heads, g = bg % n_kv_heads;
      const float* kg = k + b * seq_len * ks + g * head_dim;
      const float* vg = v + b * seq_len * ks + g * head_dim;
      float* dkg = dk + b * seq_len * ks + g * head_dim;
      float* dvg = dv + b * seq_len * ks + g * head_dim;
      for (int64_t hi = 0; hi < group; ++hi) {
        const int64_t h = g * group + hi;
        const int64_t off = b * seq_len * qs + h * head_dim;
        causal_probabilities(p.data(), q + off, qs, kg, ks, lse + (b * n_heads + h) * seq_len, seq_len, head_dim,
                             scale);
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, t, t, d, 1.0f, dout + off, int(qs), vg, int(ks), 0.0f,
                    dp.data(), t);
        for (int64_t i = 0; i < seq_len; ++i) {
          double s = 0.0;
          for (int64_t e = 0; e < head_dim; ++e) s += double(dout[off + i * qs + e]) * double(out[off + i * qs + e]);
          delta[size_t(i)] = float(s);
        }
        // dS over P's storage of dp (P itself is still needed for dV).
        for (int64_t i = 0; i < seq_len; ++i) {
          float* dpr = dp.data() + i * seq_len;
          const float* pr = p.data() + i * seq_len;
          for (int64_t j = 0; j <= i; ++j) dpr[j] = pr[j] * (dpr[j] - delta[size_t(i)]);
          std::fill(dpr + i + 1, dpr + seq_len, 0.0f);
        }
        const float beta = hi == 0 ? 0.0f : 1.0f;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, t, d, t, scale, dp.data(), t, kg, int(ks), 0.0f,
                    dq + off, int(qs));
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, t, d, t, scale, dp.data(), t, q + off, int(qs), beta,
                    dkg, int(ks));
        cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, t, d, t, 1.0f, p.data(), t, dout + off, int(qs), beta,
                    dvg, int(ks));
      }
    }
  }
}

void matmul_dy_w(float* dx, const float* dy, const float* w, int64_t m, int64_t n, int64_t k, bool accumulate) {
  cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, int(m), int(k), int(n), 1.0f, dy, int(n), w, int(k),
              accumulate ? 1.0f : 0.0f, dx, int(k));
}

void matmul_dyt_x_add(float* dw, const float* dy, const float* x, int64_t m, int64_t n, int64_t k, float scale) {
  cblas_sgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(n), int(k), int(m), scale, dy, int(n), x, int(k), 1.0f,
              dw, int(k));
}

}  // namespace inferlab::kernels::cpu
