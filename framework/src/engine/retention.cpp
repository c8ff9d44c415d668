#include "engine/retention.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

namespace inferlab {

void retention_drops(std::span<const float> score, const RetentionBudget& b, std::vector<int32_t>& drop) {
  drop.clear();
  const int64_t n = int64_t(score.size());
  if (b.heavy < 0 || n <= int64_t(b.sink) + b.recent + b.heavy) return;
  const int32_t first = b.sink, end = int32_t(n) - b.recent;  // candidates [first, end)
  auto key = [&](int32_t i) {
    const float s = score[size_t(i)];
    return std::isnan(s) ? -std::numeric_limits<float>::infinity() : s;
  };
  std::vector<int32_t> order(size_t(end - first));
  std::iota(order.begin(), order.end(), first);
  std::nth_element(order.begin(), order.begin() + b.heavy, order.end(), [&](int32_t a, int32_t c) {
    return key(a) > key(c) || (key(a) == key(c) && a < c);
  });
  drop.assign(order.begin() + b.heavy, order.end());
  std::sort(drop.begin(), drop.end());
}

}  // namespace inferlab
