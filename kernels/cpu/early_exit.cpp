#include "cpu/early_exit.h"

#include <algorithm>
#include <cmath>
#include <limits>

namespace inferlab::kernels::cpu {

float softmax_margin(const float* logits, int64_t n) {
  constexpr float kNone = -std::numeric_limits<float>::infinity();
  float top1 = kNone, top2 = kNone;
  for (int64_t i = 0; i < n; ++i) {
    const float v = std::isnan(logits[i]) ? kNone : logits[i];
    if (v > top1) {
      top2 = top1;
      top1 = v;
    } else if (v > top2) {
      top2 = v;
    }
  }
  if (top1 == kNone) return 0.0f;
  double sum = 0;  // exp(v - top1) over every finite logit
  for (int64_t i = 0; i < n; ++i)
    if (!std::isnan(logits[i])) sum += std::exp(double(logits[i]) - double(top1));
  const double second = top2 == kNone ? 0.0 : std::exp(double(top2) - double(top1));
  return float((1.0 - second) / sum);
}

float cosine_similarity(const float* a, const float* b, int64_t n) {
  double ab = 0, aa = 0, bb = 0;
  for (int64_t i = 0; i < n; ++i) {
    ab += double(a[i]) * double(b[i]);
    aa += double(a[i]) * double(a[i]);
    bb += double(b[i]) * double(b[i]);
  }
  if (aa == 0 || bb == 0) return 0.0f;
  return float(std::min(1.0, ab / std::sqrt(aa * bb)));
}

float two_way_confidence(const float* z) {
  return float(1.0 / (1.0 + std::exp(double(z[0]) - double(z[1]))));
}

}  // namespace inferlab::kernels::cpu
