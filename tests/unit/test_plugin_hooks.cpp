// Every hook's decision is carried out by the engine: the probe plugin makes a
// decision through each hook, and the engine's logits must equal an independent
// reference forward pass that applies the same decision (naive_reference.h).
// Memory effects (pages freed by eviction) and the engine's counters are
// checked directly.
#include <gtest/gtest.h>

#include <fstream>
#include <numeric>

#include "plugin_test_support.h"

namespace inferlab {
namespace test_plugin_hooks {

using test::NaivePolicy;

constexpr int kPrompt = 20;  // prefill call (step 0); then decode calls
constexpr int kDecode = 8;   // token t >= kPrompt is decoded in call t - kPrompt + 1
constexpr int32_t kPageSize = 4;

int64_t call_of(int64_t t) { return t < kPrompt ? 0 : t - kPrompt + 1; }

std::shared_ptr<Model> hook_model() {
  static std::shared_ptr<Model> model = [] {
    SyntheticModelSpec spec;
    spec.name = "hooks";
    spec.n_layers = 3;
    spec.n_ff = 96;
    return test::load_synthetic(spec);
  }();
  return model;
}

ParamValues params(std::initializer_list<std::pair<const std::string, ParamValue>> values) {
  return ParamValues(std::map<std::string, ParamValue>(values));
}

struct HookRun {
  EngineCounters engine;
  std::map<std::string, double> plugin;
};

// Runs the probe with `p` over a prompt plus forced decode tokens and compares
// every logit row against the reference under `policy`.
HookRun expect_matches_reference(const ParamValues& p, const NaivePolicy& policy) {
  auto model = hook_model();
  auto engine = Engine::create(model, EngineOptions{kPageSize, 0, 0});
  EXPECT_TRUE(engine.ok());
  const auto tokens = test::random_tokens(model->config().n_vocab, kPrompt + kDecode, 5);
  const std::vector<int32_t> prompt(tokens.begin(), tokens.begin() + kPrompt);
  const std::vector<int32_t> forced(tokens.begin() + kPrompt, tokens.end());
  test::ActiveMethod active = test::activate_method(**engine, "probe", p);
  HookRun run;
  if (active.handle.get() == nullptr) return run;
  const auto got = test::run_trace(**engine, active.handle.get(), prompt, kDecode, forced);
  const auto want = test::naive_forward(*model, tokens, policy);
  EXPECT_EQ(got.logits.size(), want.size());
  EXPECT_LT(test::normalized_max_error(got.logits, want), 1e-4);
  run.engine = (*engine)->counters();
  run.plugin = active.handle->counters();
  return run;
}

TEST(PluginHooks, DensePluginAndIdleProbeReproduceDenseLogits) {
  EXPECT_DENSE_EQUIVALENT(hook_model(), "dense", ParamValues{});
  EXPECT_DENSE_EQUIVALENT(hook_model(), "probe", ParamValues{});
  // Decode selection of every page is dense too.
  EXPECT_DENSE_EQUIVALENT(hook_model(), "probe", params({{"select_pages", std::string("0,1,2,3,4,5,6,7,8,9,10,11,12,13")}}));
}

TEST(PluginHooks, EvictedTokensAreNoLongerAttendedTo) {
  // Positions 4..7 are dropped after the prefill call: later calls must not see them.
  NaivePolicy policy;
  policy.key_visible = [](int32_t, int32_t, int64_t t, int64_t j) { return !(j >= 4 && j <= 7 && call_of(t) > 0); };
  const auto run = expect_matches_reference(params({{"evict_positions", std::string("4,5,6,7")}}), policy);
  const auto& c = hook_model()->config();
  EXPECT_EQ(run.engine.tokens_evicted, 4 * c.n_layers * c.n_kv_heads);
}

TEST(PluginHooks, EvictionInsideAPageDuringDecode) {
  NaivePolicy policy;
  policy.key_visible = [](int32_t, int32_t, int64_t t, int64_t j) { return !(j == 5 && call_of(t) > 2); };
  const auto run =
      expect_matches_reference(params({{"evict_positions", std::string("5")}, {"evict_step", int64_t{2}}}), policy);
  EXPECT_EQ(run.engine.tokens_evicted, hook_model()->config().n_layers * hook_model()->config().n_kv_heads);
}

TEST(PluginHooks, CachePositionsReRotateKeysAfterEviction) {
  // Positions 4..7 leave after the prefill call; later tokens take cache indices
  // as positions, and the keys behind the gap move down by 4.
  NaivePolicy policy;
  policy.key_visible = [](int32_t, int32_t, int64_t t, int64_t j) { return !(j >= 4 && j <= 7 && call_of(t) > 0); };
  policy.query_position = [](int64_t t) { return call_of(t) == 0 ? t : t - 4; };
  policy.key_position = [](int64_t t, int64_t j) { return call_of(t) == 0 || j < 4 ? j : j - 4; };
  expect_matches_reference(params({{"evict_positions", std::string("4,5,6,7")}, {"cache_positions", true}}), policy);
  // Without eviction, cache indices are the positions: dense.
  EXPECT_DENSE_EQUIVALENT(hook_model(), "probe", params({{"cache_positions", true}}));
}

TEST(PluginHooks, CachePositionsStreamPastTheContextLength) {
  auto model = hook_model();
  auto engine = Engine::create(model, EngineOptions{kPageSize, 24, 0});
  ASSERT_TRUE(engine.ok());
  // Evict position p - 16 when token p arrives: at most 17 tokens are ever stored.
  std::string evict;
  for (int p = 0; p < 80; ++p) evict += std::to_string(p) + ",";
  for (bool cache : {true, false}) {
    test::ActiveMethod active = test::activate_method(
        **engine, "probe", params({{"evict_positions", evict}, {"evict_step", int64_t{-1}}, {"cache_positions", cache}}));
    ASSERT_NE(active.handle.get(), nullptr);
    // The probe drops every listed position present, so feed 16 tokens, then evict only what falls out.
    auto seq = (*engine)->new_sequence();
    active.handle->begin_sequence((*engine)->shape());
    Status s = ok_status();
    for (int p = 0; p < 60 && s.ok(); ++p) s = (*engine)->forward(*seq, std::vector<int32_t>{p % 50}, 1, {});
    if (cache) {
      EXPECT_TRUE(s.ok()) << s.message();
      EXPECT_EQ(seq->n_past(), 60);
      EXPECT_LE(seq->table(0, 0).n_tokens(), 1);
    } else {
      ASSERT_FALSE(s.ok());
      EXPECT_NE(s.message().find("context length exceeded"), std::string::npos) << s.message();
    }
  }
}

TEST(PluginHooks, EvictionReturnsPagesToTheFreeList) {
  auto model = hook_model();
  const auto& c = model->config();
  auto engine = Engine::create(model, EngineOptions{kPageSize, 0, 0});
  ASSERT_TRUE(engine.ok());
  test::ActiveMethod active = test::activate_method(**engine, "probe", params({{"evict_positions", std::string("4,5,6,7,9")}}));
  ASSERT_NE(active.handle.get(), nullptr);
  auto seq = (*engine)->new_sequence();
  active.handle->begin_sequence((*engine)->shape());
  const auto prompt = test::random_tokens(c.n_vocab, kPrompt, 3);
  ASSERT_TRUE((*engine)->prefill(*seq, prompt).ok());
  // 20 tokens - 5 evicted = 15 stored: 4 pages per (layer, kv head) instead of 5.
  const int64_t heads = int64_t(c.n_layers) * c.n_kv_heads;
  EXPECT_EQ(seq->pages_held(), 4 * heads);
  EXPECT_EQ((*engine)->pool().pages_in_use(), 4 * heads);
  // Eviction runs right after each layer's attention, so at most one layer at a
  // time holds the fifth page: the peak is 4 pages per head plus one per kv head.
  EXPECT_EQ((*engine)->pool().peak_bytes_in_use(), (4 * heads + c.n_kv_heads) * (*engine)->pool().page_bytes());
  const HeadPageTable& t = seq->table(1, 1);
  std::vector<int32_t> expected_positions = {0, 1, 2, 3, 8, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19};
  EXPECT_EQ(t.positions, expected_positions);
  // Freed pages are reused before the pool grows.
  const int64_t reserved = (*engine)->pool().pages_reserved();
  auto other = (*engine)->new_sequence();
  (void)(*engine)->set_method(nullptr, 0);
  ASSERT_TRUE((*engine)->prefill(*other, std::vector<int32_t>(size_t(kPageSize), 1)).ok());
  EXPECT_EQ((*engine)->pool().pages_reserved(), reserved);
  // Compaction kept the remaining rows intact: keys equal a fresh dense cache's.
  auto dense_seq = (*engine)->new_sequence();
  ASSERT_TRUE((*engine)->prefill(*dense_seq, prompt).ok());
  for (int32_t i = 0; i < t.n_tokens(); ++i) {
    const float* a = seq->k_row(1, 1, i);
    const float* b = dense_seq->k_row(1, 1, t.positions[size_t(i)]);
    EXPECT_TRUE(std::equal(a, a + c.head_dim, b)) << "stored token " << i;
  }
}

TEST(PluginHooks, SelectedPagesRestrictDecodeAttention) {
  NaivePolicy policy;
  policy.key_visible = [](int32_t, int32_t, int64_t t, int64_t j) {
    if (call_of(t) == 0 || j == t) return true;
    return j / kPageSize == 0 || j / kPageSize == 2;
  };
  const auto run = expect_matches_reference(params({{"select_pages", std::string("0,2")}}), policy);
  const auto& c = hook_model()->config();
  const int64_t per_step = int64_t(c.n_layers) * c.n_kv_heads;
  EXPECT_EQ(run.engine.decode_steps, kDecode);
  EXPECT_EQ(run.engine.decode_pages_read, 2 * per_step * kDecode);
  EXPECT_EQ(run.engine.decode_keys_read, 2 * kPageSize * per_step * kDecode);
  EXPECT_NEAR(run.plugin.at("mass_outside_selection"), 0.0, 1e-9);
  EXPECT_NEAR(run.plugin.at("mass_sum"), run.plugin.at("mass_expected"), 1e-3 * run.plugin.at("mass_expected"));
  EXPECT_EQ(run.plugin.count("select_query_size_wrong"), 0u);
}

TEST(PluginHooks, SelectedTokensRestrictDecodeAttention) {
  NaivePolicy policy;
  policy.key_visible = [](int32_t, int32_t, int64_t t, int64_t j) {
    return call_of(t) == 0 || j == t || j == 1 || j == 3 || j == 17;
  };
  const auto run = expect_matches_reference(params({{"select_tokens", std::string("1,3,17")}}), policy);
  const auto& c = hook_model()->config();
  EXPECT_EQ(run.engine.decode_keys_read, 3 * int64_t(c.n_layers) * c.n_kv_heads * kDecode);
}

TEST(PluginHooks, PrefillPatternComputesOnlyTheGivenBlocks) {
  // Block 4, window 1: each prefill query reads block 0 and its own block.
  NaivePolicy policy;
  policy.key_visible = [](int32_t, int32_t, int64_t t, int64_t j) {
    return call_of(t) > 0 || j / 4 == 0 || j / 4 == t / 4;
  };
  const auto run = expect_matches_reference(params({{"pattern_block", int64_t{4}}}), policy);
  const auto& c = hook_model()->config();
  EXPECT_EQ(run.engine.sparse_prefill_heads, int64_t(c.n_layers) * c.n_heads);
}

TEST(PluginHooks, LayerPlanSkipsExactlyThoseLayersWithKvFromHidden) {
  NaivePolicy policy;
  policy.runs_layer = [](int32_t l, int64_t t) { return !(l == 1 && call_of(t) == 0); };
  const auto run = expect_matches_reference(params({{"skip_layers", std::string("1")}, {"skip_step", int64_t{0}}}),
                                            policy);
  EXPECT_EQ(run.engine.layers_skipped, 1);
}

TEST(PluginHooks, LayerPlanSkipsLayersWithoutKv) {
  NaivePolicy policy;
  policy.runs_layer = [](int32_t l, int64_t t) { return !((l == 0 || l == 2) && call_of(t) == 0); };
  policy.skipped_kv_none = true;
  const auto run = expect_matches_reference(
      params({{"skip_layers", std::string("0,2")}, {"skip_step", int64_t{0}}, {"kv_fill", std::string("none")}}),
      policy);
  EXPECT_EQ(run.engine.layers_skipped, 2);
}

TEST(PluginHooks, EarlyExitSkipsTheRemainingLayers) {
  NaivePolicy policy;
  policy.runs_layer = [](int32_t l, int64_t t) { return !(call_of(t) == 3 && l > 0); };
  const auto run =
      expect_matches_reference(params({{"exit_after_layer", int64_t{0}}, {"exit_step", int64_t{3}}}), policy);
  EXPECT_EQ(run.plugin.at("early_exits"), 1);
  EXPECT_EQ(run.engine.layers_skipped, hook_model()->config().n_layers - 1);
}

TEST(PluginHooks, ComponentMaskComputesOnlyTheGivenHeadsAndNeurons) {
  NaivePolicy policy;
  policy.head_on = [](int32_t, int32_t h) { return h != 1; };
  policy.neuron_on = [](int32_t, int32_t j) { return j % 3 == 0; };
  const auto run = expect_matches_reference(params({{"mask_heads", std::string("1")}, {"neuron_stride", int64_t{3}}}),
                                            policy);
  const auto& c = hook_model()->config();
  const int64_t layer_calls = int64_t(c.n_layers) * (1 + kDecode);
  EXPECT_EQ(run.engine.heads_skipped, layer_calls);
  EXPECT_EQ(run.engine.neurons_skipped, layer_calls * (c.n_ff - (c.n_ff + 2) / 3));
}

TEST(PluginHooks, AttentionFeedbackDeliversProbabilityMassPerKey) {
  const auto run = expect_matches_reference(ParamValues{}, NaivePolicy{});
  const auto& c = hook_model()->config();
  EXPECT_EQ(run.plugin.at("attention_calls"), double(c.n_layers * c.n_kv_heads * (1 + kDecode)));
  // Each query row's probabilities sum to one, per head of the group.
  EXPECT_NEAR(run.plugin.at("mass_sum"), run.plugin.at("mass_expected"), 1e-3 * run.plugin.at("mass_expected"));
  EXPECT_EQ(run.plugin.count("mass_size_wrong"), 0u);
  EXPECT_GT(run.plugin.at("head_output_norm_sum"), 0.0);
}

TEST(PluginHooks, LoadHookSeesWeightsAndWritesArtifacts) {
  auto model = hook_model();
  auto engine = Engine::create(model, EngineOptions{kPageSize, 0, 0});
  ASSERT_TRUE(engine.ok());
  const auto root = test::temp_path("artifact-root");
  const PluginEntry* entry = test::plugin_registry().find("probe");
  ASSERT_NE(entry, nullptr);
  auto handle = test::plugin_registry().create("probe", params({{"write_artifact", true}}));
  ASSERT_TRUE(handle.ok());
  ASSERT_TRUE(load_method(*handle->get(), *entry, **engine, root).ok());
  const auto file = artifact_dir("probe", model->checksum(), root) / "probe-artifact.txt";
  std::ifstream in(file);
  std::string line;
  std::getline(in, line);
  EXPECT_EQ(line, model->checksum());
  const auto& embd = model->weights().token_embd;
  const double sum = std::accumulate(embd.begin(), embd.end(), 0.0, [](double a, float b) { return a + b; });
  EXPECT_DOUBLE_EQ((*handle)->counters().at("weights_token_embd_sum"), sum);
  EXPECT_EQ((*handle)->counters().at("weights_attn_q_layer0_size"), double(model->weights().layers[0].wq.size()));
}

// A method that breaks the rules: the engine must refuse its decision with an
// error, not crash or silently ignore it.
class BadMethod : public Method {
 public:
  int mode = 0;
  bool select_kv(const StepInfo& step, const KvView&, int32_t, int32_t, std::span<const float>,
                 KvSelection& s) override {
    if (mode != 0 || !step.decode()) return false;
    s.indices = {2, 1};  // not ascending
    return true;
  }
  bool plan_layers(const StepInfo&, LayerPlan& plan) override {
    if (mode != 1) return false;
    plan.run.resize(1);
    return true;
  }
  void evict(const StepInfo&, const KvView&, int32_t, int32_t, std::vector<int32_t>& drop) override {
    if (mode == 2) drop.push_back(1000);
  }
  bool mask_components(const StepInfo&, int32_t, std::span<const float>, ComponentMask& m) override {
    if (mode != 3) return false;
    m.all_neurons = false;
    m.neurons = {5, 5};
    return true;
  }
};

TEST(PluginHooks, InvalidDecisionsAreReportedAsErrors) {
  auto engine = Engine::create(hook_model(), EngineOptions{kPageSize, 0, 0});
  ASSERT_TRUE(engine.ok());
  const std::vector<std::string> expected = {"decode selection", "layer plan", "eviction of token 1000",
                                             "component mask"};
  for (int mode = 0; mode < 4; ++mode) {
    BadMethod bad;
    bad.mode = mode;
    ASSERT_TRUE((*engine)->set_method(&bad, kAllHooks).ok());
    auto seq = (*engine)->new_sequence();
    auto s = (*engine)->forward(*seq, std::vector<int32_t>(12, 3), 12, {});
    if (s.ok()) s = (*engine)->forward(*seq, std::vector<int32_t>{4}, 1, {});
    ASSERT_FALSE(s.ok()) << "mode " << mode;
    EXPECT_NE(s.message().find(expected[size_t(mode)]), std::string::npos) << s.message();
  }
}

}  // namespace test_plugin_hooks
}  // namespace inferlab
