// Component masks (mask_components) as Deja Vu uses them: masked heads'
// queries and output columns are not computed (Q and O of the computed heads
// only) and give what zeroing their output columns of W_o gives; the oracle
// keeps each row's largest FFN activations and head outputs of the dense call
// (the kernels on crafted rows, and layer 0 of the engine against a dense
// pass); bad oracle fields refused.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu/activation_sparse.h"
#include "engine/engine.h"
#include "inferlab/testing.h"
#include "plugins/method_context.h"

namespace inferlab {
namespace test_component_selection {

namespace cpu = kernels::cpu;

TEST(ComponentSelection, TopKMagnitudesKeepTheLargestTiesToTheLowerIndex) {
  std::vector<float> x = {1, -3, 2, -2, 0.5f, 3,   // row 0: |3| twice, |2| twice
                          0, 0, 0, 1, 0, 0};       // row 1: one non-zero
  cpu::keep_top_k_magnitudes(x.data(), 2, 6, 3);
  EXPECT_EQ(x, (std::vector<float>{0, -3, 2, 0, 0, 3,  // -3 and 3, then the first 2 (index 2, not 3)
                                   0, 0, 0, 1, 0, 0}));  // 1, then zeros ties to the lower index (they stay 0)
  std::vector<float> y = {4, 5, 6};
  cpu::keep_top_k_magnitudes(y.data(), 1, 3, 3);
  EXPECT_EQ(y, (std::vector<float>{4, 5, 6}));
  cpu::keep_top_k_magnitudes(y.data(), 1, 3, 0);
  EXPECT_EQ(y, (std::vector<float>{0, 0, 0}));
}

TEST(ComponentSelection, GatheredRowsGemvSumsTheListedRows) {
  const int64_t n = 1536, out = 576;
  std::vector<float> wt(static_cast<size_t>(n * out)), x(static_cast<size_t>(n));
  for (size_t i = 0; i < wt.size(); ++i) wt[i] = float(int64_t(i * 7919 % 2001) - 1000) / 1000.0f;
  std::vector<int32_t> rows;
  for (int32_t r = 3; r < n; r += 5) rows.push_back(r);
  for (size_t j = 0; j < rows.size(); ++j) x[j] = float(int64_t(j % 13) - 6) / 4.0f;
  std::vector<float> y(static_cast<size_t>(out), 99.0f);
  cpu::gather_rows_gemv(y.data(), x.data(), wt.data(), rows.data(), int64_t(rows.size()), out);
  for (int64_t o = 0; o < out; ++o) {
    double want = 0;
    for (size_t j = 0; j < rows.size(); ++j) want += double(x[j]) * wt[size_t(rows[j] * out + o)];
    ASSERT_NEAR(y[size_t(o)], want, 1e-4 * (1 + std::fabs(want))) << o;
  }
}

TEST(ComponentSelection, TopHeadsAmongTheComputedByOutputNorm) {
  // 4 heads of 2: norms 1, 5, 5, 9; head 3 not computed.
  std::vector<float> attn = {1, 0, 3, 4, 0, 5, 9, 0};
  const uint8_t computed[] = {1, 1, 1, 0};
  cpu::keep_top_heads(attn.data(), 1, 4, 2, 2, computed);
  EXPECT_EQ(attn, (std::vector<float>{0, 0, 3, 4, 0, 5, 0, 0}));  // 1 and 2 tie at 5; head 3's 9 does not count
  std::vector<float> two = {1, 0, 3, 4, 0, 5, 9, 0};
  cpu::keep_top_heads(two.data(), 1, 4, 2, 1, computed);
  EXPECT_EQ(two, (std::vector<float>{0, 0, 3, 4, 0, 0, 0, 0}));  // the tie to the lower head
}

// Masks heads {1, 3} of every layer (or picks oracle budgets); or, as the
// reference, zeroes those heads' columns of W_o instead.
class HeadsMethod final : public Method {
 public:
  enum class Kind { Mask, ZeroOutput, OracleNeurons, OracleHeads };
  HeadsMethod(Kind kind, int32_t k = 0) : kind_(kind), k_(k) {}
  Status on_load(const LoadContext& ctx) override {
    if (kind_ != Kind::ZeroOutput) return ok_status();
    const int32_t hd = ctx.shape.head_dim, qd = ctx.shape.n_heads * hd;
    for (int32_t l = 0; l < ctx.shape.n_layers; ++l) {
      const auto w = ctx.weights->tensor("attn_output", l);  // (n_embd, q_dim)
      std::vector<float> zeroed(w.begin(), w.end());
      for (int32_t e = 0; e < ctx.shape.n_embd; ++e)
        for (const int32_t h : {1, 3})
          for (int32_t d = 0; d < hd; ++d) zeroed[size_t(e * qd + h * hd + d)] = 0.0f;
      if (auto s = ctx.overrides->replace("attn_output", l, zeroed); !s) return s;
    }
    return ok_status();
  }
  bool mask_components(const StepInfo&, int32_t, std::span<const float>, ComponentMask& m) override {
    switch (kind_) {
      case Kind::Mask: m.heads[1] = m.heads[3] = 0; return true;
      case Kind::ZeroOutput: return false;
      case Kind::OracleNeurons: m.oracle_neurons = k_; return true;
      case Kind::OracleHeads: m.oracle_heads = k_; return true;
    }
    return false;
  }

