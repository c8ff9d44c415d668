// Random component predictors of a model's shape (ComponentPredictors), for
// tests and benchmarks of the mechanism: weights uniform in +-scale.
#pragma once

#include <random>

#include "inferlab/plugin.h"
#include "model/model_config.h"

namespace inferlab::test {

// Per layer from first_layer on, a neuron predictor keeping neuron_keep of
// n_ff and a head predictor keeping head_keep of n_heads (0: none of that
// kind); rank 0 is one linear layer, rank > 0 two with a ReLU between.
inline ComponentPredictors random_predictors(const ModelConfig& c, int32_t rank, int32_t neuron_keep, int32_t head_keep,
                                             uint64_t seed, int32_t first_layer = 0, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> u(-scale, scale);
  auto make = [&](int64_t out, int32_t keep) {
    LowRankPredictor p;
    p.keep = keep;
    p.rank = rank;
    p.relu = rank > 0;
    const int64_t hidden = rank > 0 ? rank : c.n_embd;
    p.w1.resize(size_t(int64_t(rank) * c.n_embd));
    p.w2.resize(size_t(out * hidden));
    p.b2.resize(size_t(out));
    for (auto* w : {&p.w1, &p.w2, &p.b2})
      for (float& v : *w) v = u(rng);
    return p;
  };
  ComponentPredictors out;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    if (neuron_keep > 0) out.neurons.push_back(l >= first_layer ? make(c.n_ff, neuron_keep) : LowRankPredictor{});
    if (head_keep > 0) out.heads.push_back(l >= first_layer ? make(c.n_heads, head_keep) : LowRankPredictor{});
  }
  return out;
}

}  // namespace inferlab::test
