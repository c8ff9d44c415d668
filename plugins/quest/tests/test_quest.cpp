// Quest: dense when its budget covers everything; the pages it selects on its
// own pages (select_kv) and the budget it gives the engine on the cache's
// pages; both paths agree; its bounds live with each sequence.
#include <gtest/gtest.h>

#include <algorithm>
#include <vector>

#include "inferlab/testing.h"

namespace inferlab {
namespace test_quest {

// The project's small GQA test model (2 layers, 4 query heads, 2 kv heads).
std::shared_ptr<Model> model() { return test::gqa_test_model("kv-plugins", 1); }

TEST(Quest, KeepingEverythingIsDense) {
  EXPECT_DENSE_EQUIVALENT(model(), "quest", test::params({{"token_budget", int64_t{100000}}, {"page_size", int64_t{4}}}));
  EXPECT_DENSE_EQUIVALENT(model(), "quest", test::params({{"token_budget", int64_t{4}}, {"dense_layers", int64_t{2}}}));
}

// Quest pages that are not the cache's pages: the plugin keeps its own bounds
// and selects tokens through select_kv.
TEST(Quest, QuestSelectsThePagesWithTheLargestBoundPlusTheLast) {
  MethodHandle quest =
      test::make_method("quest", test::params({{"token_budget", int64_t{8}}, {"page_size", int64_t{4}}, {"dense_layers", int64_t{1}}}));
  ASSERT_NE(quest.get(), nullptr);
  quest->begin_sequence(test::tiny_shape());
  const auto state = quest->new_sequence_state(test::tiny_shape());  // its own pages' bounds, per sequence
  ASSERT_NE(state, nullptr);
  auto at = [&](int64_t step, int32_t first, int32_t n) { return StepInfo{step, first, n, 1, state.get()}; };
  test::FakeKv kv(2, 4);  // cache pages of 2 tokens; Quest pages of 4
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
  MethodHandle wide = test::make_method("quest", test::params({{"token_budget", int64_t{64}}, {"page_size", int64_t{4}}}));
  wide->begin_sequence(test::tiny_shape());
  const auto wide_state = wide->new_sequence_state(test::tiny_shape());
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
TEST(Quest, QuestGivesTheEngineItsBudgetWhenItsPagesAreTheCachePages) {
  MethodHandle quest =
      test::make_method("quest", test::params({{"token_budget", int64_t{8}}, {"page_size", int64_t{4}}, {"dense_layers", int64_t{1}}}));
  ASSERT_NE(quest.get(), nullptr);
  quest->begin_sequence(test::tiny_shape());
  test::FakeKv kv(4, 4);
  for (int32_t p = 0; p < 20; ++p) kv.add(p, {0.1f, 0, 0, 0});
  EXPECT_EQ(quest->page_budget(StepInfo{3, 20, 1}, kv, 1, 0), 2);  // 8 tokens / 4 per page, of 5 pages
  EXPECT_EQ(quest->page_budget(StepInfo{3, 20, 1}, kv, 0, 0), 0);  // a dense layer
  EXPECT_EQ(quest->page_budget(StepInfo{0, 0, 20}, kv, 1, 0), 0);  // prefill
  KvSelection none;
  EXPECT_FALSE(quest->select_kv(StepInfo{3, 20, 1}, kv, 1, 0, std::vector<float>(8, 1.0f), none));
  MethodHandle wide = test::make_method("quest", test::params({{"token_budget", int64_t{64}}, {"page_size", int64_t{4}}}));
  wide->begin_sequence(test::tiny_shape());
  EXPECT_EQ(wide->page_budget(StepInfo{3, 20, 1}, kv, 1, 0), 0);  // 16 pages cover all 5
  const auto counters = quest->counters();
  EXPECT_EQ(counters.at("decode_selections"), 1);  // the decode step of a sparse layer
  EXPECT_EQ(counters.at("pages_selected"), 2);
  EXPECT_EQ(counters.at("pages_available"), 5);
}

// Quest with its own pages of 4 on caches with pages of 4 and 2: the same keys
// read and the same attention (its pages coincide with the cache's in the first).
void expect_own_pages_match_cache_pages(const std::string& gqa) {
  const auto prompt = test::random_tokens(100, 40, 2), forced = test::random_tokens(100, 6, 3);
  std::vector<std::vector<float>> logits;
  std::vector<int64_t> keys;
  for (int32_t cache_page : {4, 2}) {
    auto engine = Engine::create(model(), EngineOptions{cache_page, 0, 0});
    ASSERT_TRUE(engine.ok());
    test::ActiveMethod active = test::activate_method(
        **engine, "quest",
        test::params({{"token_budget", int64_t{8}}, {"page_size", int64_t{4}}, {"dense_layers", int64_t{1}},
                      {"gqa", gqa}}));
    ASSERT_NE(active.handle.get(), nullptr);
    logits.push_back(test::run_trace(**engine, active.handle.get(), prompt, 6, forced).logits);
    keys.push_back((*engine)->counters().decode_keys_read);
  }
  EXPECT_EQ(keys[0], keys[1]);
  EXPECT_LT(test::normalized_max_error(logits[0], logits[1]), 1e-5);
}

// The plugin's own pages and the engine's give the same attention when they coincide.
TEST(Quest, QuestOnCachePagesMatchesQuestOnItsOwnPages) { expect_own_pages_match_cache_pages("sum"); }

TEST(Quest, QuestReadsOnlyItsBudgetInTheEngine) {
  auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  test::ActiveMethod active = test::activate_method(
      **engine, "quest", test::params({{"token_budget", int64_t{8}}, {"page_size", int64_t{4}}, {"dense_layers", int64_t{1}}}));
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

// min_pages: a budget of fewer pages still reads min_pages pages (the
// reference reads at least 3), the last page among them; the default, 1, and 0
// read what token_budget says, at least the last page.
TEST(Quest, QuestReadsAtLeastMinPages) {
  const auto with = [](int64_t min_pages) {
    return test::params({{"token_budget", int64_t{4}}, {"page_size", int64_t{4}}, {"dense_layers", int64_t{1}},
                         {"min_pages", min_pages}});
  };
  test::FakeKv kv(4, 4);
  for (int32_t p = 0; p < 20; ++p) kv.add(p, {0.1f, 0, 0, 0});
  for (int64_t min_pages : {0, 1, 3}) {
    MethodHandle quest = test::make_method("quest", with(min_pages));
    ASSERT_NE(quest.get(), nullptr);
    quest->begin_sequence(test::tiny_shape());
    EXPECT_EQ(quest->page_budget(StepInfo{3, 20, 1}, kv, 1, 0), std::max<int64_t>(min_pages, 1));  // of 5 pages
  }
  MethodHandle covering = test::make_method("quest", with(5));  // 5 pages of 5: every page, read densely
  covering->begin_sequence(test::tiny_shape());
  EXPECT_EQ(covering->page_budget(StepInfo{3, 20, 1}, kv, 1, 0), 0);
  EXPECT_DENSE_EQUIVALENT(model(), "quest", with(100000));

  // On its own pages (select_kv): page 2 bounds highest, pages 0, 1 and 3 tie
  // (the lower wins), page 4 is the last.
  test::FakeKv own(2, 4);
  for (int32_t p = 0; p < 20; ++p) own.add(p, {p == 9 ? 5.0f : 0.1f, p == 13 ? -6.0f : 0.0f, 0, 0});
  MethodHandle quest = test::make_method("quest", with(3));
  quest->begin_sequence(test::tiny_shape());
  const auto state = quest->new_sequence_state(test::tiny_shape());
  const std::vector<float> q = {1, 0, 0, 0, 0.5f, 0, 0, 0};
  KvSelection sel;
  EXPECT_TRUE(quest->select_kv(StepInfo{3, 20, 1, 1, state.get()}, own, 1, 0, q, sel));
  std::vector<int32_t> want;
  for (int32_t p : {0, 2, 4})
    for (int32_t t = 4 * p; t < 4 * p + 4; ++t) want.push_back(t);
  EXPECT_EQ(sel.indices, want);

  // In the engine, on the cache's pages (page 4) and on its own (cache page 2):
  // layer 0 dense (40..44 cached tokens: 10, 11, 11, 11, 11 pages), layer 1
  // min_pages pages per kv head and step.
  const auto prompt = test::random_tokens(100, 40, 2), forced = test::random_tokens(100, 5, 3);
  const int64_t dense_pages = 2 * (10 + 11 + 11 + 11 + 11);
  std::vector<int64_t> keys;
  for (int32_t cache_page : {4, 2})
    for (int64_t min_pages : {1, 3}) {
      auto engine = Engine::create(model(), EngineOptions{cache_page, 0, 0});
      ASSERT_TRUE(engine.ok());
      test::ActiveMethod active = test::activate_method(**engine, "quest", with(min_pages));
      ASSERT_NE(active.handle.get(), nullptr);
      test::run_trace(**engine, active.handle.get(), prompt, 5, forced);
      const EngineCounters& c = (*engine)->counters();
      EXPECT_EQ(c.decode_steps, 5);
      if (cache_page == 4) {  // pages of the cache; on its own pages the plugin selects tokens
        EXPECT_EQ(c.decode_pages_read, dense_pages + 2 * min_pages * 5);
      }
      EXPECT_EQ(active.handle->counters().at("pages_selected"), 2 * min_pages * 5);
      keys.push_back(c.decode_keys_read);
    }
  EXPECT_EQ(keys[0], keys[2]);  // the same keys on either path
  EXPECT_EQ(keys[1], keys[3]);
  EXPECT_LT(keys[0], keys[1]);
}

// gqa = "per_head": on its own pages each query head of a group selects its
// pages by its own bound and the selection lists their union, each token with
// the heads that read it; on the cache's pages the engine does the same
// (BoundScope::QueryHead; the mechanism: test_page_budget_per_head.cpp).
TEST(Quest, PerHeadSelectsEachQueryHeadsOwnPages) {
  const auto with = [](const std::string& gqa) {
    return test::params({{"token_budget", int64_t{8}}, {"page_size", int64_t{4}}, {"dense_layers", int64_t{1}},
                         {"gqa", gqa}});
  };
  MethodHandle per_head = test::make_method("quest", with("per_head"));
  MethodHandle summed = test::make_method("quest", with("sum"));
  ASSERT_NE(per_head.get(), nullptr);
  ASSERT_NE(summed.get(), nullptr);
  EXPECT_EQ(per_head->bound_scope(), BoundScope::QueryHead);
  EXPECT_EQ(summed->bound_scope(), BoundScope::KvHead);
  ModelShape shape = test::tiny_shape();
  shape.n_heads = 4;  // groups of two query heads
  per_head->begin_sequence(shape);
  const auto state = per_head->new_sequence_state(shape);
  test::FakeKv kv(2, 4);  // cache pages of 2 tokens; Quest pages of 4
  // Page 2 holds a key far along +x, page 3 one far along -y.
  for (int32_t p = 0; p < 20; ++p) kv.add(p, {p == 9 ? 5.0f : 0.1f, p == 13 ? -6.0f : 0.0f, 0, 0});
  // Head 0 looks along +x (page 2 bounds highest), head 1 along -y (page 3).
  const std::vector<float> q = {1, 0, 0, 0, 0, -1, 0, 0};
  KvSelection sel;
  EXPECT_TRUE(per_head->select_kv(StepInfo{3, 20, 1, 1, state.get()}, kv, 1, 0, q, sel));
  EXPECT_EQ(sel.unit, KvSelection::Unit::Tokens);
  std::vector<int32_t> tokens;
  std::vector<uint32_t> heads;
  for (auto [page, mask] : {std::pair{2, 0b01u}, std::pair{3, 0b10u}, std::pair{4, 0b11u}})  // the last: both
    for (int32_t t = 4 * page; t < 4 * page + 4; ++t) {
      tokens.push_back(t);
      heads.push_back(mask);
    }
  EXPECT_EQ(sel.indices, tokens);
  EXPECT_EQ(sel.heads, heads);
  // Summed over the group, page 3 (6.1) beats page 2 (5): both heads read pages 3 and 4.
  summed->begin_sequence(shape);
  const auto summed_state = summed->new_sequence_state(shape);
  KvSelection one;
  EXPECT_TRUE(summed->select_kv(StepInfo{3, 20, 1, 1, summed_state.get()}, kv, 1, 0, q, one));
  EXPECT_TRUE(one.heads.empty());
  EXPECT_EQ(one.indices, std::vector<int32_t>(tokens.begin() + 4, tokens.end()));
  // On the cache's pages the engine selects: the plugin only gives the budget, as with "sum".
  test::FakeKv cache(4, 4);
  for (int32_t p = 0; p < 20; ++p) cache.add(p, {0.1f, 0, 0, 0});
  EXPECT_EQ(per_head->page_budget(StepInfo{3, 20, 1}, cache, 1, 0), 2);
}

// Both paths of per_head read the same keys and give the same attention when
// Quest's pages coincide with the cache's.
TEST(Quest, PerHeadOnCachePagesMatchesPerHeadOnItsOwnPages) { expect_own_pages_match_cache_pages("per_head"); }

// Quest's own-page bounds live with each sequence (SequenceState): two
// sequences decoded in turn give what each gives alone, and a copied sequence
// carries its bounds along.
TEST(Quest, QuestKeepsItsBoundsPerSequence) {
  auto engine = Engine::create(model(), EngineOptions{16, 0, 0});  // Quest's pages of 4 are its own
  ASSERT_TRUE(engine.ok());
  const ParamValues p = test::params({{"token_budget", int64_t{12}}, {"page_size", int64_t{4}}, {"dense_layers", int64_t{0}}});
  const auto a = test::random_tokens(model()->config().n_vocab, 60, 1), b = test::random_tokens(model()->config().n_vocab, 60, 2);
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
  const size_t v = size_t(model()->config().n_vocab);
  EXPECT_EQ(from_copy, std::vector<float>(want_a.end() - long(9 * v), want_a.end()));
}

TEST(Quest, BatchInvariance) {
  EXPECT_BATCH_INVARIANT(model(), "quest", test::params({{"token_budget", int64_t{8}}, {"page_size", int64_t{4}}}));
}

}  // namespace test_quest
}  // namespace inferlab
