// Statistics the report puts beside each figure: how sure a rate is, whether a
// method and dense differ on the same samples, how sure a perplexity is.
#pragma once

#include <cstdint>
#include <vector>

namespace inferlab {

struct Interval {
  double lo = 0, hi = 0;
};

// Wilson score interval of a proportion k/n (95% by default); [0, 1] when n = 0.
Interval wilson_interval(int64_t k, int64_t n, double z = 1.959963984540054);

// McNemar's exact test on paired outcomes: b samples only the first solved, c
// only the second. Two-sided p-value of the binomial(b + c, 1/2) test; 1 when
// b + c = 0.
double mcnemar_exact_p(int64_t b, int64_t c);

// Percentile bootstrap interval of a perplexity exp(sum nll / sum count) over
// samples (windows) drawn with replacement; deterministic for a seed.
Interval bootstrap_perplexity(const std::vector<double>& nll_sums, const std::vector<int64_t>& counts,
                              int replicates = 2000, double level = 0.95, uint64_t seed = 1);

// Percentile bootstrap interval of the mean of `values`; deterministic for a seed.
Interval bootstrap_mean(const std::vector<double>& values, int replicates = 2000, double level = 0.95,
                        uint64_t seed = 1);

}  // namespace inferlab
