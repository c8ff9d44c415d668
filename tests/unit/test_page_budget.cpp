// The engine's selection of pages by key bound (kHookPageBudget, Quest's
// mechanism): the CPU engine keeps per-page key extrema and selects what a
// method computing the same bounds itself from the KvView selects, so the
// logits are identical; the bounds follow eviction, interleaved sequences and
// clones. The policy itself on crafted inputs: test_page_bounds_twin.cpp.
#include <gtest/gtest.h>

#include "bound_reference_method.h"
#include "plugin_test_support.h"

namespace inferlab {
namespace test_page_budget {

using test::BoundMethod;

constexpr int32_t kPageSize = 4;

std::shared_ptr<Model> gqa_model() { return test::gqa_test_model("bounds", 7); }

struct MethodRun {
  std::vector<float> logits;
  EngineCounters counters;
};

MethodRun run(BoundMethod& method, const std::vector<int32_t>& tokens, int32_t prompt) {
  auto engine = Engine::create(gqa_model(), EngineOptions{kPageSize, 0, 0});
  EXPECT_TRUE(engine.ok());
  EXPECT_TRUE((*engine)->set_method(&method, method.hooks()).ok());
  const std::vector<int32_t> head(tokens.begin(), tokens.begin() + prompt);
  const std::vector<int32_t> forced(tokens.begin() + prompt, tokens.end());
  const auto trace = test::run_trace(**engine, &method, head, int(forced.size()), forced);
  return {trace.logits, (*engine)->counters()};
}

TEST(PageBudget, EngineSelectsWhatTheReferenceSelects) {
  const auto tokens = test::random_tokens(gqa_model()->config().n_vocab, 37 + 12, 11);
  for (int32_t budget : {1, 2, 3, 5, 9}) {
    BoundMethod engine_side(true, budget), reference(false, budget);
    const MethodRun got = run(engine_side, tokens, 37), want = run(reference, tokens, 37);
    EXPECT_EQ(got.logits, want.logits) << "budget " << budget;
    EXPECT_EQ(got.counters.decode_pages_read, want.counters.decode_pages_read) << "budget " << budget;
    EXPECT_EQ(got.counters.decode_keys_read, want.counters.decode_keys_read) << "budget " << budget;
    EXPECT_LT(got.counters.decode_keys_read, got.counters.decode_keys_cached) << "budget " << budget;
  }
}

TEST(PageBudget, BoundsAreRebuiltAfterEviction) {
  // One call drops tokens from the middle: every later page then holds other
  // keys than before, so stale bounds would select differently. Dropping one
  // token in a decode step leaves the next step as many stored tokens as the
  // bounds last covered; dropping several leaves fewer.
  const auto tokens = test::random_tokens(gqa_model()->config().n_vocab, 33 + 10, 12);
  for (const auto& [drop, call] : {std::pair{std::set<int32_t>{2}, int64_t{1}},
                                   std::pair{std::set<int32_t>{2, 5, 6, 7, 8, 13, 21}, int64_t{3}}}) {
    BoundMethod engine_side(true, 3, drop, call), reference(false, 3, drop, call);
    const MethodRun got = run(engine_side, tokens, 33), want = run(reference, tokens, 33);
    EXPECT_EQ(got.logits, want.logits) << "eviction in call " << call;
    EXPECT_EQ(got.counters.decode_pages_read, want.counters.decode_pages_read);
    EXPECT_EQ(got.counters.tokens_evicted, int64_t(drop.size()) * 4);  // 2 layers x 2 kv heads
  }
}

// Two sequences decoded in turn, and a clone of one of them, on one engine.
std::vector<float> interleaved(BoundMethod& method) {
  auto engine = Engine::create(gqa_model(), EngineOptions{kPageSize, 0, 0});
  EXPECT_TRUE(engine.ok());
  EXPECT_TRUE((*engine)->set_method(&method, method.hooks()).ok());
  method.begin_sequence((*engine)->shape());
  const int32_t v = gqa_model()->config().n_vocab;
  auto a = (*engine)->new_sequence(), b = (*engine)->new_sequence();
  std::vector<float> out;
  auto keep = [&](Result<std::vector<float>> r) {
    EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.message());
    if (r.ok()) out.insert(out.end(), r->begin(), r->end());
  };
  keep((*engine)->prefill(*a, test::random_tokens(v, 30, 1)));
  keep((*engine)->prefill(*b, test::random_tokens(v, 45, 2)));
  const auto next = test::random_tokens(v, 8, 3);
  for (int i = 0; i < 4; ++i) {
    keep((*engine)->decode(*a, next[size_t(i)]));
    keep((*engine)->decode(*b, next[size_t(i + 4)]));
  }
  auto c = a->clone();
  for (int i = 0; i < 4; ++i) {
    keep((*engine)->decode(*c, next[size_t(i)]));
    keep((*engine)->decode(*a, next[size_t(7 - i)]));
  }
  return out;
}

TEST(PageBudget, InterleavedAndClonedSequencesKeepTheirOwnBounds) {
  BoundMethod engine_side(true, 2), reference(false, 2);
  const auto got = interleaved(engine_side), want = interleaved(reference);
  ASSERT_EQ(got.size(), size_t(2 + 16) * size_t(gqa_model()->config().n_vocab));
  EXPECT_EQ(got, want);
}

TEST(PageBudget, TakesPrecedenceOverSelectKvUnlessNegative) {
  auto engine = Engine::create(gqa_model(), EngineOptions{kPageSize, 0, 0});
  ASSERT_TRUE(engine.ok());
  const int32_t v = gqa_model()->config().n_vocab;
  const auto tokens = test::random_tokens(v, 30, 4);
  const ModelConfig& c = gqa_model()->config();
  const int64_t heads = int64_t(c.n_layers) * c.n_kv_heads;
  {  // page_budget 2 and a select_kv list: the budget decides, select_kv is never asked.
    test::ActiveMethod active = test::activate_method(
        **engine, "probe", ParamValues(std::map<std::string, ParamValue>{{"page_budget", int64_t{2}},
                                                                          {"select_pages", std::string("0")}}));
    ASSERT_NE(active.handle.get(), nullptr);
    test::run_trace(**engine, active.handle.get(), tokens, 3);
    const auto counters = active.handle->counters();
    EXPECT_EQ(counters.count("select_calls"), 0u);
    EXPECT_GT(counters.at("page_budget_calls"), 0);
    EXPECT_EQ((*engine)->counters().decode_pages_read, 2 * heads * 3);
  }
  (*engine)->reset_counters();
  {  // No budget (the probe answers -1): select_kv decides.
    test::ActiveMethod active = test::activate_method(
        **engine, "probe", ParamValues(std::map<std::string, ParamValue>{{"select_pages", std::string("0")}}));
    ASSERT_NE(active.handle.get(), nullptr);
    test::run_trace(**engine, active.handle.get(), tokens, 3);
    EXPECT_GT(active.handle->counters().at("select_calls"), 0);
    EXPECT_EQ((*engine)->counters().decode_pages_read, 1 * heads * 3);
  }
}

}  // namespace test_page_budget
}  // namespace inferlab
