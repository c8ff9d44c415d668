// StreamingLLM: dense when its window covers everything, the sinks and the
// recent window kept, memory bounded past the context length with cache
// positions.
#include <gtest/gtest.h>

#include <algorithm>
#include <numeric>
#include <vector>

#include "inferlab/testing.h"

namespace inferlab {
namespace test_streamingllm {

// The project's small GQA test model (2 layers, 4 query heads, 2 kv heads).
std::shared_ptr<Model> model() { return test::gqa_test_model("kv-plugins", 1); }

TEST(StreamingLlm, KeepingEverythingIsDense) {
  EXPECT_DENSE_EQUIVALENT(model(), "streamingllm", test::params({{"window", int64_t{100000}}}));
}

TEST(StreamingLlm, StreamingLlmKeepsSinksAndTheRecentWindow) {
  auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  test::ActiveMethod active =
      test::activate_method(**engine, "streamingllm", test::params({{"sink_tokens", int64_t{2}}, {"window", int64_t{6}}}));
  ASSERT_NE(active.handle.get(), nullptr);
  active.handle->begin_sequence((*engine)->shape());
  auto seq = (*engine)->new_sequence();
  ASSERT_TRUE((*engine)->prefill(*seq, test::random_tokens(100, 20, 1)).ok());
  for (int32_t l = 0; l < 2; ++l)
    for (int32_t g = 0; g < 2; ++g)
      EXPECT_EQ(seq->table(l, g).positions, (std::vector<int32_t>{0, 1, 14, 15, 16, 17, 18, 19}));
  ASSERT_TRUE((*engine)->decode(*seq, 5).ok());
  EXPECT_EQ(seq->table(1, 1).positions, (std::vector<int32_t>{0, 1, 15, 16, 17, 18, 19, 20}));
  // Cache positions: the keys are rotated as if they sat at indices 0..7.
  EXPECT_EQ(seq->table(1, 1).rotary, (std::vector<int32_t>{0, 1, 2, 3, 4, 5, 6, 7}));
}

// dense_layers: the first layers evict nothing; the others keep sinks and window as before.
TEST(StreamingLlm, StreamingLlmDenseLayersKeepEveryToken) {
  const auto with = [](int64_t dense_layers) {
    return test::params({{"sink_tokens", int64_t{2}}, {"window", int64_t{6}}, {"dense_layers", dense_layers}});
  };
  // Every layer dense, and a count past the model's 2 layers, give dense logits at a budget of 8 tokens.
  EXPECT_DENSE_EQUIVALENT(model(), "streamingllm", with(2));
  EXPECT_DENSE_EQUIVALENT(model(), "streamingllm", with(5));

  auto engine = Engine::create(model(), EngineOptions{4, 32, 0});
  ASSERT_TRUE(engine.ok());
  test::ActiveMethod active = test::activate_method(**engine, "streamingllm", with(1));
  ASSERT_NE(active.handle.get(), nullptr);
  active.handle->begin_sequence((*engine)->shape());
  auto seq = (*engine)->new_sequence();
  ASSERT_TRUE((*engine)->prefill(*seq, test::random_tokens(100, 20, 1)).ok());
  ASSERT_TRUE((*engine)->decode(*seq, 5).ok());
  std::vector<int32_t> all(21);
  std::iota(all.begin(), all.end(), 0);
  for (int32_t g = 0; g < 2; ++g) {
    EXPECT_EQ(seq->table(0, g).positions, all);
    EXPECT_EQ(seq->table(0, g).rotary, all);  // nothing moved: cache indices are the original positions
    EXPECT_EQ(seq->table(1, g).positions, (std::vector<int32_t>{0, 1, 15, 16, 17, 18, 19, 20}));
  }
  // Layer 1's 2 kv heads: 12 evicted after the prompt, 1 at the decode step.
  EXPECT_EQ((*engine)->counters().tokens_evicted, 2 * (12 + 1));
  EXPECT_EQ(active.handle->counters().at("max_tokens_kept"), 8);  // the bound of the layers that evict
  // A dense layer holds every token, so the stream stops at the context length (32) again.
  Status s = ok_status();
  for (int32_t t = 0; t < 20 && s.ok(); ++t) {
    auto logits = (*engine)->decode(*seq, t);
    s = logits.ok() ? ok_status() : Status(logits.error());
  }
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("context length exceeded"), std::string::npos) << s.message();
  EXPECT_EQ(seq->table(0, 0).n_tokens(), 32);
}

TEST(StreamingLlm, StreamingLlmMemoryStaysBoundedPastTheContextLength) {
  auto engine = Engine::create(model(), EngineOptions{4, 32, 0});
  ASSERT_TRUE(engine.ok());
  for (const std::string positions : {"cache", "original"}) {
    test::ActiveMethod active = test::activate_method(
        **engine, "streamingllm",
        test::params({{"sink_tokens", int64_t{4}}, {"window", int64_t{12}}, {"positions", positions}}));
    ASSERT_NE(active.handle.get(), nullptr);
    active.handle->begin_sequence((*engine)->shape());
    auto seq = (*engine)->new_sequence();
    Status s = ok_status();
    int64_t max_pages = 0;
    for (int32_t t = 0; t < 200 && s.ok(); ++t) {
      auto logits = (*engine)->decode(*seq, t % 90);
      s = logits.ok() ? ok_status() : Status(logits.error());
      max_pages = std::max(max_pages, (*engine)->pool().pages_in_use());
    }
    if (positions == "cache") {
      ASSERT_TRUE(s.ok()) << s.message();
      EXPECT_EQ(seq->n_past(), 200);  // far past max_context = 32
      EXPECT_EQ(seq->table(0, 0).n_tokens(), 16);
      EXPECT_LE(max_pages, 5 * 2 * 2);  // 17 tokens at most: 5 pages per (layer, kv head)
    } else {
      EXPECT_FALSE(s.ok());  // original positions cannot pass the context length
    }
  }
}

TEST(StreamingLlm, BatchInvariance) {
  EXPECT_BATCH_INVARIANT(model(), "streamingllm", test::params({{"sink_tokens", int64_t{2}}, {"window", int64_t{6}}}));
}

}  // namespace test_streamingllm
}  // namespace inferlab
