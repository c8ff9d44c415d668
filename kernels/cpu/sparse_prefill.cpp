#include "cpu/sparse_prefill.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "cpu/sgemm_tiles.h"

namespace inferlab::kernels::cpu {

void vertical_slash_scores(const float* q, int64_t n_rows, int64_t q_stride, const int32_t* self,
                           const KvPageRef* pages, int64_t n_pages, int64_t hd, float scale, float* vertical,
                           float* slash, std::vector<float>& scratch) {
  if (n_rows <= 0) return;
  const int64_t n_keys = int64_t(*std::max_element(self, self + n_rows)) + 1;
  // The keys, contiguous, then every row's scores in one GEMM: (rows, hd) x (hd, keys).
  scratch.resize(size_t(n_keys * hd + n_rows * n_keys));
  float* keys = scratch.data();
  float* scores = keys + n_keys * hd;
  int64_t k = 0;
  for (int64_t r = 0; r < n_pages && k < n_keys; ++r) {
    const int64_t take = std::min<int64_t>(pages[r].n_tokens, n_keys - k);
    load_kv_rows(pages[r], false, 0, take, hd, keys + k * hd);
    k += take;
  }
  sgemm_tiles(true, n_rows, k, hd, scale, q, q_stride, keys, hd, 0.0f, scores, n_keys);
  for (int64_t i = 0; i < n_rows; ++i) {
    float* p = scores + i * n_keys;
    const int64_t visible = std::min<int64_t>(int64_t(self[i]) + 1, k);
    const float m = *std::max_element(p, p + visible);
    double sum = 0.0;
    for (int64_t j = 0; j < visible; ++j) {
      p[j] = std::exp(p[j] - m);
      sum += p[j];
    }
    const float inv = float(1.0 / sum);
    for (int64_t j = 0; j < visible; ++j) {
      const float pj = p[j] * inv;
      vertical[j] += pj;
      slash[self[i] - j] += pj;
    }
  }
}

void mean_pool_keys(const KvPageRef* pages, int64_t n_pages, int64_t n_keys, int64_t hd, int64_t bs, float* out) {
  const int64_t n_blocks = (n_keys + bs - 1) / bs;
  std::fill(out, out + n_blocks * hd, 0.0f);
  int64_t k = 0;
  std::vector<float> row(static_cast<size_t>(hd));
  for (int64_t r = 0; r < n_pages && k < n_keys; ++r)
    for (int32_t t = 0; t < pages[r].n_tokens && k < n_keys; ++t, ++k) {
      float* o = out + (k / bs) * hd;
      const float* kt = kv_row_f32(pages[r], false, t, hd, row.data());
      for (int64_t d = 0; d < hd; ++d) o[d] += kt[d];
    }
  for (int64_t b = 0; b < n_blocks; ++b) {
    const float inv = 1.0f / float(std::min(bs, n_keys - b * bs));
    for (int64_t d = 0; d < hd; ++d) out[b * hd + d] *= inv;
  }
}

void mean_pool_rows(const float* q, int64_t n_rows, int64_t q_stride, int64_t first, int64_t hd, int64_t bs,
                    float* out) {
  if (n_rows <= 0) return;
  const int64_t b0 = first / bs, b1 = (first + n_rows - 1) / bs;
  std::fill(out, out + (b1 - b0 + 1) * hd, 0.0f);
  for (int64_t i = 0; i < n_rows; ++i) {
    float* o = out + ((first + i) / bs - b0) * hd;
    for (int64_t d = 0; d < hd; ++d) o[d] += q[i * q_stride + d];
  }
  for (int64_t b = b0; b <= b1; ++b) {
    const int64_t lo = std::max(first, b * bs), hi = std::min(first + n_rows, (b + 1) * bs);
    const float inv = 1.0f / float(hi - lo);
    for (int64_t d = 0; d < hd; ++d) out[(b - b0) * hd + d] *= inv;
  }
}

void top_k_ascending(const float* scores, int64_t n, int64_t k, std::vector<int32_t>& out) {
  out.resize(size_t(n));
  std::iota(out.begin(), out.end(), 0);
  if (k < n) {
    auto key = [&](int32_t i) {
      const float s = scores[i];
      return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
    };
    auto better = [&](int32_t a, int32_t b) { return key(a) > key(b) || (key(a) == key(b) && a < b); };
    std::nth_element(out.begin(), out.begin() + std::max<int64_t>(k, 0), out.end(), better);
    out.resize(size_t(std::max<int64_t>(k, 0)));
  }
  std::sort(out.begin(), out.end());
}

}  // namespace inferlab::kernels::cpu
