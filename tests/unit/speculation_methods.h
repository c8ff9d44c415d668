// Test methods for self-speculative decoding (Method::speculation), shared by
// the CPU tests (test_speculation.cpp) and the GPU tests
// (tests/gpu/test_cuda_speculation.cpp): a method that only declares a
// speculation, and one whose decode steps run the first layers as a draft
// step does (the reference for what drafts must be).
#pragma once

#include <algorithm>
#include <span>

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

}  // namespace inferlab::test
