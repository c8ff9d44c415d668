// Batched calls (Engine::forward_batch): several sequences' rows in one call,
// GEMMs over all of them, attention per sequence over its own pages. A
// sequence gives the same logits inside a batch as alone; a batch whose plans
// differ runs its sequences one by one; bad batches are refused naming the item.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <set>

#include "plugin_test_support.h"

namespace inferlab {
namespace test_forward_batch {

std::shared_ptr<Model> model() { return test::gqa_test_model("batch", 5); }

std::unique_ptr<Engine> cpu_engine(int32_t page_size = 4) {
  auto engine = Engine::create(model(), EngineOptions{page_size, 0, 0});
  EXPECT_TRUE(engine.ok());
  return engine.ok() ? std::move(*engine) : nullptr;
}

using Rows = std::vector<std::vector<float>>;  // per sequence: its logits rows, concatenated

// Each sequence alone: its prompt, then `steps` decode tokens (fixed).
Rows run_alone(Engine& engine, const std::vector<std::vector<int32_t>>& prompts, const std::vector<int32_t>& next,
               int steps) {
  Rows out(prompts.size());
  for (size_t i = 0; i < prompts.size(); ++i) {
    auto seq = engine.new_sequence();
    auto sink = [&](int64_t, std::span<const float> l) { out[i].insert(out[i].end(), l.begin(), l.end()); };
    EXPECT_TRUE(engine.forward(*seq, prompts[i], 0, sink).ok());
    for (int s = 0; s < steps; ++s) EXPECT_TRUE(engine.forward(*seq, std::vector<int32_t>{next[size_t(s)]}, 0, sink).ok());
  }
  return out;
}

// The same in batches: every prompt in the first step, then one decode step of all.
Rows run_batched(Engine& engine, const std::vector<std::vector<int32_t>>& prompts, const std::vector<int32_t>& next,
                 int steps) {
  Rows out(prompts.size());
  std::vector<std::unique_ptr<KvSequence>> seqs;
  for (size_t i = 0; i < prompts.size(); ++i) seqs.push_back(engine.new_sequence());
  std::vector<std::vector<int32_t>> tokens(prompts.size());
  for (int s = -1; s < steps; ++s) {
    std::vector<Engine::BatchItem> items;
    for (size_t i = 0; i < prompts.size(); ++i) {
      tokens[i] = s < 0 ? prompts[i] : std::vector<int32_t>{next[size_t(s)]};
      auto* o = &out[i];
      items.push_back({seqs[i].get(), tokens[i], 0,
                       [o](int64_t, std::span<const float> l) { o->insert(o->end(), l.begin(), l.end()); }});
    }
    auto st = engine.forward_batch(items);
    EXPECT_TRUE(st.ok()) << (st.ok() ? "" : st.message());
  }
  return out;
}

std::vector<std::vector<int32_t>> prompts(int32_t vocab) {
  return {test::random_tokens(vocab, 13, 1), test::random_tokens(vocab, 5, 2), test::random_tokens(vocab, 9, 3)};
}

TEST(ForwardBatch, DenseLogitsInsideABatchEqualThoseAlone) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  const auto p = prompts(engine->config().n_vocab);
  const std::vector<int32_t> next = {7, 3, 11, 2};
  const Rows alone = run_alone(*engine, p, next, 4);
  engine->reset_counters();
  const Rows batched = run_batched(*engine, p, next, 4);
  for (size_t i = 0; i < p.size(); ++i) {
    ASSERT_EQ(batched[i].size(), alone[i].size()) << i;
    EXPECT_LT(test::normalized_max_error(batched[i], alone[i]), 1e-5) << "sequence " << i;
  }
  const EngineCounters& c = engine->counters();
  EXPECT_EQ(c.batched_calls, 5);
  EXPECT_EQ(c.batched_sequences, 15);
  EXPECT_EQ(c.batch_fallbacks, 0);
  EXPECT_EQ(c.forward_calls, 15);  // one per sequence and step, as alone
  EXPECT_EQ(c.decode_steps, 12);
  EXPECT_EQ(c.logits_rows, 13 + 5 + 9 + 12);
}

TEST(ForwardBatch, TheTrafficCountersAreThoseOfTheSequencesAlone) {
  auto engine = cpu_engine();
  const auto p = prompts(engine->config().n_vocab);
  const std::vector<int32_t> next = {1, 2};
  (void)run_alone(*engine, p, next, 2);
  const EngineCounters alone = engine->counters();
  engine->reset_counters();
  (void)run_batched(*engine, p, next, 2);
  const EngineCounters& batched = engine->counters();
  EXPECT_EQ(batched.decode_keys_read, alone.decode_keys_read);
  EXPECT_EQ(batched.decode_kv_bytes_read, alone.decode_kv_bytes_read);
  EXPECT_EQ(batched.decode_pages_read, alone.decode_pages_read);
  EXPECT_EQ(batched.decode_layers_run, alone.decode_layers_run);
}

// Layer plans per sequence: even sequence ids skip layer 1, odd ones do not.
class PlanBySequence final : public Method {
 public:
  bool plan_layers(const StepInfo& step, LayerPlan& plan) override {
    if (step.sequence % 2 == 0) plan.run[1] = 0;
    return true;
  }
};

TEST(ForwardBatch, SequencesWhosePlansDifferRunOneByOneWithTheirOwnPlans) {
  auto engine = cpu_engine();
  PlanBySequence method;
  ASSERT_TRUE(engine->set_method(&method, hooks_of<PlanBySequence>()).ok());
  const auto p = prompts(engine->config().n_vocab);
  const std::vector<int32_t> next = {4, 5};
  const Rows alone = run_alone(*engine, p, next, 2);
  const EngineCounters a = engine->counters();
  engine->reset_counters();
  auto spacer = engine->new_sequence();  // the batched sequences' ids get the alone ones' parity
  const Rows batched = run_batched(*engine, p, next, 2);
  const EngineCounters& b = engine->counters();
  EXPECT_EQ(b.batch_fallbacks, 3);
  EXPECT_EQ(b.batched_calls, 0);
  EXPECT_EQ(b.layers_skipped, a.layers_skipped);
  for (size_t i = 0; i < p.size(); ++i) {
    ASSERT_EQ(batched[i].size(), alone[i].size());
    EXPECT_LT(test::normalized_max_error(batched[i], alone[i]), 1e-6) << i;
  }
  (void)engine->set_method(nullptr, 0);
}

TEST(ForwardBatch, ASharedLayerPlanRunsBatched) {
  auto engine = cpu_engine();
  class SkipLayerOne final : public Method {
   public:
    bool plan_layers(const StepInfo&, LayerPlan& plan) override {
      plan.run[1] = 0;
      return true;
    }
  } method;
  ASSERT_TRUE(engine->set_method(&method, hooks_of<SkipLayerOne>()).ok());
  const auto p = prompts(engine->config().n_vocab);
  const std::vector<int32_t> next = {4, 5, 6};
  const Rows alone = run_alone(*engine, p, next, 3);
  const EngineCounters a = engine->counters();
  engine->reset_counters();
  const Rows batched = run_batched(*engine, p, next, 3);
  const EngineCounters& b = engine->counters();
  EXPECT_EQ(b.batch_fallbacks, 0);
  EXPECT_EQ(b.batched_calls, 4);
  EXPECT_EQ(b.layers_skipped, a.layers_skipped);
  EXPECT_EQ(b.kv_fills_propagated, a.kv_fills_propagated);
  for (size_t i = 0; i < p.size(); ++i) EXPECT_LT(test::normalized_max_error(batched[i], alone[i]), 1e-5) << i;
  (void)engine->set_method(nullptr, 0);
}

TEST(ForwardBatch, EveryHookSeesTheSequenceItDecidesForInsideABatch) {
  auto engine = cpu_engine();
  struct Witness final : public Method {
    std::set<std::pair<std::string, uint64_t>> seen;
    int32_t page_budget(const StepInfo& s, const KvView&, int32_t, int32_t) override {
      seen.emplace("page_budget", s.sequence);
      return -1;
    }
    bool select_kv(const StepInfo& s, const KvView& kv, int32_t l, int32_t g, std::span<const float>,
                   KvSelection&) override {
      seen.emplace("select_kv", s.sequence);
      EXPECT_EQ(kv.n_tokens(l, g), s.first_position);  // this sequence's cache, before its new token
      return false;
    }
    void on_attention(const StepInfo& s, const KvView& kv, const AttentionStats& st) override {
      seen.emplace("on_attention", s.sequence);
      EXPECT_EQ(int32_t(st.key_mass.size()), kv.n_tokens(st.layer, st.kv_head));
    }
    void evict(const StepInfo& s, const KvView&, int32_t, int32_t, std::vector<int32_t>&) override {
      seen.emplace("evict", s.sequence);
    }
  } method;
  ASSERT_TRUE(engine->set_method(&method, hooks_of<Witness>()).ok());
  auto a = engine->new_sequence(), b = engine->new_sequence();
  const std::vector<int32_t> pa = {1, 2, 3}, pb = {4, 5}, da = {6}, db = {7};
  ASSERT_TRUE(engine->forward_batch(std::vector<Engine::BatchItem>{{a.get(), pa, 3, {}}, {b.get(), pb, 2, {}}}).ok());
  ASSERT_TRUE(engine->forward_batch(std::vector<Engine::BatchItem>{{a.get(), da, 0, {}}, {b.get(), db, 0, {}}}).ok());
  EXPECT_EQ(engine->counters().batched_calls, 2);
  for (const char* hook : {"page_budget", "select_kv", "on_attention", "evict"}) {
    EXPECT_EQ(method.seen.count({hook, a->id()}), 1u) << hook;
    EXPECT_EQ(method.seen.count({hook, b->id()}), 1u) << hook;
  }
  EXPECT_EQ(a->n_past(), 4);
  EXPECT_EQ(b->n_past(), 3);
  (void)engine->set_method(nullptr, 0);
}

TEST(ForwardBatch, BadBatchesAreRefusedNamingTheItem) {
  auto engine = cpu_engine();
  auto a = engine->new_sequence(), b = engine->new_sequence();
  const std::vector<int32_t> ok = {1, 2}, bad = {1, engine->config().n_vocab + 5};
  auto twice = engine->forward_batch(std::vector<Engine::BatchItem>{{a.get(), ok, 2, {}}, {a.get(), ok, 2, {}}});
  ASSERT_FALSE(twice.ok());
  EXPECT_EQ(twice.message(), "forward_batch: items 0 and 1 are the same sequence");
  auto token = engine->forward_batch(std::vector<Engine::BatchItem>{{a.get(), ok, 2, {}}, {b.get(), bad, 2, {}}});
  ASSERT_FALSE(token.ok());
  EXPECT_NE(token.message().find("forward_batch: item 1: "), std::string::npos) << token.message();
  EXPECT_EQ(a->n_past(), 0);  // refused before any token ran
  auto none = engine->forward_batch(std::vector<Engine::BatchItem>{{nullptr, ok, 2, {}}});
  ASSERT_FALSE(none.ok());
  EXPECT_EQ(none.message(), "forward_batch: item 0 has no sequence");
  EXPECT_TRUE(engine->forward_batch({}).ok());
}

}  // namespace test_forward_batch
}  // namespace inferlab
