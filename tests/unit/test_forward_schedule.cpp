// The one forward schedule and the mechanisms it gives every backend: a
// backend refuses a method it cannot run before any token; a projection
// replaced for one run changes that run only, exactly; truncation then decode
// equals a fresh run; the traffic counters come from the plans; prefill
// patterns of different block sizes are refined to one exactly; every hook
// sees the sequence it decides for.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <set>

#include "bound_reference_method.h"
#include "mixed_blocks_method.h"
#include "engine/plans.h"
#include "plugin_test_support.h"

namespace inferlab {
namespace test_forward_schedule {

ParamValues params(std::initializer_list<std::pair<const std::string, ParamValue>> values) {
  return ParamValues(std::map<std::string, ParamValue>(values));
}

std::shared_ptr<Model> model() {
  static std::shared_ptr<Model> m = [] {
    SyntheticModelSpec spec;
    spec.name = "schedule";
    spec.n_layers = 2;
    spec.n_heads = 4;
    spec.n_kv_heads = 2;
    spec.tied_embeddings = false;  // an output head of its own, to replace
    spec.seed = 3;
    return test::load_synthetic(spec);
  }();
  return m;
}

std::unique_ptr<Engine> cpu_engine(int32_t page_size = 4) {
  auto engine = Engine::create(model(), EngineOptions{page_size, 0, 0});
  EXPECT_TRUE(engine.ok());
  return engine.ok() ? std::move(*engine) : nullptr;
}

TEST(Features, ABackendWithoutAFeatureRefusesTheMethodBeforeAnyToken) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  for (const auto& [key, value, needed] :
       {std::tuple{"kv_pages", "f16", "KV pages in f16"}, std::tuple{"kv_pages", "bf16", "KV pages in bf16"}}) {
    auto handle = test::plugin_registry().create("probe", params({{key, std::string(value)}}));
    ASSERT_TRUE(handle.ok()) << handle.message();
    const PluginEntry* entry = test::plugin_registry().find("probe");
    auto s = engine->set_method(handle->get(), entry->hooks, nullptr, "probe");
    ASSERT_FALSE(s.ok()) << key;
    EXPECT_EQ(s.message(), fmt::format("method probe needs {}, which the cpu backend does not support", needed));
  }
  EXPECT_EQ(engine->counters().forward_calls, 0);
  // What the CPU backend has: f32 pages.
  auto f32 = test::plugin_registry().create("probe", params({{"kv_pages", std::string("f32")}}));
  ASSERT_TRUE(f32.ok());
  EXPECT_TRUE(engine->set_method(f32->get(), kAllHooks).ok());
}

// Logits of a prompt and decode steps under the probe with `p` (dense when empty).
std::vector<float> run_probe(Engine& engine, const ParamValues& p, const std::vector<int32_t>& tokens, bool dense) {
  test::ActiveMethod active;
  if (!dense) active = test::activate_method(engine, "probe", p);
  const std::vector<int32_t> prompt(tokens.begin(), tokens.begin() + 12);
  const std::vector<int32_t> forced(tokens.begin() + 12, tokens.end());
  auto out = test::run_trace(engine, active.handle.get(), prompt, int(forced.size()), forced).logits;
  (void)engine.set_method(nullptr, 0);
  return out;
}

TEST(WeightReplace, AProjectionReplacedForOneRunChangesThatRunExactlyAndOnly) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  const auto tokens = test::random_tokens(model()->config().n_vocab, 20, 4);
  const auto dense = run_probe(*engine, {}, tokens, false);  // the probe deciding nothing
  auto scaled = [&](const std::string& tensor, int64_t layer, double by) {
    return run_probe(*engine, params({{"scale_tensor", tensor}, {"scale_layer", layer}, {"scale_by", by}}), tokens,
                     false);
  };
  // Doubling V doubles the attention output exactly, as doubling W_o does.
  const auto v2 = scaled("attn_v", 1, 2.0), o2 = scaled("attn_output", 1, 2.0);
  EXPECT_NE(v2, dense);
  EXPECT_EQ(v2, o2);
  // Doubling the output head doubles every logit exactly.
  const auto head2 = scaled("output", -1, 2.0);
  ASSERT_EQ(head2.size(), dense.size());
  for (size_t i = 0; i < dense.size(); ++i) ASSERT_EQ(head2[i], 2.0f * dense[i]) << i;
  // The shared model is untouched: the next run is dense again, and a fresh engine agrees.
  EXPECT_EQ(run_probe(*engine, {}, tokens, false), dense);
  auto fresh = cpu_engine();
  EXPECT_EQ(run_probe(*fresh, {}, tokens, false), dense);
  EXPECT_LT(test::normalized_max_error(run_probe(*fresh, {}, tokens, true), dense), 1e-6);
  // A bad replacement is refused at load, naming the tensor.
  auto handle = test::plugin_registry().create("probe", params({{"scale_tensor", std::string("attn_x")}}));
  ASSERT_TRUE(handle.ok());
  WeightOverrides overrides;
  auto loaded = load_method(*handle->get(), *test::plugin_registry().find("probe"), *engine,
                            test::temp_path("artifacts"), &overrides);
  ASSERT_FALSE(loaded.ok());
  EXPECT_NE(loaded.message().find("\"attn_x\" is not a projection"), std::string::npos) << loaded.message();
}

