// Token sampling: greedy (temperature 0) or temperature + top-p, seeded.
#pragma once

#include <cstdint>
#include <random>
#include <span>
#include <vector>

#include "inferlab/result.h"

namespace inferlab {

struct SamplerOptions {
  float temperature = 0.0f;  // 0: greedy
  float top_p = 1.0f;        // nucleus mass kept, in (0, 1]
  uint64_t seed = 0;
};

class Sampler {
 public:
  static Result<Sampler> create(const SamplerOptions& options);
  int32_t sample(std::span<const float> logits);

 private:
  explicit Sampler(const SamplerOptions& options) : options_(options), rng_(options.seed) {}
  SamplerOptions options_;
  std::mt19937_64 rng_;
  std::vector<std::pair<float, int32_t>> candidates_;
};

}  // namespace inferlab
