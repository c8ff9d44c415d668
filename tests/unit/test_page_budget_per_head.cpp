// Selection by key bound per query head (BoundScope::QueryHead, Quest's
// gqa = "per_head"): each query head of a group reads only the pages its own
// bound selects, and its kv head reads their union. Checked against the
// double-precision reference told to select each head's pages from its own
// vectors, against a method computing the selection from the KvView
// (select_kv with head masks), and against the per-kv-head selection on a
// model whose groups have one query head.
#include <gtest/gtest.h>

#include <algorithm>
#include <limits>
#include <map>
#include <numeric>
#include <set>
#include <tuple>

#include "bound_reference_method.h"
#include "inferlab/testing.h"
#include "plugin_test_support.h"

namespace inferlab {
namespace test_page_budget_per_head {

using test::BoundMethod;

constexpr int32_t kPageSize = 4;

// Groups of four query heads, where one selection per head and one per group
// differ most.
std::shared_ptr<Model> wide_group_model() {
  static std::shared_ptr<Model> model = [] {
    SyntheticModelSpec spec;
    spec.name = "per-head-bounds";
    spec.n_embd = 128;
    spec.n_heads = 8;
    spec.n_kv_heads = 2;
    spec.seed = 5;
    return test::load_synthetic(spec);
  }();
  return model;
}

// Multi-head attention: a group of one query head.
std::shared_ptr<Model> mha_model() {
  static std::shared_ptr<Model> model = [] {
    SyntheticModelSpec spec;
    spec.name = "per-head-bounds-mha";
    spec.n_heads = 4;
    spec.n_kv_heads = 4;
    spec.seed = 6;
    return test::load_synthetic(spec);
  }();
  return model;
}

ParamValues quest(int64_t budget, int64_t page_size, const std::string& gqa) {
  return test::params({{"token_budget", budget}, {"page_size", page_size}, {"dense_layers", int64_t{1}},
                       {"gqa", gqa}});
}

// Quest per query head on the reference's own vectors: for decode token t
// (t >= prompt) of a layer >= dense_layers, the pages of the t cached keys,
// each page's bound sum_i max(q_i min_i, q_i max_i) for this head alone, the
// head's best keep - 1 pages but the last (ties to the lower) and the last
// page; token t itself is always read.
struct QuestReference {
  int64_t prompt = 0;
  int32_t dense_layers = 0, keep = 0, page_size = 0;
  std::map<std::tuple<int32_t, int32_t, int64_t>, std::vector<int32_t>> pages;  // (layer, head, t) -> pages read
  double min_gap = std::numeric_limits<double>::infinity();  // closest call at a cut, relative to the scores

  std::vector<bool> select(int32_t l, int32_t h, int64_t t, const std::vector<double>& q,
                           const std::vector<std::vector<double>>& keys) {
    std::vector<bool> read(size_t(t + 1), true);
    const int32_t n_pages = int32_t((t + page_size - 1) / page_size);
    if (t < prompt || l < dense_layers || n_pages <= keep) return read;
    std::vector<double> score(size_t(n_pages - 1), 0.0);
    for (int32_t p = 0; p + 1 < n_pages; ++p)
      for (size_t i = 0; i < q.size(); ++i) {
        double lo = std::numeric_limits<double>::infinity(), hi = -lo;
        for (int64_t j = int64_t(p) * page_size; j < std::min<int64_t>(t, int64_t(p + 1) * page_size); ++j) {
          lo = std::min(lo, keys[size_t(j)][i]);
          hi = std::max(hi, keys[size_t(j)][i]);
        }
        score[size_t(p)] += std::max(q[i] * lo, q[i] * hi);
      }
    std::vector<int32_t> order(size_t(n_pages - 1));
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int32_t a, int32_t b) { return score[size_t(a)] > score[size_t(b)]; });
    if (keep > 1 && keep - 1 < n_pages - 1) {  // the last page taken and the first left
      const double taken = score[size_t(order[size_t(keep - 2)])], left = score[size_t(order[size_t(keep - 1)])];
      min_gap = std::min(min_gap, (taken - left) / (1.0 + std::abs(taken)));
    }
    std::vector<int32_t> chosen(order.begin(), order.begin() + (keep - 1));
    chosen.push_back(n_pages - 1);
    std::sort(chosen.begin(), chosen.end());
    for (int64_t j = 0; j < t; ++j) read[size_t(j)] = std::binary_search(chosen.begin(), chosen.end(), int32_t(j / page_size));
    pages[{l, h, t}] = chosen;
    return read;
  }
};