TEST(Truncate, ThenDecodingAgainEqualsAFreshRun) {
  const auto tokens = test::random_tokens(model()->config().n_vocab, 60, 8);
  for (bool bounds : {false, true}) {
    SCOPED_TRACE(bounds ? "page budget" : "dense");
    test::BoundMethod method(true, 3);
    auto engine = cpu_engine();
    ASSERT_NE(engine, nullptr);
    if (bounds) {
      ASSERT_TRUE(engine->set_method(&method, method.hooks()).ok());
    }
    method.begin_sequence(engine->shape());
    auto seq = engine->new_sequence();
    ASSERT_TRUE(engine->prefill(*seq, std::vector<int32_t>(tokens.begin(), tokens.begin() + 30)).ok());
    for (int i = 30; i < 45; ++i) ASSERT_TRUE(engine->decode(*seq, tokens[size_t(i)]).ok());
    ASSERT_TRUE(engine->truncate(*seq, 33).ok());  // back into a page: the bounds of its last page are stale
    EXPECT_EQ(seq->n_past(), 33);
    EXPECT_EQ(seq->table(1, 1).n_tokens(), 33);
    std::vector<std::vector<float>> again, fresh;
    for (int i = 45; i < 55; ++i) {
      auto r = engine->decode(*seq, tokens[size_t(i)]);
      ASSERT_TRUE(r.ok());
      again.push_back(*r);
    }
    auto ref = engine->new_sequence();
    ASSERT_TRUE(engine->prefill(*ref, std::vector<int32_t>(tokens.begin(), tokens.begin() + 30)).ok());
    for (int i = 30; i < 33; ++i) ASSERT_TRUE(engine->decode(*ref, tokens[size_t(i)]).ok());
    for (int i = 45; i < 55; ++i) {
      auto r = engine->decode(*ref, tokens[size_t(i)]);
      ASSERT_TRUE(r.ok());
      fresh.push_back(*r);
    }
    EXPECT_EQ(again, fresh);
    auto bad = engine->truncate(*seq, 44);
    ASSERT_FALSE(bad.ok());
    EXPECT_NE(bad.message().find("44 tokens asked, the sequence has 43"), std::string::npos) << bad.message();
  }
}

TEST(TrafficCounters, EveryMethodCountsKeysPagesAndBytesFromItsPlan) {
  auto engine = cpu_engine(4);
  ASSERT_NE(engine, nullptr);
  const auto& c = model()->config();
  const auto tokens = test::random_tokens(c.n_vocab, 30, 2);
  auto seq = engine->new_sequence();
  ASSERT_TRUE(engine->prefill(*seq, std::vector<int32_t>(tokens.begin(), tokens.begin() + 26)).ok());
  engine->reset_counters();
  ASSERT_TRUE(engine->decode(*seq, tokens[26]).ok());  // dense: 26 cached keys, 7 pages, per (layer, kv head)
  const int64_t heads = int64_t(c.n_layers) * c.n_kv_heads;
  EXPECT_EQ(engine->counters().decode_keys_read, 26 * heads);
  EXPECT_EQ(engine->counters().decode_pages_read, 7 * heads);
  EXPECT_EQ(engine->counters().decode_kv_bytes_read, 26 * heads * 2 * c.head_dim * 4);  // K and V rows in f32
  // Two pages by bound: one full, and the last (3 of 4 slots, 27 stored now).
  test::BoundMethod method(true, 2);
  ASSERT_TRUE(engine->set_method(&method, method.hooks()).ok());
  engine->reset_counters();
  ASSERT_TRUE(engine->decode(*seq, tokens[27]).ok());
  EXPECT_EQ(engine->counters().decode_keys_read, (4 + 3) * heads);
  EXPECT_EQ(engine->counters().decode_pages_read, 2 * heads);
  EXPECT_EQ(engine->counters().decode_keys_cached, 27 * heads);
  EXPECT_EQ(engine->counters().as_map().at("decode_kv_bytes_read"), double((4 + 3) * heads * 2 * c.head_dim * 4));
}

