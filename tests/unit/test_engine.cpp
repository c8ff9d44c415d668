// Engine correctness on tiny synthetic models: an independent naive forward
// pass (double precision, no cache), prefill-vs-decode consistency and
// paged-vs-contiguous cache equality, over several shapes.
#include <gtest/gtest.h>

#include <cmath>
#include <numeric>

#include "engine/engine.h"
#include "engine/generation.h"
#include "naive_reference.h"
#include "test_support.h"

namespace inferlab {
namespace test_engine {

using test::load_synthetic;
using test::naive_forward;
using test::normalized_max_error;
using test::random_tokens;

std::vector<float> engine_logits_all(Engine& engine, KvSequence& seq, const std::vector<int32_t>& tokens) {
  std::vector<float> all;
  auto s = engine.forward(seq, tokens, 0, [&](int64_t, std::span<const float> l) { all.insert(all.end(), l.begin(), l.end()); });
  EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
  return all;
}

struct ShapeCase {
  const char* name;
  int32_t n_heads, n_kv_heads, n_embd;
  bool tied;
  gguf::TensorType type;
};

class EngineShapes : public ::testing::TestWithParam<ShapeCase> {
 protected:
  std::shared_ptr<Model> make_model() const {
    const ShapeCase& p = GetParam();
    SyntheticModelSpec spec;
    spec.name = p.name;
    spec.n_heads = p.n_heads;
    spec.n_kv_heads = p.n_kv_heads;
    spec.n_embd = p.n_embd;
    spec.tied_embeddings = p.tied;
    spec.weight_type = p.type;
    return load_synthetic(spec);
  }
};

TEST_P(EngineShapes, MatchesNaiveReference) {
  auto model = make_model();
  ASSERT_TRUE(model);
  auto engine = Engine::create(model, {.page_size = 16});
  ASSERT_TRUE(engine.ok());
  const auto tokens = random_tokens(model->config().n_vocab, 37, 7);
  auto seq = (*engine)->new_sequence();
  const auto got = engine_logits_all(**engine, *seq, tokens);
  const auto want = naive_forward(*model, tokens);
  ASSERT_EQ(got.size(), want.size());
  EXPECT_LT(normalized_max_error(got, want), 1e-4);
}

TEST_P(EngineShapes, DecodeMatchesPrefill) {
  auto model = make_model();
  ASSERT_TRUE(model);
  auto engine = Engine::create(model, {.page_size = 16});
  ASSERT_TRUE(engine.ok());
  const int64_t v = model->config().n_vocab;
  const auto tokens = random_tokens(int32_t(v), 45, 11);
  auto prefill_seq = (*engine)->new_sequence();
  const auto prefill = engine_logits_all(**engine, *prefill_seq, tokens);
  // Token by token after a 5-token prompt: every row must agree with prefill's.
  auto seq = (*engine)->new_sequence();
  std::vector<int32_t> head(tokens.begin(), tokens.begin() + 5);
  auto rows = engine_logits_all(**engine, *seq, head);
  for (size_t i = 5; i < tokens.size(); ++i) {
    auto logits = (*engine)->decode(*seq, tokens[i]);
    ASSERT_TRUE(logits.ok());
    rows.insert(rows.end(), logits->begin(), logits->end());
  }
  ASSERT_EQ(rows.size(), prefill.size());
  EXPECT_LT(normalized_max_error(rows, prefill), 1e-5);
  EXPECT_EQ(seq->n_past(), int32_t(tokens.size()));
}

TEST_P(EngineShapes, PagedCacheMatchesContiguous) {
  auto model = make_model();
  ASSERT_TRUE(model);
  const auto tokens = random_tokens(model->config().n_vocab, 50, 3);
  // One page covering the whole context is a contiguous cache.
  std::vector<float> reference;
  for (int32_t page_size : {1024, 1, 7, 16}) {
    auto engine = Engine::create(model, {.page_size = page_size});
    ASSERT_TRUE(engine.ok());
    auto seq = (*engine)->new_sequence();
    std::vector<int32_t> first(tokens.begin(), tokens.begin() + 20), rest(tokens.begin() + 20, tokens.end());
    auto logits = engine_logits_all(**engine, *seq, first);
    auto more = engine_logits_all(**engine, *seq, rest);
    logits.insert(logits.end(), more.begin(), more.end());
    const int64_t pages_per_head = (50 + page_size - 1) / page_size;
    EXPECT_EQ(seq->pages_held(), pages_per_head * model->config().n_layers * model->config().n_kv_heads)
        << "page_size " << page_size;
    if (reference.empty()) reference = logits;
    else EXPECT_LT(normalized_max_error(logits, reference), 1e-5) << "page_size " << page_size;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Shapes, EngineShapes,
    ::testing::Values(ShapeCase{"gqa_tied_f32", 4, 2, 64, true, gguf::TensorType::F32},
                      ShapeCase{"mha_untied_f32", 4, 4, 64, false, gguf::TensorType::F32},
                      ShapeCase{"gqa4_untied_q8_0", 8, 2, 128, false, gguf::TensorType::Q8_0},
                      ShapeCase{"mqa_tied_q4_1", 4, 1, 64, true, gguf::TensorType::Q4_1},
                      ShapeCase{"gqa_tied_f16", 6, 3, 96, true, gguf::TensorType::F16}),
    [](const auto& info) { return std::string(info.param.name); });

TEST(KvCache, PagesComeFromTheFreeListAndGoBack) {
  auto pool = std::make_shared<KvPagePool>(KvCacheShape{2, 2, 8, 4}, /*pages_per_chunk=*/8);
  std::vector<float> k(8, 1.0f), v(8, 2.0f);
  {
    KvSequence seq(pool);
    for (int t = 0; t < 9; ++t)
      for (int l = 0; l < 2; ++l)
        for (int h = 0; h < 2; ++h) seq.append(l, h, k.data(), v.data(), t);
    // 9 tokens in pages of 4 -> 3 pages per (layer, head), 12 in all.
    EXPECT_EQ(seq.pages_held(), 12);
    EXPECT_EQ(pool->pages_in_use(), 12);
    EXPECT_EQ(pool->bytes_in_use(), 12 * 2 * 4 * 8 * int64_t(sizeof(float)));
    EXPECT_EQ(pool->pages_reserved(), 16);
    EXPECT_EQ(seq.v_row(1, 1, 8)[0], 2.0f);
    EXPECT_EQ(seq.table(1, 1).positions.back(), 8);
  }
  EXPECT_EQ(pool->pages_in_use(), 0);
  EXPECT_EQ(pool->peak_bytes_in_use(), 12 * pool->page_bytes());
  pool->trim();
  EXPECT_EQ(pool->pages_reserved(), 0);
  // Freed pages are reused before the pool grows.
  KvSequence again(pool);
  again.append(0, 0, k.data(), v.data(), 0);
  EXPECT_EQ(pool->pages_reserved(), 8);
}

TEST(Engine, RejectsContextOverflowAndBadTokens) {
  SyntheticModelSpec spec;
  spec.name = "ctx_limit";
  spec.context_length = 32;
  auto model = load_synthetic(spec);
  ASSERT_TRUE(model);
  auto engine = Engine::create(model);
  ASSERT_TRUE(engine.ok());
  auto seq = (*engine)->new_sequence();
  std::vector<int32_t> too_long(33, 5);
  auto r = (*engine)->prefill(*seq, too_long);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("context length exceeded"), std::string::npos);
  auto bad = (*engine)->decode(*seq, model->config().n_vocab);
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("outside the vocabulary"), std::string::npos);
  EXPECT_FALSE(Engine::create(model, {.page_size = 0}).ok());
}

TEST(Engine, PerplexityWindowsScoreEveryTokenOnce) {
  SyntheticModelSpec spec;
  spec.name = "ppl";
  auto model = load_synthetic(spec);
  ASSERT_TRUE(model);
  auto engine = Engine::create(model);
  ASSERT_TRUE(engine.ok());
  const auto tokens = random_tokens(model->config().n_vocab, 100, 5);
  // One window over everything equals the mean NLL computed from the logits.
  const auto logits = naive_forward(*model, tokens);
  const int64_t v = model->config().n_vocab;
  double nll = 0;
  for (size_t t = 0; t + 1 < tokens.size(); ++t) {
    const double* row = &logits[t * size_t(v)];
    const double mx = *std::max_element(row, row + v);
    double sum = 0;
    for (int64_t i = 0; i < v; ++i) sum += std::exp(row[i] - mx);
    nll -= row[tokens[t + 1]] - mx - std::log(sum);
  }
  auto full = perplexity(**engine, tokens, 100, 100);
  ASSERT_TRUE(full.ok());
  EXPECT_EQ(full->tokens_scored, 99);
  EXPECT_NEAR(full->mean_nll, nll / 99.0, 1e-4);
  auto windows = perplexity(**engine, tokens, 32, 16);
  ASSERT_TRUE(windows.ok());
  EXPECT_EQ(windows->tokens_scored, 99);
  EXPECT_GT(windows->windows, 5);
  EXPECT_FALSE(perplexity(**engine, tokens, 32, 64).ok());
  // Windows that do not overlap: nothing predicts a window's first token, so
  // it is not scored (31 + 31 + 31 + 3 of the 100).
  auto apart = perplexity(**engine, tokens, 32, 32);
  ASSERT_TRUE(apart.ok());
  EXPECT_EQ(apart->windows, 4);
  EXPECT_EQ(apart->tokens_scored, 96);
  double by_window = 0;
  for (size_t begin = 0; begin < tokens.size(); begin += 32) {
    const std::vector<int32_t> window(tokens.begin() + long(begin), tokens.begin() + long(std::min(begin + 32, tokens.size())));
    auto one = perplexity(**engine, window, 32, 32);
    ASSERT_TRUE(one.ok());
    by_window += one->mean_nll * double(one->tokens_scored);
  }
  EXPECT_NEAR(apart->mean_nll, by_window / 96.0, 1e-9);
}

TEST(Engine, PerplexityOf4096TokensInWindowsOf512Scores4088) {
  SyntheticModelSpec spec;
  spec.name = "ppl4096";
  auto model = load_synthetic(spec);
  ASSERT_TRUE(model);
  auto engine = Engine::create(model);
  ASSERT_TRUE(engine.ok());
  const auto tokens = random_tokens(model->config().n_vocab, 4096, 6);
  auto r = perplexity(**engine, tokens, 512, 512);
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_EQ(r->windows, 8);
  EXPECT_EQ(r->tokens_scored, 8 * 511);
}

TEST(Engine, GreedyGenerationIsDeterministicAndStreamsWholeCharacters) {
  SyntheticModelSpec spec;
  spec.name = "gen";
  auto model = load_synthetic(spec);
  ASSERT_TRUE(model);
  auto engine = Engine::create(model);
  ASSERT_TRUE(engine.ok());
  const auto prompt = model->tokenizer().encode("the quick brown fox", false, false);
  std::string text_a, text_b;
  auto a = generate(**engine, prompt, 20, {}, [&](const std::string& s) { text_a += s; });
  auto b = generate(**engine, prompt, 20, {}, [&](const std::string& s) { text_b += s; });
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens, b->tokens);
  EXPECT_EQ(text_a, model->tokenizer().decode(a->tokens));
  EXPECT_EQ(text_a, text_b);
  // Seeded sampling repeats with the same seed.
  auto s1 = generate(**engine, prompt, 20, {.temperature = 1.0f, .top_p = 0.9f, .seed = 42}, nullptr);
  auto s2 = generate(**engine, prompt, 20, {.temperature = 1.0f, .top_p = 0.9f, .seed = 42}, nullptr);
  ASSERT_TRUE(s1.ok() && s2.ok());
  EXPECT_EQ(s1->tokens, s2->tokens);
}