TEST(BoundPerQueryHead, QuestMatchesAReferenceWhereEachHeadReadsItsOwnPages) {
  auto model = wide_group_model();
  ASSERT_TRUE(model);
  const ModelConfig& c = model->config();
  auto engine = Engine::create(model, EngineOptions{kPageSize, 0, 0});
  ASSERT_TRUE(engine.ok());
  test::ActiveMethod active = test::activate_method(**engine, "quest", quest(12, kPageSize, "per_head"));
  ASSERT_NE(active.handle.get(), nullptr);
  const int prompt = 37, decode = 12;
  const auto tokens = test::random_tokens(c.n_vocab, prompt + decode, 9);
  const std::vector<int32_t> head(tokens.begin(), tokens.begin() + prompt), forced(tokens.begin() + prompt, tokens.end());
  const auto got = test::run_trace(**engine, active.handle.get(), head, decode, forced);

  QuestReference ref;
  ref.prompt = prompt;
  ref.dense_layers = 1;
  ref.keep = 3;  // 12 tokens: 3 pages per query head
  ref.page_size = kPageSize;
  test::NaivePolicy policy;
  policy.select_keys = [&](int32_t l, int32_t h, int64_t t, const std::vector<double>& q,
                           const std::vector<std::vector<double>>& keys) { return ref.select(l, h, t, q, keys); };
  const auto want = test::naive_forward(*model, tokens, policy);
  ASSERT_EQ(ref.pages.size(), size_t(decode) * size_t(c.n_heads));  // layer 1, every head and decode step
  EXPECT_GT(ref.min_gap, 1e-4) << "a near tie at a cut: float and double may select differently";
  EXPECT_LT(test::normalized_max_error(got.logits, want), 1e-4);

  // The traffic counters count the union of each group's pages (layer 0: all of them).
  int64_t pages = 0, keys = 0, union_pages = 0;
  for (int64_t t = prompt; t < prompt + decode; ++t)
    for (int32_t g = 0; g < c.n_kv_heads; ++g) {
      const int32_t n_pages = int32_t((t + kPageSize - 1) / kPageSize);
      pages += n_pages;  // layer 0
      keys += t;
      std::set<int32_t> read;
      for (int32_t h = g * c.group_size(); h < (g + 1) * c.group_size(); ++h)
        for (int32_t p : ref.pages.at({1, h, t})) read.insert(p);
      for (int32_t p : read) keys += std::min<int64_t>(kPageSize, t - int64_t(p) * kPageSize);
      pages += int64_t(read.size());
      union_pages += int64_t(read.size());
    }
  const EngineCounters& counters = (*engine)->counters();
  EXPECT_EQ(counters.decode_pages_read, pages);
  EXPECT_EQ(counters.decode_keys_read, keys);
  // The heads disagree: their union is more than the 3 pages one selection per kv head reads.
  EXPECT_GT(union_pages, 3 * decode * c.n_kv_heads);
  EXPECT_LT(counters.decode_keys_read, counters.decode_keys_cached);
}

struct BoundRun {
  std::vector<float> logits;
  EngineCounters counters;
};

BoundRun run_bound(BoundMethod& method, std::shared_ptr<Model> model, const std::vector<int32_t>& tokens, int prompt) {
  auto engine = Engine::create(model, EngineOptions{kPageSize, 0, 0});
  EXPECT_TRUE(engine.ok());
  auto set = (*engine)->set_method(&method, method.hooks());
  EXPECT_TRUE(set.ok()) << (set.ok() ? "" : set.message());
  const std::vector<int32_t> head(tokens.begin(), tokens.begin() + prompt), forced(tokens.begin() + prompt, tokens.end());
  const auto trace = test::run_trace(**engine, &method, head, int(forced.size()), forced);
  return {trace.logits, (*engine)->counters()};
}

// The engine's selection (page extrema, scores per query head, union) reads
// what a method computing it from the keys lists through select_kv with head
// masks: the same logits, bit for bit, and the same traffic, also after an
// eviction makes the engine rebuild its bounds.
TEST(BoundPerQueryHead, EngineSelectsWhatTheReferenceSelects) {
  auto model = wide_group_model();
  ASSERT_TRUE(model);
  const auto tokens = test::random_tokens(model->config().n_vocab, 41 + 10, 13);
  for (int32_t budget : {1, 2, 3, 5}) {
    BoundMethod engine_side(true, budget, {}, -1, false, true), reference(false, budget, {}, -1, false, true);
    const BoundRun got = run_bound(engine_side, model, tokens, 41), want = run_bound(reference, model, tokens, 41);
    EXPECT_EQ(got.logits, want.logits) << "budget " << budget;
    EXPECT_EQ(got.counters.decode_pages_read, want.counters.decode_pages_read) << "budget " << budget;
    EXPECT_EQ(got.counters.decode_keys_read, want.counters.decode_keys_read) << "budget " << budget;
  }
  BoundMethod engine_side(true, 3, {2, 5, 6, 7, 8, 13}, 3, false, true),
      reference(false, 3, {2, 5, 6, 7, 8, 13}, 3, false, true);
  const BoundRun got = run_bound(engine_side, model, tokens, 41), want = run_bound(reference, model, tokens, 41);
  EXPECT_EQ(got.logits, want.logits) << "after eviction";
  EXPECT_EQ(got.counters.decode_pages_read, want.counters.decode_pages_read);
  EXPECT_GT(got.counters.tokens_evicted, 0);
  // Per query head is not per kv head on this model: another selection, more pages read.
  BoundMethod summed(true, 3, {2, 5, 6, 7, 8, 13}, 3);
  const BoundRun sum = run_bound(summed, model, tokens, 41);
  EXPECT_NE(sum.logits, got.logits);
  EXPECT_LT(sum.counters.decode_pages_read, got.counters.decode_pages_read);
}

