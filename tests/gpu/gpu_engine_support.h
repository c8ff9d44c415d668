// Helpers of the whole-engine GPU tests: a small model the attention kernels
// accept, engines of either backend, and top-1 agreement of two logit traces.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "inferlab/testing.h"
#include "model/synthetic_model.h"
#include "test_support.h"

namespace inferlab::gpu_test {

// Fraction of rows (of `vocab` logits) with the same argmax.
inline double top1_agreement(const std::vector<float>& a, const std::vector<float>& b, int64_t vocab) {
  const size_t rows = std::min(a.size(), b.size()) / size_t(vocab);
  size_t same = 0;
  for (size_t r = 0; r < rows; ++r) {
    const auto* x = a.data() + r * size_t(vocab);
    const auto* y = b.data() + r * size_t(vocab);
    same += std::max_element(x, x + vocab) - x == std::max_element(y, y + vocab) - y;
  }
  return rows == 0 ? 0.0 : double(same) / double(rows);
}

inline std::shared_ptr<Model> small_model() {
  static std::shared_ptr<Model> model = [] {
    SyntheticModelSpec spec;
    spec.name = "gpu-small";
    spec.n_layers = 3;
    spec.n_embd = 256;  // head_dim 64, the attention kernels' smallest
    spec.n_heads = 4;
    spec.n_kv_heads = 2;
    spec.n_ff = 512;
    spec.context_length = 2048;
    return test::load_synthetic(spec);
  }();
  return model;
}

inline std::unique_ptr<Engine> make_engine(std::shared_ptr<const Model> model, BackendKind backend, int32_t page_size = 16,
                                    GpuDType dtype = GpuDType::F16, bool graphs = true) {
  EngineOptions options;
  options.page_size = page_size;
  options.backend = backend;
  options.gpu_dtype = dtype;
  options.cuda_graphs = graphs;
  auto engine = Engine::create(std::move(model), options);
  EXPECT_TRUE(engine.ok()) << (engine.ok() ? "" : engine.message());
  return engine.ok() ? std::move(*engine) : nullptr;
}

// A method's prefill and teacher-forced decode (`forced`) on `engine`: the
// logits and the engine's counters; the engine is left without a method.
struct Traced {
  std::vector<float> logits;
  std::map<std::string, double> counters;
};
inline Traced traced(Engine& engine, Method* method, const std::vector<int32_t>& prompt,
                     const std::vector<int32_t>& forced, uint32_t hooks = 0) {
  Traced r;
  auto s = engine.set_method(method, hooks);
  EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
  engine.reset_counters();
  r.logits = test::run_trace(engine, method, prompt, int(forced.size()), forced).logits;
  r.counters = engine.counters().as_map();
  EXPECT_TRUE(engine.set_method(nullptr, 0).ok());
  return r;
}

}  // namespace inferlab::gpu_test
