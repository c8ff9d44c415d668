// What the training-graph tests (tests/unit/test_lora_graph.cpp and the GPU
// ones, tests/gpu/test_cuda_lora_graph.cpp) share: a small grouped-query model,
// random adapters with B nonzero (so gradients reach A), batches of
// next-token targets, and the bitwise comparison of gradients.
#pragma once

#include <gtest/gtest.h>

#include <memory>
#include <random>
#include <string>

#include "finetune/lora_graph.h"
#include "test_support.h"

namespace inferlab::test {

// 2 layers, 64 wide, 96 FFN, 4 query heads over 2 KV heads.
inline SyntheticModelSpec lora_graph_spec(const std::string& name) {
  SyntheticModelSpec spec;
  spec.name = name;
  spec.n_layers = 2;
  spec.n_embd = 64;
  spec.n_ff = 96;
  spec.n_heads = 4;
  spec.n_kv_heads = 2;
  spec.seed = 21;
  return spec;
}

// Adapters of rank 3 on every projection of every layer, A as PEFT
// initializes it, B uniform in +-amplitude, scale 2.
inline finetune::AdapterSet random_lora_adapters(const ModelConfig& c, uint64_t seed, float amplitude = 0.2f) {
  finetune::AdapterInit init;
  init.rank = 3;
  init.alpha = 6;
  init.slots = {0, 1, 2, 3, 4, 5, 6};
  init.seed = seed;
  auto set = finetune::init_adapters(c, init);
  EXPECT_TRUE(set.ok()) << set.message();
  std::mt19937_64 rng(seed + 1);
  std::uniform_real_distribution<float> u(-amplitude, amplitude);
  for (auto& t : set->adapters)
    for (float& v : t.b) v = u(rng);
  return *set;
}

// Two sequences of `len` tokens; targets are the next token, the first two
// positions of each left without a target (as a prompt's would be).
inline finetune::Batch next_token_batch(const ModelConfig& c, int64_t len, uint64_t seed) {
  finetune::Batch b;
  b.sequences = 2;
  b.seq_len = len;
  b.tokens = random_tokens(c.n_vocab, int(2 * len), seed);
  b.targets.assign(b.tokens.size(), -1);
  for (int64_t s = 0; s < 2; ++s)
    for (int64_t t = 2; t + 1 < len; ++t) b.targets[size_t(s * len + t)] = b.tokens[size_t(s * len + t + 1)];
  return b;
}

inline void expect_same_grads(const finetune::AdapterGrads& x, const finetune::AdapterGrads& y) {
  ASSERT_EQ(x.a.size(), y.a.size());
  for (size_t i = 0; i < x.a.size(); ++i) {
    EXPECT_EQ(x.a[i], y.a[i]) << "A of adapter " << i;
    EXPECT_EQ(x.b[i], y.b[i]) << "B of adapter " << i;
  }
}

}  // namespace inferlab::test
