#include "engine/sampler.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "cpu/cpu_ops.h"

namespace inferlab {

Result<Sampler> Sampler::create(const SamplerOptions& options) {
  if (!(options.temperature >= 0.0f) || !std::isfinite(options.temperature))
    return Error{fmt::format("temperature {} must be a finite number >= 0", options.temperature)};
  if (!(options.top_p > 0.0f && options.top_p <= 1.0f))
    return Error{fmt::format("top_p {} must be in (0, 1]", options.top_p)};
  return Sampler(options);
}

int32_t Sampler::sample(std::span<const float> logits) {
  if (options_.temperature == 0.0f) return int32_t(kernels::cpu::argmax(logits.data(), int64_t(logits.size())));
  const float max_logit = *std::max_element(logits.begin(), logits.end());
  candidates_.resize(logits.size());
  double total = 0.0;
  for (size_t i = 0; i < logits.size(); ++i) {
    const float p = std::exp((logits[i] - max_logit) / options_.temperature);
    candidates_[i] = {p, int32_t(i)};
    total += p;
  }
  size_t keep = candidates_.size();
  if (options_.top_p < 1.0f) {
    std::sort(candidates_.begin(), candidates_.end(), [](const auto& a, const auto& b) {
      return a.first > b.first || (a.first == b.first && a.second < b.second);
    });
    double mass = 0.0;
    for (keep = 0; keep < candidates_.size();) {
      mass += candidates_[keep++].first;
      if (mass >= options_.top_p * total) break;
    }
    total = mass;
  }
  std::uniform_real_distribution<double> uniform(0.0, total);
  double target = uniform(rng_);
  for (size_t i = 0; i < keep; ++i) {
    target -= candidates_[i].first;
    if (target <= 0.0) return candidates_[i].second;
  }
  return candidates_[keep - 1].second;
}

}  // namespace inferlab