 private:
  Kind kind_;
  int32_t k_;
};

// Installs `m` (its on_load included) on the engine.
Status install(Engine& engine, HeadsMethod& m, WeightOverrides& overrides) {
  const PluginEntry entry{"heads", "1.0.0", "test", hooks_of<HeadsMethod>(), {}, ""};
  if (auto s = load_method(m, entry, engine, test::temp_path("heads-artifacts"), &overrides); !s) return s;
  return engine.set_method(&m, entry.hooks, &overrides, "heads");
}

TEST(ComponentSelection, MaskedHeadsComputeNeitherQueriesNorOutputColumns) {
  auto model = test::gqa_test_model("component-selection", 9);
  const auto prompt = test::random_tokens(model->config().n_vocab, 24, 4);
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  HeadsMethod mask(HeadsMethod::Kind::Mask), zero(HeadsMethod::Kind::ZeroOutput);
  WeightOverrides mask_overrides, zero_overrides;
  ASSERT_TRUE(install(**engine, zero, zero_overrides).ok());
  const test::ForwardTrace reference = test::run_trace(**engine, &zero, prompt, 6);
  ASSERT_TRUE(install(**engine, mask, mask_overrides).ok());
  (*engine)->reset_counters();
  const test::ForwardTrace masked = test::run_trace(**engine, &mask, prompt, 6, reference.tokens);
  EXPECT_LT(test::normalized_max_error(masked.logits, reference.logits), 1e-5);
  EXPECT_EQ((*engine)->counters().heads_skipped, int64_t(2) * model->config().n_layers * 7);
  (void)(*engine)->set_method(nullptr, 0);
}

// Layer 0's taps of one call: the oracle changes nothing before its own choice there.
struct Layer0 final : public ForwardObserver {
  uint32_t taps() const override { return kTapFfnActivation | kTapAttentionOut; }
  void on_layer(const CalibrationTaps& t) override {
    if (t.layer != 0) return;
    activation.assign(t.ffn_activation.begin(), t.ffn_activation.end());
    attention_out.assign(t.attention_out.begin(), t.attention_out.end());
  }
  std::vector<float> activation, attention_out;
};

Layer0 layer0(Engine& engine, const std::vector<int32_t>& tokens) {
  Layer0 seen;
  auto seq = engine.new_sequence();
  EXPECT_TRUE(engine.forward(*seq, tokens, int64_t(tokens.size()), {}, &seen).ok());
  return seen;
}

TEST(ComponentSelection, TheOracleKeepsEachRowsLargestActivationsAndHeads) {
  auto model = test::gqa_test_model("component-selection", 9);
  const ModelConfig& c = model->config();
  const auto tokens = test::random_tokens(c.n_vocab, 12, 5);
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const Layer0 dense = layer0(**engine, tokens);
  const int32_t k = c.n_ff / 4;
  HeadsMethod neurons(HeadsMethod::Kind::OracleNeurons, k), heads(HeadsMethod::Kind::OracleHeads, 2);
  WeightOverrides o1, o2;
  ASSERT_TRUE(install(**engine, neurons, o1).ok());
  const Layer0 got = layer0(**engine, tokens);
  std::vector<float> want = dense.activation;
  cpu::keep_top_k_magnitudes(want.data(), int64_t(tokens.size()), c.n_ff, k);
  EXPECT_EQ(got.activation, want);
  for (size_t r = 0; r < tokens.size(); ++r)
    EXPECT_EQ(std::count_if(got.activation.begin() + long(r * size_t(c.n_ff)),
                            got.activation.begin() + long((r + 1) * size_t(c.n_ff)), [](float v) { return v != 0; }),
              k);
  ASSERT_TRUE(install(**engine, heads, o2).ok());
  const Layer0 got_heads = layer0(**engine, tokens);
  std::vector<float> want_heads = dense.attention_out;
  const std::vector<uint8_t> all(size_t(c.n_heads), 1);
  cpu::keep_top_heads(want_heads.data(), int64_t(tokens.size()), c.n_heads, c.head_dim, 2, all.data());
  EXPECT_EQ(got_heads.attention_out, want_heads);
  EXPECT_NE(got_heads.attention_out, dense.attention_out);
  (void)(*engine)->set_method(nullptr, 0);
}

class BadOracle final : public Method {
 public:
  explicit BadOracle(int which) : which_(which) {}
  bool mask_components(const StepInfo&, int32_t, std::span<const float>, ComponentMask& m) override {
    if (which_ == 0) m.oracle_neurons = 1 << 20;
    if (which_ == 1) {
      m.oracle_neurons = 4;
      m.all_neurons = false;
      m.neurons = {0, 1, 2, 3, 4, 5};
    }
    return true;
  }

 private:
  int which_;
};

TEST(ComponentSelection, BadOracleFieldsAreRefused) {
  auto model = test::gqa_test_model("component-selection", 9);
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const std::vector<int32_t> tokens = {1, 2, 3};
  for (int which : {0, 1}) {
    BadOracle m(which);
    ASSERT_TRUE((*engine)->set_method(&m, kHookComponentMask).ok());
    auto seq = (*engine)->new_sequence();
    auto s = (*engine)->forward(*seq, tokens, 3, {});
    (void)(*engine)->set_method(nullptr, 0);
    ASSERT_FALSE(s.ok());
    EXPECT_NE(s.message().find(which == 0 ? "oracle_neurons 1048576 must be within" : "oracle_neurons needs all_neurons"),
              std::string::npos)
        << s.message();
  }
}

}  // namespace test_component_selection
}  // namespace inferlab
