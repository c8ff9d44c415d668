// Learn then Test (Angelopoulos, Bates, Candès, Jordan, Lei 2021), as CALM
// uses it to certify an early-exit threshold: candidate settings ordered from
// the safest, a loss in [0, 1] per calibration sample and setting, and the
// largest prefix of settings whose risk (mean loss) is certified to be at most
// delta with probability 1 - epsilon over the calibration set:
//   p_j = the Hoeffding–Bentkus p-value of H_j: risk_j > delta,
//   fixed-sequence testing: reject H_1, H_2, ... while p_j <= epsilon.
// The certified setting is the last one rejected.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace inferlab::ltt {

// The Hoeffding–Bentkus p-value of H: risk > delta, for a mean loss `risk`
// of n independent losses in [0, 1]:
//   min(exp(-n h(min(risk, delta), delta)), e P(Binomial(n, delta) <= ceil(n risk))),
// h(a, b) = a log(a / b) + (1 - a) log((1 - a) / (1 - b)); at most 1.
double hoeffding_bentkus_p(double risk, int64_t n, double delta);

// The fewest calibration samples for which even a risk of 0 rejects at
// epsilon: the smallest n with (1 - delta)^n <= epsilon.
int64_t min_calibration_size(double delta, double epsilon);

struct Certificate {
  int64_t chosen = -1;          // index of the certified setting; -1: none
  std::vector<double> risks;    // per setting tested: mean calibration loss
  std::vector<double> p_values; // per setting tested (testing stops at the first failure)
};

// losses[j][i]: loss of setting j (safest first) on sample i; the mean over
// the samples in `calibration` is each setting's risk.
Certificate fixed_sequence(const std::vector<std::vector<double>>& losses, std::span<const int64_t> calibration,
                           double delta, double epsilon);

// The mean of losses[j] over `samples`.
double mean_loss(const std::vector<double>& losses, std::span<const int64_t> samples);

}  // namespace inferlab::ltt
