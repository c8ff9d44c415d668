// Self-speculative decoding on the CUDA backend (Method::speculation): drafts
// are the tokens the first layers choose (the same layer plans, replayed as
// graphs) and leave no KV behind after the verifying call; greedy generation
// under speculation gives the CUDA engine's dense tokens, except where dense's
// top two logits are within f16 rounding of each other (a verifying call of
// several rows and a one-row decode step round differently), reported.
#include <gtest/gtest.h>

#include <algorithm>
#include <iostream>
#include <vector>

#include "engine/generation.h"
#include "gpu_engine_support.h"
#include "gpu_test_support.h"
#include "speculation_methods.h"

namespace inferlab {
namespace test_cuda_speculation {

using test::argmax_of;
using test::Speculating;

const std::vector<int32_t>& prompt() {
  static const std::vector<int32_t> p = test::random_tokens(gpu_test::small_model()->config().n_vocab, 37, 12);
  return p;
}

TEST(CudaSpeculation, DraftsAreTheFirstLayersTokensAndLeaveNoKvBehind) {
  INFERLAB_REQUIRE_GPU();
  auto model = gpu_test::small_model();
  const int32_t L = model->config().n_layers, n = int32_t(prompt().size());
  for (const int32_t exit : {1, L - 1}) {
    SCOPED_TRACE(testing::Message() << "exit layer " << exit);
    auto reference = gpu_test::make_engine(model, BackendKind::Cuda);
    ASSERT_NE(reference, nullptr);
    const test::DraftChain chain = test::first_layers_chain(*reference, prompt(), exit, 6);
    int32_t token = chain.token;
    const std::vector<int32_t>& expected = chain.drafts;
    ASSERT_EQ(expected.size(), 6u);

    auto engine = gpu_test::make_engine(model, BackendKind::Cuda);
    Speculating method;
    method.spec = {exit, 6};
    ASSERT_TRUE(engine->set_method(&method, 0).ok());
    Engine::Speculated made;
    auto seq = test::speculate_after_prompt(*engine, prompt(), token, 6, made);
    EXPECT_EQ(made.drafts, expected);
    EXPECT_EQ(seq->n_past(), n + 7);
    for (int32_t l = 0; l < L; ++l)
      for (int32_t g = 0; g < model->config().n_kv_heads; ++g) EXPECT_EQ(seq->table(l, g).n_tokens(), n + 7);
    EXPECT_GT(engine->counters().graph_replays, 0) << "draft steps should replay like any layer plan";
    // After dropping drafts, a decode step gives what a fresh sequence of the kept tokens gives.
    ASSERT_TRUE(engine->drop_drafts(*seq, 4, true).ok());
    auto after = engine->decode(*seq, expected[2]);
    ASSERT_TRUE(after.ok());
    auto fresh = gpu_test::make_engine(model, BackendKind::Cuda);
    const std::vector<float> want =
        test::fresh_decode(*fresh, prompt(), {token, made.drafts[0], made.drafts[1]}, expected[2]);
    ASSERT_FALSE(want.empty());
    EXPECT_LT(test::normalized_max_error(*after, want), 2e-2);  // f16: calls of 7 rows and of 3 round differently
  }
}

TEST(CudaSpeculation, GreedyGenerationGivesTheCudaEnginesDenseTokens) {
  INFERLAB_REQUIRE_GPU();
  auto model = gpu_test::small_model();
  auto engine = gpu_test::make_engine(model, BackendKind::Cuda);
  ASSERT_NE(engine, nullptr);
  const SamplerOptions greedy{};
  auto dense = generate(*engine, prompt(), 64, greedy, {});
  ASSERT_TRUE(dense.ok()) << dense.message();
  // Dense's margins, to judge a difference.
  std::vector<float> margins;
  {
    auto seq = engine->new_sequence();
    auto l = engine->prefill(*seq, prompt());
    ASSERT_TRUE(l.ok());
    for (size_t i = 0; i < dense->tokens.size(); ++i) {
      std::vector<float> top = *l;
      std::partial_sort(top.begin(), top.begin() + 2, top.end(), std::greater<float>());
      margins.push_back(top[0] - top[1]);
      if (i + 1 < dense->tokens.size()) l = engine->decode(*seq, dense->tokens[i]);
      ASSERT_TRUE(l.ok());
    }
  }
  for (const auto& [exit, length] : std::vector<std::pair<int32_t, int32_t>>{{1, 2}, {2, 5}}) {
    SCOPED_TRACE(testing::Message() << "exit " << exit << ", drafts " << length);
    Speculating method;
    method.spec = {exit, length};
    ASSERT_TRUE(engine->set_method(&method, 0).ok());
    engine->reset_counters();
    auto got = generate(*engine, prompt(), 64, greedy, {});
    ASSERT_TRUE(got.ok()) << got.message();
    EXPECT_GT(engine->counters().verify_calls, 0);
    for (size_t i = 0; i < std::min(got->tokens.size(), dense->tokens.size()); ++i)
      if (got->tokens[i] != dense->tokens[i]) {
        EXPECT_LT(margins[i], 0.05f) << "token " << i << " differs; dense's top two logits are " << margins[i]
                                     << " apart";
        std::cout << "  near tie at token " << i << " (dense's top two " << margins[i] << " apart)\n";
        break;
      }
    ASSERT_TRUE(engine->set_method(nullptr, 0).ok());
  }
}

}  // namespace test_cuda_speculation
}  // namespace inferlab
