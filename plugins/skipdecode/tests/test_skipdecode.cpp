// SkipDecode: dense when the schedule keeps every layer; the invariant that no
// token reads a layer's KV an earlier token skipped, checked on the engine's
// page tables after every decode step; the linear schedule; bad parameters.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <string>
#include <vector>

#include "inferlab/testing.h"

namespace inferlab {
namespace test_skipdecode {

constexpr int32_t kLayers = 8;

// A synthetic model deep enough for a schedule (8 layers, GQA 4/2).
std::shared_ptr<Model> model() {
  static std::shared_ptr<Model> m = [] {
    SyntheticModelSpec spec;
    spec.name = "skipdecode-8";
    spec.n_layers = kLayers;
    spec.seed = 7;
    return test::load_synthetic(spec);
  }();
  return m;
}

ParamValues schedule(int64_t max_exit, int64_t min_exit, int64_t warmup, int64_t length) {
  return test::params({{"max_exit", max_exit},
                       {"min_exit", min_exit},
                       {"warmup_layers", warmup},
                       {"schedule_length", length}});
}

// The paper's linear exit point, rounded up, written independently of the plugin.
int32_t expected_budget(int32_t max_exit, int32_t min_exit, int32_t length, int64_t g) {
  if (length <= 1) return min_exit;
  const double t = double(std::min<int64_t>(g, length - 1)) / double(length - 1);
  return int32_t(std::ceil(double(max_exit) - double(max_exit - min_exit) * t - 1e-9));
}

// Bit-identical logits, prompt and 16 decode steps, against the dense engine.
void expect_bit_identical(std::shared_ptr<Model> m, const ParamValues& p) {
  auto engine = Engine::create(m, EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  const auto prompt = test::random_tokens(m->config().n_vocab, 24, 3);
  (void)(*engine)->set_method(nullptr, 0);
  const test::ForwardTrace dense = test::run_trace(**engine, nullptr, prompt, 16);
  test::ActiveMethod active = test::activate_method(**engine, "skipdecode", p);
  ASSERT_NE(active.handle.get(), nullptr);
  const int64_t skipped_before = (*engine)->counters().layers_skipped;
  const test::ForwardTrace got = test::run_trace(**engine, active.handle.get(), prompt, 16, dense.tokens);
  (void)(*engine)->set_method(nullptr, 0);
  ASSERT_EQ(got.logits.size(), dense.logits.size());
  ASSERT_EQ(got.logits.size(), size_t(24 + 16) * size_t(m->config().n_vocab));
  EXPECT_EQ(got.logits, dense.logits);  // float equality: bit for bit
  EXPECT_EQ((*engine)->counters().layers_skipped, skipped_before);
  EXPECT_EQ(active.handle->counters().at("decode_tokens"), 16);
  EXPECT_EQ(active.handle->counters().at("avg_layers_per_decode_token"), double(m->config().n_layers));
}

TEST(SkipDecode, ScheduleKeepingEveryLayerIsBitIdenticalToDense) {
  expect_bit_identical(model(), schedule(kLayers, kLayers, 1, 4));
  expect_bit_identical(model(), ParamValues{});  // defaults: 0 = all layers
  EXPECT_DENSE_EQUIVALENT(model(), "skipdecode", schedule(0, 0, 2, 1));
}

// What one decode step did, read off the engine's page tables.
struct StepRecord {
  std::vector<int32_t> ran;  // layers whose cache took the step's token
};

// Prefills `prompt_len` tokens, then decodes `steps` tokens under `p`, and
// after every step checks the invariant on every (layer, kv head): a layer the
// token ran held exactly the tokens before it (every earlier token ran it, so
// attention read them all), a layer it skipped got nothing, and the stored
// positions are always 0..k-1. Returns the layers each step ran.
std::vector<StepRecord> run_and_check(std::shared_ptr<Model> m, const ParamValues& p, int32_t prompt_len,
                                      int32_t steps, test::ActiveMethod* keep = nullptr) {
  std::vector<StepRecord> records;
  auto engine = Engine::create(m, EngineOptions{4, 0, 0});
  EXPECT_TRUE(engine.ok());
  if (!engine.ok()) return records;
  test::ActiveMethod active = test::activate_method(**engine, "skipdecode", p);
  EXPECT_NE(active.handle.get(), nullptr);
  if (active.handle.get() == nullptr) return records;
  active.handle->begin_sequence((*engine)->shape());
  const int32_t L = m->config().n_layers, G = m->config().n_kv_heads;
  auto seq = (*engine)->new_sequence();
  const auto prompt = test::random_tokens(m->config().n_vocab, prompt_len, 11);
  EXPECT_TRUE((*engine)->prefill(*seq, prompt).ok());
  for (int32_t l = 0; l < L; ++l)
    for (int32_t g = 0; g < G; ++g) EXPECT_EQ(seq->table(l, g).n_tokens(), prompt_len) << "prompt, layer " << l;
  std::vector<uint8_t> previous(size_t(L), 1);
  for (int32_t s = 0; s < steps; ++s) {
    const int32_t position = prompt_len + s;
    std::vector<int32_t> before(static_cast<size_t>(L));
    for (int32_t l = 0; l < L; ++l) before[size_t(l)] = seq->table(l, 0).n_tokens();
    const int64_t skipped_before = (*engine)->counters().layers_skipped;
    auto logits = (*engine)->decode(*seq, 100 + s);
    EXPECT_TRUE(logits.ok()) << (logits.ok() ? "" : logits.message());
    if (!logits.ok()) return records;
    StepRecord rec;
    std::vector<uint8_t> now(size_t(L), 0);
    for (int32_t l = 0; l < L; ++l) {
      const int32_t after = seq->table(l, 0).n_tokens();
      EXPECT_TRUE(after == before[size_t(l)] || after == before[size_t(l)] + 1) << "layer " << l;
      if (after == before[size_t(l)] + 1) {
        now[size_t(l)] = 1;
        rec.ran.push_back(l);
        // The token at `position` read this layer's KV: it must hold every earlier token.
        EXPECT_EQ(before[size_t(l)], position) << "step " << s << ": layer " << l << " misses an earlier token";
      }
      for (int32_t g = 0; g < G; ++g) {
        EXPECT_EQ(seq->table(l, g).n_tokens(), after) << "kv heads of layer " << l << " disagree";
        std::vector<int32_t> prefix(static_cast<size_t>(after));
        std::iota(prefix.begin(), prefix.end(), 0);
        EXPECT_EQ(seq->table(l, g).positions, prefix) << "step " << s << ", layer " << l;
      }
      // The set of layers run never grows.
      EXPECT_LE(now[size_t(l)], previous[size_t(l)]) << "step " << s << ": layer " << l << " ran again";
    }
    EXPECT_EQ((*engine)->counters().layers_skipped - skipped_before, L - int32_t(rec.ran.size()));
    previous = now;
    records.push_back(std::move(rec));
  }
  if (keep != nullptr) *keep = std::move(active);
  (void)(*engine)->set_method(nullptr, 0);
  return records;
}

// The layers a budget runs: the bottom `warmup`, then the top ones.
std::vector<int32_t> warmup_and_top(int32_t n_layers, int32_t budget, int32_t warmup) {
  std::vector<int32_t> layers;
  for (int32_t l = 0; l < n_layers; ++l)
    if (l < warmup || l >= n_layers - (budget - warmup)) layers.push_back(l);
  return layers;
}

TEST(SkipDecode, NoTokenReadsKvThatAnEarlierTokenSkipped) {
  for (const int64_t warmup : {0, 1, 2}) {
    SCOPED_TRACE("warmup_layers " + std::to_string(warmup));
    const auto records = run_and_check(model(), schedule(7, 2, warmup, 6), 10, 12);
    ASSERT_EQ(records.size(), 12u);
    for (size_t s = 0; s < records.size(); ++s)
      EXPECT_EQ(records[s].ran,
                warmup_and_top(kLayers, expected_budget(7, 2, 6, int64_t(s)), int32_t(warmup)))
          << "step " << s;
  }
}

TEST(SkipDecode, LayersRunFollowTheLinearSchedule) {
  struct Case {
    int32_t max_exit, min_exit, warmup, length;
  };
  for (const Case c : {Case{8, 1, 1, 8}, Case{6, 3, 1, 5}, Case{kLayers, 2, 2, 10}, Case{5, 3, 0, 1}}) {
    SCOPED_TRACE(std::to_string(c.max_exit) + "->" + std::to_string(c.min_exit) + " over " +
                 std::to_string(c.length));
    test::ActiveMethod active;
    const int32_t steps = 14;
    const auto records = run_and_check(model(), schedule(c.max_exit, c.min_exit, c.warmup, c.length), 6, steps,
                                       &active);
    ASSERT_EQ(records.size(), size_t(steps));
    double total = 0;
    for (int32_t s = 0; s < steps; ++s) {
      const int32_t want = expected_budget(c.max_exit, c.min_exit, c.length, s);
      EXPECT_EQ(int32_t(records[size_t(s)].ran.size()), want) << "step " << s;
      total += want;
    }
    // Clamped after the schedule, and the first step at max_exit (unless the schedule is one token).
    EXPECT_EQ(records.back().ran.size(), size_t(c.min_exit));
    if (c.length > 1) {
      EXPECT_EQ(records.front().ran.size(), size_t(c.max_exit));
    }
    ASSERT_NE(active.handle.get(), nullptr);
    const auto counters = active.handle->counters();
    EXPECT_EQ(counters.at("decode_tokens"), steps);
    EXPECT_DOUBLE_EQ(counters.at("avg_layers_per_decode_token"), total / steps);
    EXPECT_EQ(counters.at("last_budget"), c.min_exit);
  }
}

// The generated index counts from each sequence's own prompt: two sequences
// with different prompts, decoded in turns, each follow their own schedule.
TEST(SkipDecode, ScheduleIsPerSequence) {
  auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  test::ActiveMethod active = test::activate_method(**engine, "skipdecode", schedule(8, 2, 1, 7));
  ASSERT_NE(active.handle.get(), nullptr);
  active.handle->begin_sequence((*engine)->shape());
  auto a = (*engine)->new_sequence();
  auto b = (*engine)->new_sequence();
  ASSERT_TRUE((*engine)->prefill(*a, test::random_tokens(200, 5, 1)).ok());
  for (int32_t s = 0; s < 3; ++s) ASSERT_TRUE((*engine)->decode(*a, 50 + s).ok());
  ASSERT_TRUE((*engine)->prefill(*b, test::random_tokens(200, 9, 2)).ok());
  for (int32_t s = 3; s < 8; ++s) {
    ASSERT_TRUE((*engine)->decode(*a, 50 + s).ok());
    ASSERT_TRUE((*engine)->decode(*b, 60 + s).ok());
  }
  // Layer l holds the prompt plus the decode steps whose budget included it.
  const auto held = [](int32_t prompt, int32_t steps, int32_t l) {
    int32_t n = prompt;
    for (int32_t s = 0; s < steps; ++s) {
      const auto ran = warmup_and_top(kLayers, expected_budget(8, 2, 7, s), 1);
      n += std::find(ran.begin(), ran.end(), l) != ran.end();
    }
    return n;
  };
  for (int32_t l = 0; l < kLayers; ++l) {
    EXPECT_EQ(a->table(l, 1).n_tokens(), held(5, 8, l)) << "layer " << l;
    EXPECT_EQ(b->table(l, 1).n_tokens(), held(9, 5, l)) << "layer " << l;
  }
  (void)(*engine)->set_method(nullptr, 0);
}

// The error of preparing (create + on_load) skipdecode with `p` on an 8-layer model.
std::string refusal(const ParamValues& p) {
  auto handle = test::plugin_registry().create("skipdecode", p);
  if (!handle.ok()) return handle.message();
  auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
  if (!engine.ok()) return "no engine";
  const PluginEntry* entry = test::plugin_registry().find("skipdecode");
  if (entry == nullptr) return "no plugin";
  auto loaded = prepare_method(*handle->get(), *entry, test::resolved_params(*entry, p), **engine,
                               test::temp_path("artifacts"));
  return loaded.ok() ? std::string() : loaded.message();
}

TEST(SkipDecode, BadParametersAreRefusedNamingTheKey) {
  const auto expect_refused = [](const ParamValues& p, const std::string& key) {
    const std::string why = refusal(p);
    EXPECT_FALSE(why.empty()) << "accepted, expected a refusal naming " << key;
    EXPECT_NE(why.find(key), std::string::npos) << why;
  };
  expect_refused(schedule(3, 5, 1, 8), "min_exit");        // min_exit > max_exit
  expect_refused(schedule(5, 0, 1, 8), "min_exit");        // 0 = all 8 layers > max_exit
  expect_refused(schedule(9, 2, 1, 8), "max_exit");        // past the model's 8 layers
  expect_refused(schedule(0, 9, 1, 8), "min_exit");        // past the model's 8 layers
  expect_refused(schedule(6, 2, 3, 8), "warmup_layers");   // warm-up longer than the smallest budget
  expect_refused(schedule(0, 0, 9, 8), "warmup_layers");   // warm-up past the model
  expect_refused(schedule(-1, 2, 1, 8), "max_exit");       // schema bounds
  expect_refused(schedule(6, 2, 1, 0), "schedule_length");
  // A valid one is accepted.
  EXPECT_EQ(refusal(schedule(6, 2, 2, 8)), "");
}

// The real default model (30 layers): the invariant over a 30 -> 10 schedule.
TEST(SkipDecode, DefaultModelKeepsTheInvariant) {
  auto m = test::default_model();
  if (!m) GTEST_SKIP() << "default model smollm2-135m not installed";
  const int32_t L = m->config().n_layers;
  const auto records = run_and_check(m, schedule(0, L / 3, 1, 6), 12, 8);
  ASSERT_EQ(records.size(), 8u);
  for (size_t s = 0; s < records.size(); ++s)
    EXPECT_EQ(records[s].ran, warmup_and_top(L, expected_budget(L, L / 3, 6, int64_t(s)), 1)) << "step " << s;
}

// Sequences at different generated indices have different layer plans, so
// such a batch runs them one by one; at the same index they share one call.
TEST(SkipDecode, BatchInvariance) { EXPECT_BATCH_INVARIANT(model(), "skipdecode", schedule(6, 2, 1, 4)); }

}  // namespace test_skipdecode
}  // namespace inferlab
