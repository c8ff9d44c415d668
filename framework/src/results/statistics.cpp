#include "results/statistics.h"

#include <algorithm>
#include <cmath>
#include <random>

namespace inferlab {

Interval wilson_interval(int64_t k, int64_t n, double z) {
  if (n <= 0) return {0.0, 1.0};
  const double p = double(k) / double(n), z2 = z * z, nn = double(n);
  const double center = (p + z2 / (2 * nn)) / (1 + z2 / nn);
  const double half = z / (1 + z2 / nn) * std::sqrt(p * (1 - p) / nn + z2 / (4 * nn * nn));
  return {std::max(0.0, center - half), std::min(1.0, center + half)};
}

double mcnemar_exact_p(int64_t b, int64_t c) {
  const int64_t n = b + c, k = std::min(b, c);
  if (n == 0) return 1.0;
  // P(X <= k) for X ~ Binomial(n, 1/2), summed in the log domain (n can be large).
  double tail = 0;
  for (int64_t i = 0; i <= k; ++i)
    tail += std::exp(std::lgamma(double(n) + 1) - std::lgamma(double(i) + 1) - std::lgamma(double(n - i) + 1) -
                     double(n) * std::log(2.0));
  return std::min(1.0, 2 * tail);
}

namespace {

// The central `level` share of sorted bootstrap replicates.
Interval percentile_interval(std::vector<double>& replicates, double level) {
  std::sort(replicates.begin(), replicates.end());
  const double tail = (1 - level) / 2;
  auto at = [&](double q) {
    return replicates[std::min(replicates.size() - 1, size_t(q * double(replicates.size() - 1) + 0.5))];
  };
  return {at(tail), at(1 - tail)};
}

}  // namespace

Interval bootstrap_mean(const std::vector<double>& values, int replicates, double level, uint64_t seed) {
  const size_t n = values.size();
  if (n == 0 || replicates <= 0) return {0, 0};
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<size_t> pick(0, n - 1);
  std::vector<double> means(static_cast<size_t>(replicates));
  for (double& out : means) {
    double sum = 0;
    for (size_t i = 0; i < n; ++i) sum += values[pick(rng)];
    out = sum / double(n);
  }
  return percentile_interval(means, level);
}

Interval bootstrap_perplexity(const std::vector<double>& nll_sums, const std::vector<int64_t>& counts,
                              int replicates, double level, uint64_t seed) {
  const size_t n = std::min(nll_sums.size(), counts.size());
  if (n == 0 || replicates <= 0) return {0, 0};
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<size_t> pick(0, n - 1);
  std::vector<double> ppl(static_cast<size_t>(replicates));
  for (double& out : ppl) {
    double nll = 0;
    int64_t count = 0;
    for (size_t i = 0; i < n; ++i) {
      const size_t j = pick(rng);
      nll += nll_sums[j];
      count += counts[j];
    }
    out = count > 0 ? std::exp(nll / double(count)) : 0.0;
  }
  return percentile_interval(ppl, level);
}

}  // namespace inferlab
