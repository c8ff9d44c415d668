// Predicted components (Method::component_predictors, Deja Vu's mechanism):
// the kernels on crafted rows (top-k ties and NaN, lists, a predictor layer);
// the engine running the predictors equal to the same choices made on the host
// through mask_components (lookahead for heads, the union over prefill rows,
// the same counters); every neuron and head kept gives the dense model; the
// counters of a mask that empties a kv group; bad predictors refused by name.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "cpu/predictors.h"
#include "engine/engine.h"
#include "inferlab/testing.h"
#include "model/synthetic_model.h"
#include "predictor_method.h"

namespace inferlab {
namespace test_component_predictors {

namespace cpu = kernels::cpu;

TEST(ComponentPredictors, TopKFlagsTakeEachRowsLargestTiesToTheLowerIndexNanLast) {
  const float nan = std::numeric_limits<float>::quiet_NaN();
  const std::vector<float> logits = {1, 3, 3, -2, nan, 0,     // row 0: 3, 3 (indices 1, 2), then 1 (index 0)
                                     nan, -1, -1, -5, -1, 2};  // row 1: 2, then -1 at 7 and 8 (ties, not 10)
  std::vector<uint8_t> flags(6, 0);
  cpu::top_k_flags(flags.data(), logits.data(), 1, 6, 3);
  EXPECT_EQ(flags, (std::vector<uint8_t>{1, 1, 1, 0, 0, 0}));
  std::vector<uint8_t> second(6, 0);
  cpu::top_k_flags(second.data(), logits.data() + 6, 1, 6, 3);
  EXPECT_EQ(second, (std::vector<uint8_t>{0, 1, 1, 0, 0, 1}));
  std::vector<uint8_t> both(6, 0);  // the union over the two rows
  cpu::top_k_flags(both.data(), logits.data(), 2, 6, 3);
  EXPECT_EQ(both, (std::vector<uint8_t>{1, 1, 1, 0, 0, 1}));
  std::vector<int32_t> list(6);
  ASSERT_EQ(cpu::flags_to_list(list.data(), both.data(), 6), 4);
  EXPECT_EQ(std::vector<int32_t>(list.begin(), list.begin() + 4), (std::vector<int32_t>{0, 1, 2, 5}));
  std::vector<uint8_t> all(6, 0);
  cpu::top_k_flags(all.data(), logits.data(), 1, 6, 6);
  EXPECT_EQ(all, std::vector<uint8_t>(6, 1));
}

TEST(ComponentPredictors, APredictorLayerIsAnAffineMapThenReLU) {
  const std::vector<float> x = {1, 2, -1, 0, 3, 1};  // two rows of 3
  const std::vector<float> w = {1, 0, 0, 0, 1, 1};   // two outputs
  const std::vector<float> b = {-2, 0.5f};
  std::vector<float> y(4);
  cpu::predictor_layer(y.data(), x.data(), w.data(), b.data(), 2, 3, 2, false);
  EXPECT_EQ(y, (std::vector<float>{-1, 1.5f, -2, 4.5f}));
  cpu::predictor_layer(y.data(), x.data(), w.data(), b.data(), 2, 3, 2, true);
  EXPECT_EQ(y, (std::vector<float>{0, 1.5f, 0, 4.5f}));
  std::vector<float> scaled(3);
  cpu::rms_scale_rows(scaled.data(), x.data(), 1, 3, 0.0f);
  const float s = 1.0f / std::sqrt(2.0f);  // mean of 1, 4, 1 is 2
  EXPECT_NEAR(scaled[0], s, 1e-6);
  EXPECT_NEAR(scaled[1], 2 * s, 1e-6);
}

std::shared_ptr<Model> four_layer_model() {
  static std::shared_ptr<Model> model = [] {
    SyntheticModelSpec spec;
    spec.name = "component-predictors";
    spec.n_layers = 4;
    spec.n_heads = 4;
    spec.n_kv_heads = 2;
    spec.seed = 21;
    return test::load_synthetic(spec);
  }();
  return model;
}

struct Traced {
  test::ForwardTrace trace;
  EngineCounters counters;
};

Traced run(Engine& engine, Method& m, uint32_t hooks, const std::vector<int32_t>& prompt, int steps,
        const std::vector<int32_t>& forced = {}) {
  Traced r;
  auto s = engine.set_method(&m, hooks, nullptr, "predicted");
  EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
  engine.reset_counters();
  r.trace = test::run_trace(engine, &m, prompt, steps, forced);
  r.counters = engine.counters();
  (void)engine.set_method(nullptr, 0);
  return r;
}

TEST(ComponentPredictors, TheEngineChoosesAsTheHostReferenceDoes) {
  auto model = four_layer_model();
  const ModelConfig& c = model->config();
  const auto prompt = test::random_tokens(c.n_vocab, 20, 3);
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  // Neurons and heads from layer 1 (layer 0's heads by lookahead from nothing:
  // its own input is not used, layer 1's heads come from layer 0's input).
  for (const auto& [rank, first] : {std::pair{8, 0}, {0, 1}}) {
    SCOPED_TRACE("rank " + std::to_string(rank) + ", from layer " + std::to_string(first));
    const auto predictors = test::random_predictors(c, rank, int32_t(c.n_ff) / 4, 1, 7, first);
    test::PredictedMethod engine_side(predictors);
    test::HostPredictedMethod host_side(predictors);
    host_side.set_shape(c.n_ff, c.n_embd);
    const Traced want = run(**engine, host_side, kHookComponentMask, prompt, 8);
    const Traced got = run(**engine, engine_side, 0, prompt, 8, want.trace.tokens);
    EXPECT_EQ(got.trace.logits, want.trace.logits);
    EXPECT_EQ(got.counters.neurons_skipped, want.counters.neurons_skipped);
    EXPECT_EQ(got.counters.heads_skipped, want.counters.heads_skipped);
    EXPECT_EQ(got.counters.kv_heads_skipped, want.counters.kv_heads_skipped);
    EXPECT_EQ(got.counters.decode_keys_read, want.counters.decode_keys_read);
    EXPECT_EQ(got.counters.decode_kv_bytes_read, want.counters.decode_kv_bytes_read);
    // One head of four kept: one of the two kv groups is never read in decode.
    EXPECT_EQ(got.counters.kv_heads_skipped, int64_t(c.n_layers - first) * 8);
    EXPECT_GT(got.counters.neurons_skipped, 0);
  }
}

TEST(ComponentPredictors, KeepingEveryNeuronAndHeadIsTheDenseModel) {
  auto model = four_layer_model();
  const ModelConfig& c = model->config();
  const auto prompt = test::random_tokens(c.n_vocab, 16, 5);
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const test::ForwardTrace dense = test::run_trace(**engine, nullptr, prompt, 6);
  test::PredictedMethod all(test::random_predictors(c, 4, int32_t(c.n_ff), c.n_heads, 9));
  const Traced got = run(**engine, all, 0, prompt, 6, dense.tokens);
  EXPECT_LT(test::normalized_max_error(got.trace.logits, dense.logits), 1e-5);
  EXPECT_EQ(got.counters.neurons_skipped, 0);
  EXPECT_EQ(got.counters.heads_skipped, 0);
}

TEST(ComponentPredictors, BadPredictorsAreRefusedNamingTheLayer) {
  auto model = four_layer_model();
  const ModelConfig& c = model->config();
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  auto refused = [&](ComponentPredictors p, const std::string& why, uint32_t hooks = 0) {
    test::PredictedMethod m(std::move(p));
    auto s = (*engine)->set_method(&m, hooks, nullptr, "bad");
    ASSERT_FALSE(s.ok()) << why;
    EXPECT_NE(s.message().find(why), std::string::npos) << s.message();
  };
  const auto good = test::random_predictors(c, 4, 8, 2, 1);
  auto p = good;
  p.neurons.pop_back();
  refused(p, "neuron predictors for 3 layers; the model has 4");
  p = good;
  p.heads[2].keep = c.n_heads + 1;
  refused(p, "the head predictor of layer 2 keeps 5 of 4");
  p = good;
  p.neurons[1].w2.pop_back();
  refused(p, "the neuron predictor of layer 1 has rank 4");
  p = good;
  p.heads[3].b2[0] = std::numeric_limits<float>::quiet_NaN();
  refused(p, "the head predictor of layer 3 has a weight that is not finite");
  p = good;
  p.norm_eps = 0;
  refused(p, "norm_eps 0 must be positive");
  refused(good, "with component masks (mask_components) are not supported", kHookComponentMask);
}

// A method's unused hooks (Method::unused_hooks) are not run: a mask hook it
// turns off neither refuses its predictors nor is asked.
class QuietMask final : public Method {
 public:
  explicit QuietMask(ComponentPredictors p) : p_(std::move(p)) {}
  ComponentPredictors component_predictors() const override { return p_; }
  uint32_t unused_hooks() const override { return kHookComponentMask; }
  bool mask_components(const StepInfo&, int32_t, std::span<const float>, ComponentMask&) override {
    ++asked;
    return false;
  }
  int asked = 0;

 private:
  ComponentPredictors p_;
};

TEST(ComponentPredictors, UnusedHooksAreNotRun) {
  auto model = four_layer_model();
  const ModelConfig& c = model->config();
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  QuietMask m(test::random_predictors(c, 4, 8, 2, 1));
  const Traced r = run(**engine, m, hooks_of<QuietMask>(), test::random_tokens(c.n_vocab, 6, 1), 2);
  EXPECT_EQ(m.asked, 0);
  EXPECT_GT(r.counters.neurons_skipped, 0);
}

}  // namespace test_component_predictors
}  // namespace inferlab