// With one query head per kv head the two scopes are the same selection: per
// query head gives the per-kv-head logits bit for bit, on the cache's pages
// (the engine selects) and on Quest's own pages (select_kv with head masks).
TEST(BoundPerQueryHead, OneQueryHeadPerGroupIsPerKvHeadBitForBit) {
  auto model = mha_model();
  ASSERT_TRUE(model);
  const auto tokens = test::random_tokens(model->config().n_vocab, 45 + 8, 4);
  const std::vector<int32_t> head(tokens.begin(), tokens.begin() + 45), forced(tokens.begin() + 45, tokens.end());
  for (int64_t quest_page : {int64_t{kPageSize}, int64_t{8}}) {
    BoundRun runs[2];
    const char* scopes[2] = {"sum", "per_head"};
    for (int i = 0; i < 2; ++i) {
      auto engine = Engine::create(model, EngineOptions{kPageSize, 0, 0});
      ASSERT_TRUE(engine.ok());
      test::ActiveMethod active = test::activate_method(**engine, "quest", quest(12, quest_page, scopes[i]));
      ASSERT_NE(active.handle.get(), nullptr);
      runs[i] = {test::run_trace(**engine, active.handle.get(), head, 8, forced).logits, (*engine)->counters()};
    }
    EXPECT_EQ(runs[0].logits, runs[1].logits) << "Quest pages of " << quest_page;
    EXPECT_EQ(runs[0].counters.decode_keys_read, runs[1].counters.decode_keys_read);
    EXPECT_EQ(runs[0].counters.decode_pages_read, runs[1].counters.decode_pages_read);
    EXPECT_LT(runs[1].counters.decode_keys_read, runs[1].counters.decode_keys_cached);
  }
}

TEST(BoundPerQueryHead, HeadMasksOfASelectionAreChecked) {
  KvSelection sel;
  sel.indices = {0, 2};
  EXPECT_TRUE(check_kv_selection(sel, 12, 4, 1, 0, 4).ok());
  sel.heads = {0b0011, 0b1000};
  EXPECT_TRUE(check_kv_selection(sel, 12, 4, 1, 0, 4).ok());
  sel.heads = {0b0011};
  EXPECT_NE(check_kv_selection(sel, 12, 4, 1, 0, 4).message().find("1 head masks for 2 indices"), std::string::npos);
  sel.heads = {0b0011, 0};
  EXPECT_NE(check_kv_selection(sel, 12, 4, 1, 0, 4).message().find("head mask 0x0 of entry 1"), std::string::npos);
  sel.heads = {0b10000, 1};
  EXPECT_NE(check_kv_selection(sel, 12, 4, 1, 0, 4).message().find("head mask 0x10 of entry 0"), std::string::npos);
}

// Masks are 32 bits: a model with larger groups refuses per-query-head selection
// when the method is set, before any token.
TEST(BoundPerQueryHead, GroupsOfMoreThan32HeadsAreRefused) {
  SyntheticModelSpec spec;
  spec.name = "per-head-bounds-33";
  spec.n_embd = 33 * 8;
  spec.n_heads = 33;
  spec.n_kv_heads = 1;
  spec.n_layers = 1;
  auto model = test::load_synthetic(spec);
  ASSERT_TRUE(model);
  auto engine = Engine::create(model, EngineOptions{kPageSize, 0, 0});
  ASSERT_TRUE(engine.ok());
  BoundMethod per_head(true, 2, {}, -1, false, true), summed(true, 2);
  const Status refused = (*engine)->set_method(&per_head, per_head.hooks(), nullptr, "per-head");
  EXPECT_NE(refused.message().find("method per-head needs key selection per query head, which takes groups of at most "
                                   "32 query heads; this model has 33"),
            std::string::npos)
      << refused.message();
  EXPECT_TRUE((*engine)->set_method(&summed, summed.hooks()).ok());
}

}  // namespace test_page_budget_per_head
}  // namespace inferlab
