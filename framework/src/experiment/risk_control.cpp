#include "experiment/risk_control.h"

#include <algorithm>
#include <cmath>

namespace inferlab::ltt {

namespace {

// P(Binomial(n, p) <= k), summed in log space.
double binomial_cdf(int64_t k, int64_t n, double p) {
  if (k < 0) return 0.0;
  if (k >= n) return 1.0;
  const double lp = std::log(p), lq = std::log1p(-p), ln_fact_n = std::lgamma(double(n) + 1.0);
  double top = -INFINITY;
  std::vector<double> terms(size_t(k + 1));
  for (int64_t i = 0; i <= k; ++i) {
    terms[size_t(i)] = ln_fact_n - std::lgamma(double(i) + 1.0) - std::lgamma(double(n - i) + 1.0) + double(i) * lp +
                       double(n - i) * lq;
    top = std::max(top, terms[size_t(i)]);
  }
  double sum = 0;
  for (const double t : terms) sum += std::exp(t - top);
  return std::min(1.0, std::exp(top) * sum);
}

// Bernoulli relative entropy h(a, b), with 0 log 0 = 0.
double h1(double a, double b) {
  double out = 0;
  if (a > 0) out += a * std::log(a / b);
  if (a < 1) out += (1 - a) * std::log((1 - a) / (1 - b));
  return out;
}

}  // namespace

double hoeffding_bentkus_p(double risk, int64_t n, double delta) {
  if (n <= 0) return 1.0;
  const double hoeffding = std::exp(-double(n) * h1(std::min(risk, delta), delta));
  const auto k = int64_t(std::ceil(double(n) * risk - 1e-12));
  const double bentkus = std::exp(1.0) * binomial_cdf(k, n, delta);
  return std::min({1.0, hoeffding, bentkus});
}

int64_t min_calibration_size(double delta, double epsilon) {
  return int64_t(std::ceil(std::log(epsilon) / std::log1p(-delta) - 1e-12));
}

double mean_loss(const std::vector<double>& losses, std::span<const int64_t> samples) {
  if (samples.empty()) return 0.0;
  double sum = 0;
  for (const int64_t i : samples) sum += losses[size_t(i)];
  return sum / double(samples.size());
}

Certificate fixed_sequence(const std::vector<std::vector<double>>& losses, std::span<const int64_t> calibration,
                           double delta, double epsilon) {
  Certificate out;
  for (size_t j = 0; j < losses.size(); ++j) {
    const double risk = mean_loss(losses[j], calibration);
    const double p = hoeffding_bentkus_p(risk, int64_t(calibration.size()), delta);
    out.risks.push_back(risk);
    out.p_values.push_back(p);
    if (p > epsilon) break;
    out.chosen = int64_t(j);
  }
  return out;
}

}  // namespace inferlab::ltt
