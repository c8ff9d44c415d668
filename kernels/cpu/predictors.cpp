#include "cpu/predictors.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <vector>

#include "cpu/cpu_ops.h"

namespace inferlab::kernels::cpu {

void rms_scale_rows(float* out, const float* x, int64_t rows, int64_t d, float eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * d;
    double ss = 0;
    for (int64_t i = 0; i < d; ++i) ss += double(xr[i]) * xr[i];
    const float s = float(1.0 / std::sqrt(ss / double(d) + double(eps)));
    float* o = out + r * d;
    for (int64_t i = 0; i < d; ++i) o[i] = xr[i] * s;
  }
}

void predictor_layer(float* y, const float* x, const float* w, const float* b, int64_t rows, int64_t in, int64_t out,
                     bool relu) {
  matmul_xwt(y, x, w, rows, out, in);
  for (int64_t r = 0; r < rows; ++r) {
    float* yr = y + r * out;
    if (b != nullptr)
      for (int64_t j = 0; j < out; ++j) yr[j] += b[j];
    if (relu)
      for (int64_t j = 0; j < out; ++j) yr[j] = std::max(yr[j], 0.0f);
  }
}

void top_k_flags(uint8_t* flags, const float* logits, int64_t rows, int64_t n, int32_t k) {
  if (k <= 0 || n <= 0) return;
  if (k >= n) {
    std::fill(flags, flags + n, uint8_t{1});
    return;
  }
  std::vector<int32_t> order(static_cast<size_t>(n));
  for (int64_t r = 0; r < rows; ++r) {
    const float* z = logits + r * n;
    const auto key = [z](int32_t j) { return std::isnan(z[j]) ? -std::numeric_limits<float>::infinity() : z[j]; };
    std::iota(order.begin(), order.end(), 0);
    std::nth_element(order.begin(), order.begin() + (k - 1), order.end(), [&](int32_t a, int32_t b) {
      return key(a) > key(b) || (key(a) == key(b) && a < b);
    });
    for (int32_t i = 0; i < k; ++i) flags[order[size_t(i)]] = 1;
  }
}

int32_t flags_to_list(int32_t* list, const uint8_t* flags, int64_t n) {
  int32_t count = 0;
  for (int64_t j = 0; j < n; ++j)
    if (flags[j] != 0) list[count++] = int32_t(j);
  return count;
}

}  // namespace inferlab::kernels::cpu
