// Calibration taps on the CUDA backend: each intermediate a forward observer
// receives equals the CPU backend's for the same tokens, within f16 rounding
// (the FFN activation is kept in f16 on the GPU, so it gets f16's tolerance).
#include <gtest/gtest.h>

#include <array>

#include "gpu_engine_support.h"
#include "gpu_test_support.h"
#include "plugin_test_support.h"

namespace inferlab {
namespace test_cuda_calibration {

using gpu_test::make_engine;
using gpu_test::small_model;

constexpr uint32_t kAllTaps =
    kTapHiddenIn | kTapQueries | kTapKeys | kTapValues | kTapAttentionOut | kTapFfnActivation;

struct Collected final : public ForwardObserver {
  uint32_t taps() const override { return kAllTaps; }
  void on_layer(const CalibrationTaps& t) override {
    auto& layer = layers.emplace_back();
    size_t i = 0;
    for (auto tap : {t.hidden_in, t.queries, t.keys, t.values, t.attention_out, t.ffn_activation})
      layer[i++].assign(tap.begin(), tap.end());
  }
  std::vector<std::array<std::vector<float>, 6>> layers;
};

Collected collect(Engine& engine, const std::vector<int32_t>& tokens) {
  Collected c;
  auto seq = engine.new_sequence();
  EXPECT_TRUE(engine.forward(*seq, tokens, int64_t(tokens.size()), [](int64_t, std::span<const float>) {}, &c).ok());
  return c;
}

TEST(CudaCalibration, TapsMatchTheCpuBackend) {
  INFERLAB_REQUIRE_GPU();
  auto cpu = make_engine(small_model(), BackendKind::Cpu);
  auto gpu = make_engine(small_model(), BackendKind::Cuda);
  ASSERT_TRUE(cpu && gpu);
  const auto tokens = test::random_tokens(cpu->config().n_vocab, 40, 17);
  const Collected a = collect(*cpu, tokens), b = collect(*gpu, tokens);
  ASSERT_EQ(a.layers.size(), size_t(cpu->config().n_layers));
  ASSERT_EQ(b.layers.size(), a.layers.size());
  const char* names[] = {"hidden_in", "queries", "keys", "values", "attention_out", "ffn_activation"};
  for (size_t l = 0; l < a.layers.size(); ++l)
    for (size_t t = 0; t < 6; ++t) {
      ASSERT_EQ(a.layers[l][t].size(), b.layers[l][t].size()) << names[t] << " layer " << l;
      ASSERT_FALSE(a.layers[l][t].empty()) << names[t] << " layer " << l;
      EXPECT_LT(test::normalized_max_error(b.layers[l][t], a.layers[l][t]), 2e-2) << names[t] << " layer " << l;
    }
  // A call with an observer is never replayed from a graph: decode steps with taps stay exact.
  auto seq = gpu->new_sequence();
  Collected step;
  ASSERT_TRUE(gpu->forward(*seq, tokens, int64_t(tokens.size()), [](int64_t, std::span<const float>) {}).ok());
  const int64_t replays = gpu->counters().graph_replays;
  for (int i = 0; i < 3; ++i) {
    step.layers.clear();
    const int32_t next = tokens[size_t(i)];
    ASSERT_TRUE(gpu->forward(*seq, std::span(&next, 1), 1, [](int64_t, std::span<const float>) {}, &step).ok());
    ASSERT_EQ(step.layers.size(), a.layers.size());
    EXPECT_EQ(step.layers[0][0].size(), size_t(gpu->config().n_embd));
  }
  EXPECT_EQ(gpu->counters().graph_replays, replays);
}

}  // namespace test_cuda_calibration
}  // namespace inferlab
