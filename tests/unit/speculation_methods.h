// Test methods for self-speculative decoding (Method::speculation), shared by
// the CPU tests (test_speculation.cpp) and the GPU tests
// (tests/gpu/test_cuda_speculation.cpp): a method that only declares a
// speculation, and one whose decode steps run the first layers as a draft
// step does (the reference for what drafts must be).
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <span>
#include <vector>

#include "engine/engine.h"
#include "inferlab/plugin.h"

namespace inferlab::test {

struct Speculating final : Method {
  Speculation spec;
  Speculation speculation() const override { return spec; }
};

// Decode steps run the first `layers` layers, storing no KV above (the prompt runs all).
struct FirstLayers final : Method {
  int32_t layers = 1;
  bool plan_layers(const StepInfo& step, LayerPlan& plan) override {
    if (!step.decode()) return false;
    for (size_t l = size_t(layers); l < plan.run.size(); ++l) plan.run[l] = 0;
    plan.kv_fill = SkippedLayerKv::None;
    return true;
  }
};

inline int32_t argmax_of(std::span<const float> l) {
  return int32_t(std::max_element(l.begin(), l.end()) - l.begin());
}

// What a speculation from a prompt must draft, computed without one: on
// `engine` (no method set), the token the model chooses after `prompt`, then
// the `count` tokens its first `layers` layers choose greedily from there,
// one decode step each (FirstLayers).
struct DraftChain {
  int32_t token = 0;
  std::vector<int32_t> drafts;
};
inline DraftChain first_layers_chain(Engine& engine, const std::vector<int32_t>& prompt, int32_t layers, int count) {
  DraftChain chain;
  FirstLayers first;
  first.layers = layers;
  EXPECT_TRUE(engine.set_method(&first, hooks_of<FirstLayers>()).ok());
  auto seq = engine.new_sequence();
  auto logits = engine.prefill(*seq, prompt);
  EXPECT_TRUE(logits.ok()) << (logits.ok() ? "" : logits.message());
  if (logits.ok()) chain.token = argmax_of(*logits);
  for (int32_t from = chain.token; logits.ok() && int(chain.drafts.size()) < count;) {
    logits = engine.decode(*seq, from);
    EXPECT_TRUE(logits.ok()) << (logits.ok() ? "" : logits.message());
    if (!logits.ok()) break;
    from = argmax_of(*logits);
    chain.drafts.push_back(from);
  }
  EXPECT_TRUE(engine.set_method(nullptr, 0).ok());
  return chain;
}

// A sequence of `prompt` on `engine` (the caller set a speculating method),
// then one speculation from `token` into `made`, the counters reset between.
// A negative `token` becomes the model's choice after the prompt.
inline std::unique_ptr<KvSequence> speculate_after_prompt(Engine& engine, const std::vector<int32_t>& prompt,
                                                          int32_t& token, int32_t max_drafts, Engine::Speculated& made) {
  auto seq = engine.new_sequence();
  auto prefilled = engine.prefill(*seq, prompt);
  EXPECT_TRUE(prefilled.ok()) << (prefilled.ok() ? "" : prefilled.message());
  if (token < 0 && prefilled.ok()) token = argmax_of(*prefilled);
  engine.reset_counters();
  const Status s = engine.speculate(*seq, token, max_drafts, made);
  EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
  return seq;
}

// What a fresh sequence on `engine` gives after `prompt`, then `kept` in one
// call: the logits of decoding `next` (empty on an error, which fails the test).
inline std::vector<float> fresh_decode(Engine& engine, const std::vector<int32_t>& prompt,
                                       const std::vector<int32_t>& kept, int32_t next) {
  auto seq = engine.new_sequence();
  const bool fed = engine.prefill(*seq, prompt).ok() && engine.forward(*seq, kept, int64_t(kept.size()), {}).ok();
  EXPECT_TRUE(fed);
  auto logits = fed ? engine.decode(*seq, next) : Result<std::vector<float>>(Error{"not fed"});
  EXPECT_TRUE(logits.ok());
  return logits.ok() ? *logits : std::vector<float>{};
}

}  // namespace inferlab::test