TEST(Utf8Stream, HoldsBackIncompleteSequences) {
  Utf8Stream s;
  const std::string euro = "\xE2\x82\xAC";
  EXPECT_EQ(s.push("a" + euro.substr(0, 1)), "a");
  EXPECT_EQ(s.push(euro.substr(1, 1)), "");
  EXPECT_EQ(s.push(euro.substr(2) + "b"), euro + "b");
  EXPECT_EQ(s.push("\xF0\x9F"), "");
  EXPECT_EQ(s.flush(), "\xF0\x9F");
}

TEST(Sampler, GreedyTopPAndValidation) {
  std::vector<float> logits{0.1f, 3.0f, 2.9f, -1.0f};
  auto greedy = Sampler::create({});
  ASSERT_TRUE(greedy.ok());
  EXPECT_EQ(greedy->sample(logits), 1);
  // A tiny nucleus keeps only the top token whatever the temperature.
  auto narrow = Sampler::create({.temperature = 5.0f, .top_p = 0.01f, .seed = 3});
  ASSERT_TRUE(narrow.ok());
  for (int i = 0; i < 50; ++i) EXPECT_EQ(narrow->sample(logits), 1);
  // Temperature sampling visits more than one token.
  auto hot = Sampler::create({.temperature = 1.0f, .top_p = 1.0f, .seed = 3});
  ASSERT_TRUE(hot.ok());
  std::set<int32_t> seen;
  for (int i = 0; i < 200; ++i) seen.insert(hot->sample(logits));
  EXPECT_GE(seen.size(), 3u);
  EXPECT_FALSE(Sampler::create({.temperature = -1.0f}).ok());
  EXPECT_FALSE(Sampler::create({.top_p = 0.0f}).ok());
}

}  // namespace test_engine
}  // namespace inferlab
