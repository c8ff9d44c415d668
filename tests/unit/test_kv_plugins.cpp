// StreamingLLM, H2O and Quest: dense equivalence at budgets that keep
// everything, each policy on crafted inputs (which tokens or pages are kept),
// and what the engine then does (memory bounded, pages read).
#include <gtest/gtest.h>

#include <set>

#include "plugin_test_support.h"

namespace inferlab {
namespace {

std::shared_ptr<Model> kv_model() {
  static std::shared_ptr<Model> model = [] {
    SyntheticModelSpec spec;
    spec.name = "kv-plugins";
    spec.n_layers = 2;
    return test::load_synthetic(spec);
  }();
  return model;
}

ParamValues params(std::initializer_list<std::pair<const std::string, ParamValue>> values) {
  return ParamValues(std::map<std::string, ParamValue>(values));
}

MethodHandle make(const std::string& plugin, const ParamValues& p) {
  auto handle = test::plugin_registry().create(plugin, p);
  EXPECT_TRUE(handle.ok()) << (handle.ok() ? "" : handle.message());
  return handle.ok() ? std::move(*handle) : MethodHandle{};
}

// A KV cache of one (layer, kv head) written by the test.
class FakeKv final : public KvView {
 public:
  FakeKv(int32_t page_size, int32_t head_dim) : page_size_(page_size), head_dim_(head_dim) {}
  void add(int32_t position, std::vector<float> key) {
    positions_.push_back(position);
    keys_.push_back(std::move(key));
  }
  void keep(const std::vector<int32_t>& drop) {
    std::vector<int32_t> p;
    std::vector<std::vector<float>> k;
    for (size_t i = 0; i < keys_.size(); ++i)
      if (std::find(drop.begin(), drop.end(), int32_t(i)) == drop.end()) {
        p.push_back(positions_[i]);
        k.push_back(keys_[i]);
      }
    positions_ = p;
    keys_ = k;
  }
  int32_t page_size() const override { return page_size_; }
  int32_t n_tokens(int32_t, int32_t) const override { return int32_t(keys_.size()); }
  std::span<const int32_t> positions(int32_t, int32_t) const override { return positions_; }
  const float* key(int32_t, int32_t, int32_t t) const override { return keys_[size_t(t)].data(); }
  const float* value(int32_t, int32_t, int32_t t) const override { return keys_[size_t(t)].data(); }

