// The attention statistics a method receives through on_attention, key by key,
// against the double-precision reference forward: each stored token's mass is
// the softmax probability it got, summed over the kv group's query heads and
// the call's rows. (The engine tests elsewhere check totals only: a wrong key
// index would pass them.) Prefill and then decode steps, on a GQA model.
#include <gtest/gtest.h>

#include <map>

#include "engine/engine.h"
#include "inferlab/plugin.h"
#include "naive_reference.h"

namespace inferlab {
namespace test_attention_mass {

class MassRecorder final : public Method {
 public:
  void on_attention(const StepInfo&, const KvView&, const AttentionStats& stats) override {
    calls[{stats.layer, stats.kv_head}].emplace_back(stats.key_mass.begin(), stats.key_mass.end());
  }
  std::map<std::pair<int32_t, int32_t>, std::vector<std::vector<float>>> calls;  // per (layer, kv head), per call
};

TEST(AttentionMass, EveryKeyGetsTheProbabilityTheReferenceGivesIt) {
  auto model = test::gqa_test_model("attention-mass", 3);
  ASSERT_TRUE(model);
  const ModelConfig& c = model->config();
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  MassRecorder method;
  ASSERT_TRUE((*engine)->set_method(&method, kHookAttentionFeedback).ok());
  const auto tokens = test::random_tokens(c.n_vocab, 23, 9);
  const size_t prefill = 18;
  auto seq = (*engine)->new_sequence();
  ASSERT_TRUE((*engine)->forward(*seq, std::span(tokens.data(), prefill), int64_t(prefill), nullptr).ok());
  for (size_t t = prefill; t < tokens.size(); ++t)
    ASSERT_TRUE((*engine)->forward(*seq, std::span(&tokens[t], 1), 1, nullptr).ok());
  (void)(*engine)->set_method(nullptr, 0);

  // The reference's probabilities, summed the same way: per (layer, kv head),
  // per call (the prefill's rows, then one row per decode step), per key position.
  std::map<std::pair<int32_t, int32_t>, std::vector<std::vector<double>>> want;
  test::NaivePolicy policy;
  policy.on_probability = [&](int32_t l, int32_t h, int64_t t, int64_t j, double p) {
    auto& calls = want[{l, h / c.group_size()}];
    const size_t call = t < int64_t(prefill) ? 0 : size_t(t) - prefill + 1;
    if (calls.size() <= call) calls.resize(call + 1);
    if (calls[call].size() <= size_t(t)) calls[call].resize(size_t(t) + 1, 0.0);
    calls[call][size_t(j)] += p;
  };
  test::naive_forward(*model, tokens, policy);

  ASSERT_EQ(method.calls.size(), size_t(c.n_layers) * size_t(c.n_kv_heads));
  for (const auto& [key, calls] : method.calls) {
    SCOPED_TRACE(::testing::Message() << "layer " << key.first << ", kv head " << key.second);
    const auto& ref = want.at(key);
    ASSERT_EQ(calls.size(), ref.size());
    for (size_t call = 0; call < calls.size(); ++call) {
      // The statistics cover every stored token after the call's append.
      const size_t stored = call == 0 ? prefill : prefill + call;
      ASSERT_EQ(calls[call].size(), stored) << "call " << call;
      double total = 0;
      for (size_t j = 0; j < stored; ++j) {
        const double r = j < ref[call].size() ? ref[call][j] : 0.0;
        EXPECT_NEAR(calls[call][j], r, 2e-5 + 1e-4 * r) << "call " << call << ", key " << j;
        total += calls[call][j];
      }
      // Each row hands out one unit of probability per query head of the group.
      const double rows = call == 0 ? double(prefill) : 1.0;
      EXPECT_NEAR(total, rows * c.group_size(), 1e-3) << "call " << call;
    }
  }
}

}  // namespace test_attention_mass
}  // namespace inferlab
