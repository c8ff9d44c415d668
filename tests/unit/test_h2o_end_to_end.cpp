// H2O end to end: the h2o plugin on the engine against the double-precision
// reference forward told to let each query see exactly the tokens the engine
// kept (the cache's positions after each call, per layer and kv head). Equal
// decode logits mean the engine attended over the kept tokens, at their
// original RoPE positions, and nothing else.
#include <gtest/gtest.h>

#include <algorithm>
#include <map>

#include "engine/engine.h"
#include "inferlab/testing.h"
#include "naive_reference.h"

namespace inferlab {
namespace test_h2o_end_to_end {

TEST(H2oEndToEnd, DecodeLogitsEqualAReferenceThatSeesTheKeptTokens) {
  auto model = test::gqa_test_model("h2o-end-to-end", 6);
  ASSERT_TRUE(model);
  const ModelConfig& c = model->config();
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  ParamValues params;
  params.set("heavy", int64_t(4));
  params.set("recent", int64_t(3));
  test::ActiveMethod active = test::activate_method(**engine, "h2o", params);
  ASSERT_NE(active.handle.get(), nullptr);
  active.handle->begin_sequence((*engine)->shape());

  const auto tokens = test::random_tokens(c.n_vocab, 30, 12);
  const size_t prefill = 16;
  auto seq = (*engine)->new_sequence();
  // Kept positions per (layer, kv head) after each call.
  std::vector<std::map<std::pair<int32_t, int32_t>, std::vector<int32_t>>> kept;
  auto record = [&] {
    auto& now = kept.emplace_back();
    for (int32_t l = 0; l < c.n_layers; ++l)
      for (int32_t g = 0; g < c.n_kv_heads; ++g) now[{l, g}] = seq->table(l, g).positions;
  };
  std::vector<float> got;
  auto keep = [&](int64_t, std::span<const float> l) { got.insert(got.end(), l.begin(), l.end()); };
  ASSERT_TRUE((*engine)->forward(*seq, std::span(tokens.data(), prefill), int64_t(prefill), nullptr).ok());
  record();
  for (size_t t = prefill; t < tokens.size(); ++t) {
    ASSERT_TRUE((*engine)->forward(*seq, std::span(&tokens[t], 1), 0, keep).ok());
    record();
  }
  (void)(*engine)->set_method(nullptr, 0);
  EXPECT_EQ(kept.back().at({0, 0}).size(), 4u + 3u) << "H2O kept more than heavy + recent: nothing was evicted";

  test::NaivePolicy policy;
  policy.key_visible = [&](int32_t l, int32_t h, int64_t t, int64_t j) {
    if (t < int64_t(prefill) || j == t) return true;  // a call's rows see every key before that layer evicts
    const auto& before = kept[size_t(t) - prefill].at({l, h / c.group_size()});  // the cache the step started from
    return std::binary_search(before.begin(), before.end(), int32_t(j));
  };
  const auto want = test::naive_forward(*model, tokens, policy);
  const size_t v = size_t(c.n_vocab);
  const std::vector<double> decode_rows(want.begin() + long(prefill * v), want.end());
  ASSERT_EQ(got.size(), decode_rows.size());
  EXPECT_LT(test::normalized_max_error(got, decode_rows), 1e-4);
  // And the eviction mattered: the dense reference gives other logits.
  const auto dense = test::naive_forward(*model, tokens);
  EXPECT_GT(test::normalized_max_error(got, std::vector<double>(dense.begin() + long(prefill * v), dense.end())), 1e-3);
}

}  // namespace test_h2o_end_to_end
}  // namespace inferlab