 private:
  int32_t page_size_, head_dim_;
  std::vector<int32_t> positions_;
  std::vector<std::vector<float>> keys_;
};

ModelShape tiny_shape(int32_t n_layers = 2, int32_t n_kv_heads = 2, int32_t head_dim = 4, int32_t page_size = 4) {
  return ModelShape{n_layers, n_kv_heads, n_kv_heads, head_dim, 16, 32, 100, 1024, page_size};
}

TEST(KvPlugins, KeepingEverythingIsDense) {
  EXPECT_DENSE_EQUIVALENT(kv_model(), "streamingllm", params({{"window", int64_t{100000}}}));
  EXPECT_DENSE_EQUIVALENT(kv_model(), "h2o", params({{"heavy", int64_t{100000}}, {"recent", int64_t{100000}}}));
  EXPECT_DENSE_EQUIVALENT(kv_model(), "h2o", params({{"recent_ratio", 1.0}}));
  EXPECT_DENSE_EQUIVALENT(kv_model(), "quest", params({{"token_budget", int64_t{100000}}, {"page_size", int64_t{4}}}));
  EXPECT_DENSE_EQUIVALENT(kv_model(), "quest", params({{"token_budget", int64_t{4}}, {"dense_layers", int64_t{2}}}));
}

TEST(KvPlugins, StreamingLlmKeepsSinksAndTheRecentWindow) {
  auto engine = Engine::create(kv_model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  test::ActiveMethod active =
      test::activate_method(**engine, "streamingllm", params({{"sink_tokens", int64_t{2}}, {"window", int64_t{6}}}));
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

TEST(KvPlugins, StreamingLlmMemoryStaysBoundedPastTheContextLength) {
  auto engine = Engine::create(kv_model(), EngineOptions{4, 32, 0});
  ASSERT_TRUE(engine.ok());
  for (const std::string positions : {"cache", "original"}) {
    test::ActiveMethod active = test::activate_method(
        **engine, "streamingllm",
        params({{"sink_tokens", int64_t{4}}, {"window", int64_t{12}}, {"positions", positions}}));
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

// H2O's policy is the engine's retention (tests/unit/test_retention.cpp); the
// plugin names the rule and the budgets, per layer and kv head.
TEST(KvPlugins, H2oAsksTheEngineToKeepHeavyHittersAndTheRecentWindow) {
  MethodHandle h2o = make("h2o", params({{"heavy", int64_t{2}}, {"recent", int64_t{2}}}));
  ASSERT_NE(h2o.get(), nullptr);
  const RetentionPolicy policy = h2o->retention_policy();
  EXPECT_EQ(policy.score, RetentionScore::AccumulatedMass);
  EXPECT_EQ(policy.scope, RetentionScope::PerHead);
  const RetentionBudget b = h2o->retention_budget(StepInfo{0, 0, 8}, 0, 0);
  EXPECT_EQ(b.sink, 0);
  EXPECT_EQ(b.recent, 2);
  EXPECT_EQ(b.heavy, 2);
}

TEST(KvPlugins, H2oBudgetsByRatioAndPerLayerAndHead) {
  MethodHandle h2o = make("h2o", params({{"heavy", int64_t{2}}, {"recent", int64_t{2}}, {"overrides", std::string("1=1:1;1.1=3:0")}}));
  ASSERT_NE(h2o.get(), nullptr);
  auto kept = [&](Method& m, int32_t layer, int32_t head) {
    const RetentionBudget b = m.retention_budget(StepInfo{0, 0, 8}, layer, head);
    return b.sink + b.recent + b.heavy;
  };
  EXPECT_EQ(kept(*h2o.get(), 0, 0), 4);
  EXPECT_EQ(kept(*h2o.get(), 1, 0), 2);
  EXPECT_EQ(kept(*h2o.get(), 1, 1), 3);
  MethodHandle ratio = make("h2o", params({{"heavy_ratio", 0.25}, {"recent_ratio", 0.125}}));
  EXPECT_EQ(kept(*ratio.get(), 0, 0), 3);  // ceil(0.25 * 8) + ceil(0.125 * 8) of the 8 tokens seen
  EXPECT_EQ(kept(*ratio.get(), 0, 0), 3);
  EXPECT_EQ(ratio->retention_budget(StepInfo{5, 99, 1}, 0, 0).heavy, 25);  // 100 tokens seen after the call
  auto bad = test::plugin_registry().create("h2o", params({{"overrides", std::string("1=x")}}));
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("1=x"), std::string::npos) << bad.message();
}

// Quest pages that are not the cache's pages: the plugin keeps its own bounds
// and selects tokens through select_kv.
TEST(KvPlugins, QuestSelectsThePagesWithTheLargestBoundPlusTheLast) {
  MethodHandle quest =
      make("quest", params({{"token_budget", int64_t{8}}, {"page_size", int64_t{4}}, {"dense_layers", int64_t{1}}}));
  ASSERT_NE(quest.get(), nullptr);
  quest->begin_sequence(tiny_shape());
  const auto state = quest->new_sequence_state(tiny_shape());  // its own pages' bounds, per sequence
  ASSERT_NE(state, nullptr);
  auto at = [&](int64_t step, int32_t first, int32_t n) { return StepInfo{step, first, n, 1, state.get()}; };
  FakeKv kv(2, 4);  // cache pages of 2 tokens; Quest pages of 4
  // 20 tokens, 5 pages; page 2 holds one key far along +x, page 3 one far along -x.
  for (int32_t p = 0; p < 20; ++p) kv.add(p, {p == 9 ? 5.0f : 0.1f, p == 13 ? -6.0f : 0.0f, 0, 0});
  auto tokens_of = [](std::initializer_list<std::pair<int32_t, int32_t>> ranges) {
    std::vector<int32_t> out;
    for (auto [a, b] : ranges)
      for (int32_t t = a; t < b; ++t) out.push_back(t);
    return out;
  };
  EXPECT_LT(quest->page_budget(StepInfo{3, 20, 1}, kv, 1, 0), 0);  // not the cache's pages: select_kv decides
  const std::vector<float> q = {1, 0, 0, 0, 0.5f, 0, 0, 0};  // two query heads of the group
  KvSelection sel;
  EXPECT_TRUE(quest->select_kv(at(3, 20, 1), kv, 1, 0, q, sel));
  EXPECT_EQ(sel.unit, KvSelection::Unit::Tokens);
  EXPECT_EQ(sel.indices, tokens_of({{8, 12}, {16, 20}}));  // pages 2 and 4
  // A query along -y bounds page 3 highest (its -6 times a negative query).
  KvSelection neg;
  const std::vector<float> qn = {0, -1, 0, 0, 0, -1, 0, 0};
  EXPECT_TRUE(quest->select_kv(at(3, 20, 1), kv, 1, 0, qn, neg));
  EXPECT_EQ(neg.indices, tokens_of({{12, 20}}));  // pages 3 and 4
  // Dense layers, prefill, and a budget that covers everything are left alone.
  KvSelection none;
  EXPECT_FALSE(quest->select_kv(at(3, 20, 1), kv, 0, 0, q, none));
  EXPECT_FALSE(quest->select_kv(at(0, 0, 20), kv, 1, 0, q, none));
  MethodHandle wide = make("quest", params({{"token_budget", int64_t{64}}, {"page_size", int64_t{4}}}));
  wide->begin_sequence(tiny_shape());
  const auto wide_state = wide->new_sequence_state(tiny_shape());
  EXPECT_FALSE(wide->select_kv(StepInfo{3, 20, 1, 2, wide_state.get()}, kv, 1, 0, q, none));
  // Bounds follow new tokens: a key appended to page 4 changes nothing selected,
  // one that lands in a new page makes that page the last.
  for (int32_t p = 20; p < 22; ++p) kv.add(p, {0.1f, 0, 0, 0});
  KvSelection later;
  EXPECT_TRUE(quest->select_kv(at(4, 22, 1), kv, 1, 0, q, later));
  EXPECT_EQ(later.indices, tokens_of({{8, 12}, {20, 22}}));  // pages 2 and 5
  EXPECT_TRUE(quest->dense_prefill());
}

// Quest pages that are the cache's pages: the plugin gives the engine a page
// budget (the engine's selection: test_page_budget.cpp, test_page_bounds_twin.cpp).
TEST(KvPlugins, QuestGivesTheEngineItsBudgetWhenItsPagesAreTheCachePages) {
  MethodHandle quest =
      make("quest", params({{"token_budget", int64_t{8}}, {"page_size", int64_t{4}}, {"dense_layers", int64_t{1}}}));
  ASSERT_NE(quest.get(), nullptr);
  quest->begin_sequence(tiny_shape());
  FakeKv kv(4, 4);
  for (int32_t p = 0; p < 20; ++p) kv.add(p, {0.1f, 0, 0, 0});
  EXPECT_EQ(quest->page_budget(StepInfo{3, 20, 1}, kv, 1, 0), 2);  // 8 tokens / 4 per page, of 5 pages
  EXPECT_EQ(quest->page_budget(StepInfo{3, 20, 1}, kv, 0, 0), 0);  // a dense layer
  EXPECT_EQ(quest->page_budget(StepInfo{0, 0, 20}, kv, 1, 0), 0);  // prefill
  KvSelection none;
  EXPECT_FALSE(quest->select_kv(StepInfo{3, 20, 1}, kv, 1, 0, std::vector<float>(8, 1.0f), none));
  MethodHandle wide = make("quest", params({{"token_budget", int64_t{64}}, {"page_size", int64_t{4}}}));
  wide->begin_sequence(tiny_shape());
  EXPECT_EQ(wide->page_budget(StepInfo{3, 20, 1}, kv, 1, 0), 0);  // 16 pages cover all 5
  const auto counters = quest->counters();
  EXPECT_EQ(counters.at("decode_selections"), 1);  // the decode step of a sparse layer
  EXPECT_EQ(counters.at("pages_selected"), 2);
  EXPECT_EQ(counters.at("pages_available"), 5);
}

// The plugin's own pages and the engine's give the same attention when they coincide.
TEST(KvPlugins, QuestOnCachePagesMatchesQuestOnItsOwnPages) {
  const auto prompt = test::random_tokens(100, 40, 2), forced = test::random_tokens(100, 6, 3);
  std::vector<std::vector<float>> logits;
  std::vector<int64_t> keys;
  for (int32_t cache_page : {4, 2}) {
    auto engine = Engine::create(kv_model(), EngineOptions{cache_page, 0, 0});
    ASSERT_TRUE(engine.ok());
    test::ActiveMethod active = test::activate_method(
        **engine, "quest", params({{"token_budget", int64_t{8}}, {"page_size", int64_t{4}}, {"dense_layers", int64_t{1}}}));
    ASSERT_NE(active.handle.get(), nullptr);
    logits.push_back(test::run_trace(**engine, active.handle.get(), prompt, 6, forced).logits);
    keys.push_back((*engine)->counters().decode_keys_read);
  }
  EXPECT_EQ(keys[0], keys[1]);
  EXPECT_LT(test::normalized_max_error(logits[0], logits[1]), 1e-5);
}

TEST(KvPlugins, QuestReadsOnlyItsBudgetInTheEngine) {
  auto engine = Engine::create(kv_model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  test::ActiveMethod active = test::activate_method(
      **engine, "quest", params({{"token_budget", int64_t{8}}, {"page_size", int64_t{4}}, {"dense_layers", int64_t{1}}}));
  ASSERT_NE(active.handle.get(), nullptr);
  const auto trace = test::run_trace(**engine, active.handle.get(), test::random_tokens(100, 40, 2), 5);
  const EngineCounters& c = (*engine)->counters();
  // Layer 0 dense (40..44 cached tokens: 10, 11, 11, 11, 11 pages), layer 1: 2
  // pages; per kv head and step.
  EXPECT_EQ(c.decode_steps, 5);
  EXPECT_EQ(c.decode_pages_read, 2 * (10 + 11 + 11 + 11 + 11) + 2 * 2 * 5);
  EXPECT_LT(c.decode_keys_read, c.decode_keys_cached);
  EXPECT_EQ(c.tokens_evicted, 0);
}

}  // namespace
}  // namespace inferlab

namespace inferlab {
namespace {

// Quest's own-page bounds live with each sequence (SequenceState): two
// sequences decoded in turn give what each gives alone, and a copied sequence
// carries its bounds along.
TEST(KvPlugins, QuestKeepsItsBoundsPerSequence) {
  auto engine = Engine::create(kv_model(), EngineOptions{16, 0, 0});  // Quest's pages of 4 are its own
  ASSERT_TRUE(engine.ok());
  const ParamValues p = params({{"token_budget", int64_t{12}}, {"page_size", int64_t{4}}, {"dense_layers", int64_t{0}}});
  const auto a = test::random_tokens(kv_model()->config().n_vocab, 60, 1), b = test::random_tokens(kv_model()->config().n_vocab, 60, 2);
  auto alone = [&](const std::vector<int32_t>& tokens) {
    test::ActiveMethod active = test::activate_method(**engine, "quest", p);
    const std::vector<int32_t> prompt(tokens.begin(), tokens.begin() + 40), forced(tokens.begin() + 40, tokens.end());
    return test::run_trace(**engine, active.handle.get(), prompt, 20, forced).logits;
  };
  const auto want_a = alone(a), want_b = alone(b);
  test::ActiveMethod active = test::activate_method(**engine, "quest", p);
  auto sa = (*engine)->new_sequence(), sb = (*engine)->new_sequence();
  std::vector<float> got_a, got_b;
  auto keep = [](std::vector<float>& into) {
    return [&into](int64_t, std::span<const float> l) { into.insert(into.end(), l.begin(), l.end()); };
  };
  ASSERT_TRUE((*engine)->forward(*sa, std::span<const int32_t>(a.data(), 40), 0, keep(got_a)).ok());
  ASSERT_TRUE((*engine)->forward(*sb, std::span<const int32_t>(b.data(), 40), 0, keep(got_b)).ok());
  std::unique_ptr<KvSequence> copy;
  for (size_t i = 40; i < 60; ++i) {
    ASSERT_TRUE((*engine)->forward(*sa, std::span<const int32_t>(&a[i], 1), 0, keep(got_a)).ok());
    ASSERT_TRUE((*engine)->forward(*sb, std::span<const int32_t>(&b[i], 1), 0, keep(got_b)).ok());
    if (i == 50) copy = sa->clone();
  }
  EXPECT_EQ(got_a, want_a);
  EXPECT_EQ(got_b, want_b);
  EXPECT_GT(active.handle->counters().at("decode_selections"), 0);
  // The copy made after step 50 continues as the original did.
  std::vector<float> from_copy;
  ASSERT_NE(copy, nullptr);
  for (size_t i = 51; i < 60; ++i)
    ASSERT_TRUE((*engine)->forward(*copy, std::span<const int32_t>(&a[i], 1), 0, keep(from_copy)).ok());
  const size_t v = size_t(kv_model()->config().n_vocab);
  EXPECT_EQ(from_copy, std::vector<float>(want_a.end() - long(9 * v), want_a.end()));
}

}  // namespace
}  // namespace inferlab