TEST(SparsePlan, EachHeadKeepsItsOwnBlockSizeAndMergesAdjacentBlocks) {
  const PrefillPattern coarse{8, {{0, 0}, {1, 0}, {1, 1}}}, fine{4, {{0, 0}, {2, 0}, {3, 2}, {3, 3}}};
  SparsePlanBuilder builder(3);
  std::vector<std::pair<int32_t, int32_t>> ranges;
  for (auto [head, pattern] : {std::pair{0, &coarse}, std::pair{2, &fine}}) {
    builder.begin_head(head, pattern->block_size, 0, 16);
    for (int32_t qb = 0; qb * pattern->block_size < 16; ++qb) {
      ranges.clear();
      pattern_block_ranges(*pattern, qb, ranges);
      builder.add_block(ranges, {});
    }
  }
  const SparsePlan plan = builder.finish();
  auto at = [&](int32_t head, int32_t qb) {
    const auto s = plan.block_ranges(head, qb);
    return std::vector<int32_t>(s.begin(), s.end());
  };
  EXPECT_EQ(at(0, 0), (std::vector<int32_t>{0, 8}));
  EXPECT_EQ(at(0, 1), (std::vector<int32_t>{0, 16}));  // key blocks 0 and 1 at 8: one range
  EXPECT_FALSE(plan.sparse(1));                        // a dense head is not in the plan
  EXPECT_EQ(at(2, 1), (std::vector<int32_t>{}));
  EXPECT_EQ(at(2, 2), (std::vector<int32_t>{0, 4}));
  EXPECT_EQ(at(2, 3), (std::vector<int32_t>{8, 16}));
  EXPECT_EQ(plan.keys_causal, 2 * (16 * 17 / 2));
}

// Patterns at block sizes 8 and 4 on different heads give what the same
// patterns written at 4 give.
TEST(SparsePlan, MixedBlockSizesGiveTheLogitsOfTheRefinedPatterns) {
  const auto tokens = test::random_tokens(model()->config().n_vocab, 40, 6);
  std::vector<float> logits[2];
  for (int refined = 0; refined < 2; ++refined) {
    test::MixedBlocks method(refined == 1);
    auto engine = cpu_engine();
    ASSERT_TRUE(engine->set_method(&method, kHookPrefillPattern).ok());
    auto seq = engine->new_sequence();
    ASSERT_TRUE(engine->forward(*seq, tokens, 0, [&](int64_t, std::span<const float> l) {
      logits[refined].insert(logits[refined].end(), l.begin(), l.end());
    }).ok());
    EXPECT_EQ(engine->counters().sparse_prefill_heads, 2 * 4);
  }
  EXPECT_EQ(logits[0], logits[1]);
}

// Records the sequence every hook was called for.
class SequenceWitness final : public Method {
 public:
  std::set<std::pair<std::string, uint64_t>> seen;
  void note(const char* hook, const StepInfo& step) { seen.emplace(hook, step.sequence); }
  bool plan_layers(const StepInfo& s, LayerPlan&) override { note("plan_layers", s); return false; }
  int32_t page_budget(const StepInfo& s, const KvView&, int32_t, int32_t) override { note("page_budget", s); return -1; }
  bool select_kv(const StepInfo& s, const KvView&, int32_t, int32_t, std::span<const float>, KvSelection&) override {
    note("select_kv", s);
    return false;
  }
  bool prefill_pattern(const StepInfo& s, int32_t, int32_t, PrefillPattern&) override { note("prefill_pattern", s); return false; }
  void on_attention(const StepInfo& s, const KvView&, const AttentionStats&) override { note("on_attention", s); }
  void evict(const StepInfo& s, const KvView&, int32_t, int32_t, std::vector<int32_t>&) override { note("evict", s); }
  bool exit_after_layer(const StepInfo& s, int32_t, std::span<const float>) override { note("exit_after_layer", s); return false; }
  bool mask_components(const StepInfo& s, int32_t, std::span<const float>, ComponentMask&) override {
    note("mask_components", s);
    return false;
  }
  RetentionBudget retention_budget(const StepInfo& s, int32_t, int32_t) override { note("retention_budget", s); return {}; }
};

TEST(Sequences, EveryHookSeesTheSequenceItDecidesFor) {
  auto engine = cpu_engine();
  SequenceWitness method;
  ASSERT_TRUE(engine->set_method(&method, kAllHooks & ~kHookLoad).ok());
  auto a = engine->new_sequence(), b = engine->new_sequence();
  ASSERT_NE(a->id(), b->id());
  ASSERT_TRUE(engine->prefill(*a, std::vector<int32_t>{1, 2, 3}).ok());
  ASSERT_TRUE(engine->prefill(*b, std::vector<int32_t>{4, 5}).ok());
  ASSERT_TRUE(engine->decode(*a, 6).ok());
  ASSERT_TRUE(engine->decode(*b, 7).ok());
  for (const char* hook : {"plan_layers", "page_budget", "select_kv", "prefill_pattern", "on_attention", "evict",
                           "exit_after_layer", "mask_components", "retention_budget"}) {
    EXPECT_EQ(method.seen.count({hook, a->id()}), 1u) << hook;
    EXPECT_EQ(method.seen.count({hook, b->id()}), 1u) << hook;
  }
  EXPECT_EQ(method.seen.size(), 18u);
}

}  // namespace test_forward_schedule
}  // namespace inferlab
