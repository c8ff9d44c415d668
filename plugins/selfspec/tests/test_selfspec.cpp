// selfspec: greedy output equal to dense greedy output (except where dense's
// top two logits are within 1e-4, reported), on a synthetic model and on the
// default model with drafts that are accepted; its declaration; bad parameters.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <string>
#include <vector>

#include "engine/generation.h"
#include "inferlab/testing.h"

namespace inferlab {
namespace test_selfspec {

struct Greedy {
  std::vector<int32_t> tokens;
  std::vector<float> margins;  // top-1 minus top-2 logit of the row each token came from
};

// Greedy generation through the token loop (speculating when the engine's method does).
Greedy greedy(Engine& engine, Method* method, const std::vector<int32_t>& prompt, int32_t max_tokens) {
  Greedy out;
  if (method != nullptr) method->begin_sequence(engine.shape());
  auto seq = engine.new_sequence();
  auto first = engine.prefill(*seq, prompt);
  EXPECT_TRUE(first.ok()) << (first.ok() ? "" : first.message());
  if (!first.ok()) return out;
  TokenLoop loop;
  loop.choose = [](std::span<const float> l) { return int32_t(std::max_element(l.begin(), l.end()) - l.begin()); };
  loop.decode = [&](int32_t token, std::vector<float>& logits) -> Status {
    auto next = engine.decode(*seq, token);
    if (!next) return next.error();
    logits = std::move(*next);
    return ok_status();
  };
  loop.context_full = [&] { return seq->n_past() >= engine.max_context(); };
  loop.on_token = [&](int32_t, std::span<const float> l) {
    std::vector<float> top(l.begin(), l.end());
    std::partial_sort(top.begin(), top.begin() + 2, top.end(), std::greater<float>());
    out.margins.push_back(top[0] - top[1]);
  };
  speculate_with(loop, engine, *seq);
  auto tokens = run_token_loop(std::move(*first), max_tokens, -1, loop);
  EXPECT_TRUE(tokens.ok()) << (tokens.ok() ? "" : tokens.message());
  if (tokens.ok()) out.tokens = tokens->tokens;
  return out;
}

// Dense and selfspec agree token for token; where they first differ, dense's
// top two logits must be within 1e-4 (the comparison stops there: the texts
// then continue from different tokens). Returns the number of such near ties.
int expect_dense_greedy(const Greedy& dense, const Greedy& got) {
  EXPECT_EQ(got.tokens.size(), dense.tokens.size());
  for (size_t i = 0; i < std::min(got.tokens.size(), dense.tokens.size()); ++i)
    if (got.tokens[i] != dense.tokens[i]) {
      EXPECT_LT(dense.margins[i], 1e-4f) << "token " << i << " differs from dense's, whose top two logits are "
                                         << dense.margins[i] << " apart";
      std::cout << "  near tie at generated token " << i << ": dense's top two logits " << dense.margins[i]
                << " apart\n";
      return 1;
    }
  return 0;
}

TEST(SelfSpec, GreedyOutputEqualsDenseOnASyntheticModel) {
  auto m = test::shared_synthetic({.name = "selfspec-6", .n_layers = 6, .n_heads = 4, .n_kv_heads = 2, .seed = 3});
  auto engine = Engine::create(m, EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  const auto prompt = test::random_tokens(m->config().n_vocab, 20, 4);
  const Greedy dense = greedy(**engine, nullptr, prompt, 48);
  for (const int64_t exit : {1, 3, 5})
    for (const int64_t length : {1, 3, 7}) {
      SCOPED_TRACE(testing::Message() << "exit_layer " << exit << ", draft_length " << length);
      test::ActiveMethod active =
          test::activate_method(**engine, "selfspec", test::params({{"exit_layer", exit}, {"draft_length", length}}));
      ASSERT_NE(active.handle.get(), nullptr);
      (*engine)->reset_counters();
      const Greedy got = greedy(**engine, active.handle.get(), prompt, 48);
      EXPECT_EQ(expect_dense_greedy(dense, got), 0);
      EXPECT_GT((*engine)->counters().verify_calls, 0);
      (void)(*engine)->set_method(nullptr, 0);
    }
}

// The default model, where shallow drafts are often right: the accepted path
// runs, and the output is still dense's.
TEST(SelfSpec, GreedyOutputEqualsDenseOnTheDefaultModel) {
  auto m = test::default_model();
  if (!m) GTEST_SKIP() << "smollm2-135m is not installed (scripts/setup.sh)";
  auto engine = Engine::create(m, EngineOptions{16, 512, 0});
  ASSERT_TRUE(engine.ok());
  const Tokenizer& tok = m->tokenizer();
  int near_ties = 0;
  for (const char* text : {"The quick brown fox jumps over the lazy dog. The quick brown fox",
                           "In the beginning God created the heaven and the earth. And the earth was"}) {
    const std::vector<int32_t> prompt = tok.encode(text, true, false);
    const Greedy dense = greedy(**engine, nullptr, prompt, 32);
    for (const auto& [exit, length] : std::vector<std::pair<int64_t, int64_t>>{{6, 3}, {20, 4}}) {
      SCOPED_TRACE(testing::Message() << text << " | exit_layer " << exit << ", draft_length " << length);
      test::ActiveMethod active =
          test::activate_method(**engine, "selfspec", test::params({{"exit_layer", exit}, {"draft_length", length}}));
      ASSERT_NE(active.handle.get(), nullptr);
      (*engine)->reset_counters();
      const Greedy got = greedy(**engine, active.handle.get(), prompt, 32);
      near_ties += expect_dense_greedy(dense, got);
      const auto c = (*engine)->counters().as_map();
      EXPECT_GT(c.at("drafts_accepted"), 0) << "no draft was accepted: the accepted path did not run";
      std::cout << "  exit " << exit << ", drafts " << length << ": acceptance " << c.at("draft_acceptance")
                << ", tokens per verifying call " << c.at("tokens_per_verify_call") << "\n";
      (void)(*engine)->set_method(nullptr, 0);
    }
  }
  RecordProperty("near_ties", near_ties);
}

TEST(SelfSpec, DeclaresItsExitLayerAndDraftLength) {
  MethodHandle handle = test::make_method("selfspec", test::params({{"exit_layer", int64_t(5)}, {"draft_length", int64_t(9)}}));
  ASSERT_NE(handle.get(), nullptr);
  const Speculation s = handle->speculation();
  EXPECT_EQ(s.exit_layer, 5);
  EXPECT_EQ(s.draft_length, 9);
  EXPECT_TRUE(handle->dense_prefill());
}

TEST(SelfSpec, BadParametersAreRefusedByName) {
  auto m = test::shared_synthetic({.name = "selfspec-6", .n_layers = 6, .n_heads = 4, .n_kv_heads = 2, .seed = 3});
  auto engine = Engine::create(m, EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  // An exit at or past the last layer: refused when loaded, naming the key and the model's layers.
  auto handle = test::plugin_registry().create("selfspec", test::params({{"exit_layer", int64_t(6)}}));
  ASSERT_TRUE(handle.ok());
  const PluginEntry* entry = test::plugin_registry().find("selfspec");
  ASSERT_NE(entry, nullptr);
  WeightOverrides overrides;
  auto loaded = prepare_method(*handle->get(), *entry, test::resolved_params(*entry, test::params({{"exit_layer", int64_t(6)}})),
                               **engine, test::temp_path("artifacts"), &overrides);
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.message().find("exit_layer = 6"), std::string::npos) << loaded.message();
  EXPECT_NE(loaded.message().find("1..5"), std::string::npos) << loaded.message();
  // Out of the declared ranges: refused by the host before the plugin sees them.
  for (const auto& [key, value] : std::vector<std::pair<std::string, int64_t>>{
           {"exit_layer", 0}, {"draft_length", 0}, {"draft_length", 65}}) {
    auto bad = test::plugin_registry().create("selfspec", test::params({{key, value}}));
    ASSERT_FALSE(bad.ok()) << key << " = " << value;
    EXPECT_NE(bad.message().find(key), std::string::npos) << bad.message();
  }
}

}  // namespace test_selfspec
}  // namespace inferlab
