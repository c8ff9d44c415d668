// Test methods and policies for early exit by confidence (ExitPolicy), shared
// by the CPU tests (test_exit_policy.cpp) and the GPU tests
// (tests/gpu/test_cuda_batched_calls.cpp): random affine maps, exit heads
// near the identity, a policy checking given layers, methods that only
// declare a policy and a threshold, and the counters a batch with exits must
// share with its sequences alone.
#pragma once

#include <gtest/gtest.h>

#include <random>
#include <vector>

#include "engine/engine.h"
#include "inferlab/plugin.h"
#include "model/model_config.h"

namespace inferlab::test {

// A method that only declares an exit policy and a fixed threshold.
struct ConfidenceExit final : Method {
  ExitPolicy policy;
  double threshold = 2.0;
  double exit_threshold(const StepInfo&) override { return threshold; }
  ExitPolicy exit_policy() const override { return policy; }
};

// A threshold per sequence: even sequence ids exit at the first check, odd
// ones never check (a threshold above 1 plans no checks).
struct ExitByParity final : Method {
  ExitPolicy policy;
  double exit_threshold(const StepInfo& step) override { return step.sequence % 2 == 0 ? -2.0 : 2.0; }
  ExitPolicy exit_policy() const override { return policy; }
};

inline ExitMap random_map(int64_t out, int64_t in, uint64_t seed, float scale) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  ExitMap m;
  m.weight.resize(size_t(out * in));
  m.bias.resize(size_t(out));
  for (float& w : m.weight) w = dist(rng);
  for (float& b : m.bias) b = dist(rng);
  return m;
}

// Exit heads near the identity (so the mapped state still predicts), one per layer.
inline std::vector<ExitMap> near_identity_heads(const ModelConfig& c) {
  std::vector<ExitMap> heads;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    ExitMap m = random_map(c.n_embd, c.n_embd, 100 + uint64_t(l), 0.05f);
    for (int64_t i = 0; i < c.n_embd; ++i) m.weight[size_t(i * c.n_embd + i)] += 1.0f;
    heads.push_back(std::move(m));
  }
  return heads;
}

// Checks after `layers` with `measure` (Classifier: a random 2-way map per layer).
inline ExitPolicy policy_checking(const ModelConfig& c, ExitMeasure measure, std::initializer_list<int32_t> layers) {
  ExitPolicy p;
  p.measure = measure;
  p.check.assign(size_t(c.n_layers), 0);
  for (int32_t l : layers) p.check[size_t(l)] = 1;
  if (measure == ExitMeasure::Classifier)
    for (int32_t l = 0; l < c.n_layers; ++l) p.classifiers.push_back(random_map(2, c.n_embd, 7 + uint64_t(l), 0.2f));
  return p;
}

// Batched calls with exits by confidence count what the sequences alone count
// (checks, exits, layers run and skipped, K/V fills), in `calls` batched calls
// that run every layer (a sequence that never exits sets the pace).
inline void expect_exit_counters_as_alone(const EngineCounters& batched, const EngineCounters& alone, int64_t calls,
                                          int32_t n_layers) {
  EXPECT_EQ(batched.batch_fallbacks, 0);
  EXPECT_EQ(batched.batched_calls, calls);
  EXPECT_EQ(batched.batched_layers, calls * n_layers);
  EXPECT_EQ(batched.exit_checks, alone.exit_checks);
  EXPECT_EQ(batched.exits_after_layer, alone.exits_after_layer);
  EXPECT_EQ(batched.decode_layers_run, alone.decode_layers_run);
  EXPECT_EQ(batched.layers_skipped, alone.layers_skipped);
  EXPECT_EQ(batched.kv_fills_propagated, alone.kv_fills_propagated);
}

}  // namespace inferlab::test
