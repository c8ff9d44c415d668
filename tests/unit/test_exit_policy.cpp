// Early exit by a confidence the engine computes (ExitPolicy, CALM): each
// measure is what it says, a threshold that no confidence exceeds keeps the
// dense model, an exit propagates the exit state's own K/V into the skipped
// layers and takes the logits from it (through its exit head), and a policy
// that does not fit the model is refused before any token.
#include <gtest/gtest.h>

#include <cmath>
#include <map>
#include <random>

#include "cpu/cpu_ops.h"
#include "cpu/early_exit.h"
#include "cpu/predictors.h"
#include "engine/engine.h"
#include "exit_test_methods.h"
#include "test_support.h"

namespace inferlab {
namespace test_exit_policy {

std::shared_ptr<Model> exit_model() {
  return test::shared_synthetic({.name = "exit-policy", .n_layers = 4, .n_heads = 4, .n_kv_heads = 2, .seed = 31});
}

using test::ConfidenceExit;
using test::ExitByParity;
using test::near_identity_heads;
using test::policy_checking;
using test::random_map;

// The residual rows of every layer (input and output) of a dense forward.
struct HiddenTaps final : ForwardObserver {
  uint32_t taps() const override { return kTapHiddenIn | kTapHiddenOut; }
  void on_layer(const CalibrationTaps& t) override {
    in[t.layer].assign(t.hidden_in.begin(), t.hidden_in.end());
    out[t.layer].assign(t.hidden_out.begin(), t.hidden_out.end());
  }
  std::map<int32_t, std::vector<float>> in, out;
};

const std::vector<int32_t>& prompt() {
  static const std::vector<int32_t> p = test::random_tokens(exit_model()->config().n_vocab, 10, 5);
  return p;
}

// One decode step after the prompt: its logits, and the engine left for inspection.
struct Step {
  std::unique_ptr<Engine> engine;
  std::unique_ptr<KvSequence> seq;
  std::vector<float> logits;
};

Step decode_once(Method* method, HiddenTaps* taps = nullptr) {
  Step out;
  auto engine = Engine::create(exit_model(), EngineOptions{4, 0, 0});
  EXPECT_TRUE(engine.ok());
  out.engine = std::move(*engine);
  if (method != nullptr) {
    const Status s = out.engine->set_method(method, hooks_of<ConfidenceExit>());
    EXPECT_TRUE(s.ok()) << s.message();
  }
  out.seq = out.engine->new_sequence();
  EXPECT_TRUE(out.engine->prefill(*out.seq, prompt()).ok());
  const int32_t token = 3;
  EXPECT_TRUE(out.engine
                  ->forward(*out.seq, std::span<const int32_t>(&token, 1), 0,
                            [&](int64_t, std::span<const float> l) { out.logits.assign(l.begin(), l.end()); }, taps)
                  .ok());
  return out;
}

// The confidence a measure gives after `layer`, from the dense step's rows.
float reference_confidence(const ModelConfig& c, const ExitPolicy& p, const HiddenTaps& dense, int32_t layer,
                           Engine& probe) {
  const std::vector<float>& h = dense.out.at(layer);
  switch (p.measure) {
    case ExitMeasure::State: return kernels::cpu::cosine_similarity(dense.in.at(layer).data(), h.data(), c.n_embd);
    case ExitMeasure::Classifier: {
      std::vector<float> x(size_t(c.n_embd));
      float z[2];
      kernels::cpu::rms_scale_rows(x.data(), h.data(), 1, c.n_embd, p.norm_eps);
      const ExitMap& m = p.classifiers[size_t(layer)];
      kernels::cpu::predictor_layer(z, x.data(), m.weight.data(), m.bias.data(), 1, c.n_embd, 2, false);
      return kernels::cpu::two_way_confidence(z);
    }
    case ExitMeasure::Softmax: {
      std::vector<int32_t> top1;
      std::vector<float> margin;
      const ExitMap* head = p.heads.empty() ? nullptr : &p.heads[size_t(layer)];
      EXPECT_TRUE(probe.predict_rows(h, head, p.norm_eps, top1, margin).ok());
      return margin.at(0);
    }
  }
  return 0;
}

TEST(ExitPolicy, AThresholdNoConfidenceExceedsKeepsTheDenseModel) {
  const ModelConfig& c = exit_model()->config();
  const Step dense = decode_once(nullptr);
  for (const ExitMeasure measure : {ExitMeasure::Softmax, ExitMeasure::State, ExitMeasure::Classifier}) {
    ConfidenceExit method;
    method.policy = policy_checking(c, measure, {0, 1, 2});
    method.threshold = 1.0;  // confidences never exceed 1
    const Step step = decode_once(&method);
    EXPECT_EQ(step.logits, dense.logits) << int(measure);
    const EngineCounters counters = step.engine->counters();
    EXPECT_EQ(counters.exit_checks, 3) << int(measure);
    EXPECT_TRUE(counters.exits_after_layer.empty());
    EXPECT_EQ(counters.decode_layers_run, c.n_layers);
  }
}

TEST(ExitPolicy, EachMeasureExitsJustBelowItsValueAndNotJustAbove) {
  const ModelConfig& c = exit_model()->config();
  HiddenTaps dense;
  Step probe = decode_once(nullptr, &dense);
  for (const ExitMeasure measure : {ExitMeasure::Softmax, ExitMeasure::State, ExitMeasure::Classifier})
    for (const bool heads : {false, true}) {
      if (heads && measure != ExitMeasure::Softmax) continue;
      for (const int32_t layer : {0, 2}) {
        ConfidenceExit method;
        method.policy = policy_checking(c, measure, {layer});
        if (heads) method.policy.heads = near_identity_heads(c);
        const float value = reference_confidence(c, method.policy, dense, layer, *probe.engine);
        ASSERT_TRUE(std::isfinite(value));
        SCOPED_TRACE(::testing::Message() << "measure " << int(measure) << " heads " << heads << " layer " << layer
                                          << " confidence " << value);
        method.threshold = double(value) - 1e-4;
        const Step exits = decode_once(&method);
        const EngineCounters counters = exits.engine->counters();
        ASSERT_EQ(counters.exits_after_layer.size(), size_t(c.n_layers));
        EXPECT_EQ(counters.exits_after_layer[size_t(layer)], 1);
        EXPECT_EQ(counters.decode_layers_run, layer + 1);
        EXPECT_EQ(counters.kv_fills_propagated, c.n_layers - 1 - layer);
        method.threshold = double(value) + 1e-4;
        const Step stays = decode_once(&method);
        EXPECT_TRUE(stays.engine->counters().exits_after_layer.empty());
        EXPECT_EQ(stays.logits, probe.logits);
      }
    }
}

// The exit state's logits (through the exit head when there is one) and the
// K/V its skipped layers get: the projections of that same state.
TEST(ExitPolicy, AnExitTakesItsLogitsFromTheExitStateAndPropagatesIt) {
  const ModelConfig& c = exit_model()->config();
  const ModelWeights& w = exit_model()->weights();
  HiddenTaps dense;
  Step probe = decode_once(nullptr, &dense);
  const int32_t exit_layer = 1;
  const std::vector<float>& h = dense.out.at(exit_layer);
  for (const bool heads : {false, true}) {
    ConfidenceExit method;
    method.policy = policy_checking(c, ExitMeasure::State, {exit_layer});
    if (heads) method.policy.heads = near_identity_heads(c);
    method.threshold = -2.0;  // every confidence exceeds it
    const Step step = decode_once(&method);
    ASSERT_EQ(step.engine->counters().exits_after_layer.at(exit_layer), 1);

    // logits = output head (output norm (exit head (h)))
    std::vector<float> row = h;
    if (heads) {
      std::vector<float> x(size_t(c.n_embd));
      const ExitMap& m = method.policy.heads[size_t(exit_layer)];
      kernels::cpu::rms_scale_rows(x.data(), h.data(), 1, c.n_embd, method.policy.norm_eps);
      kernels::cpu::predictor_layer(row.data(), x.data(), m.weight.data(), m.bias.data(), 1, c.n_embd, c.n_embd, false);
    }
    std::vector<float> normed(size_t(c.n_embd)), expected(size_t(c.n_vocab));
    kernels::cpu::rmsnorm(normed.data(), row.data(), w.output_norm.data(), 1, c.n_embd, c.rms_eps);
    kernels::cpu::matmul_xwt(expected.data(), normed.data(), w.lm_head(), 1, c.n_vocab, c.n_embd);
    EXPECT_LT(test::normalized_max_error(step.logits, expected), 1e-5) << "heads " << heads;
    EXPECT_NE(step.logits, probe.logits);

    // Every skipped layer's K/V of the new token: the projections of h itself (not of an earlier state).
    const int32_t position = int32_t(prompt().size());
    for (int32_t l = exit_layer + 1; l < c.n_layers; ++l) {
      const LayerWeights& lw = w.layers[size_t(l)];
      std::vector<float> xn(size_t(c.n_embd)), k(size_t(c.kv_dim())), v(size_t(c.kv_dim()));
      kernels::cpu::rmsnorm(xn.data(), h.data(), lw.attn_norm.data(), 1, c.n_embd, c.rms_eps);
      kernels::cpu::matmul_xwt(k.data(), xn.data(), lw.wk.data(), 1, c.kv_dim(), c.n_embd);
      kernels::cpu::matmul_xwt(v.data(), xn.data(), lw.wv.data(), 1, c.kv_dim(), c.n_embd);
      kernels::cpu::rope(k.data(), 1, c.n_kv_heads, c.head_dim, c.rope_dim, &position, c.rope_theta, c.rope_neox,
                         c.rope());
      for (int32_t g = 0; g < c.n_kv_heads; ++g) {
        const int32_t last = step.seq->table(l, g).n_tokens() - 1;
        ASSERT_EQ(last, position);
        const float* stored_k = step.seq->k_row(l, g, last);
        const float* stored_v = step.seq->v_row(l, g, last);
        for (int64_t i = 0; i < c.head_dim; ++i) {
          EXPECT_NEAR(stored_k[i], k[size_t(g * c.head_dim + i)], 1e-5) << "layer " << l << " head " << g;
          EXPECT_NEAR(stored_v[i], v[size_t(g * c.head_dim + i)], 1e-5) << "layer " << l << " head " << g;
        }
      }
    }
  }
}

TEST(ExitPolicy, CallsOfSeveralRowsNeverExit) {
  const ModelConfig& c = exit_model()->config();
  ConfidenceExit method;
  method.policy = policy_checking(c, ExitMeasure::State, {0, 1, 2});
  method.threshold = -2.0;
  std::vector<float> dense_logits, method_logits;
  for (Method* m : {static_cast<Method*>(nullptr), static_cast<Method*>(&method)}) {
    auto engine = Engine::create(exit_model(), EngineOptions{4, 0, 0});
    ASSERT_TRUE(engine.ok());
    if (m != nullptr) {
      ASSERT_TRUE((*engine)->set_method(m, hooks_of<ConfidenceExit>()).ok());
    }
    auto seq = (*engine)->new_sequence();
    auto logits = (*engine)->prefill(*seq, prompt());
    ASSERT_TRUE(logits.ok());
    (m == nullptr ? dense_logits : method_logits) = *logits;
    EXPECT_EQ((*engine)->counters().exit_checks, 0);
  }
  EXPECT_EQ(method_logits, dense_logits);
}

// Inside a batched call an exited sequence stays as a frozen row: its logits,
// K/V fill and counters are those it has alone, while the call runs every
// layer for the sequence that does not exit (the batch waits for its slowest).
TEST(ExitPolicy, ExitsInsideABatchEqualThoseAlone) {
  const ModelConfig& c = exit_model()->config();
  for (const ExitMeasure measure : {ExitMeasure::State, ExitMeasure::Softmax}) {
    ExitByParity method;
    method.policy = policy_checking(c, measure, {1, 2});
    method.policy.heads = near_identity_heads(c);
    auto engine = Engine::create(exit_model(), EngineOptions{4, 0, 0});
    ASSERT_TRUE(engine.ok());
    Engine& e = **engine;
    ASSERT_TRUE(e.set_method(&method, hooks_of<ExitByParity>()).ok());
    const std::vector<int32_t> p = prompt(), next = {3, 9, 4};
    // Four sequences: two alone, then two in batches; ids 0..3 give each batched one an alone twin of its parity.
    std::vector<std::unique_ptr<KvSequence>> seqs;
    for (int i = 0; i < 4; ++i) seqs.push_back(e.new_sequence());
    ASSERT_EQ(seqs[0]->id() % 2, seqs[2]->id() % 2);
    std::vector<std::vector<float>> out(4);
    auto sink_of = [&](size_t i) {
      return [&out, i](int64_t, std::span<const float> l) { out[i].insert(out[i].end(), l.begin(), l.end()); };
    };
    for (size_t i : {size_t(0), size_t(1)}) {
      ASSERT_TRUE(e.forward(*seqs[i], p, int64_t(p.size()) - 1, sink_of(i)).ok());
      for (const int32_t t : next) ASSERT_TRUE(e.forward(*seqs[i], std::vector<int32_t>{t}, 0, sink_of(i)).ok());
    }
    const EngineCounters alone = e.counters();
    e.reset_counters();
    ASSERT_TRUE(e.forward_batch(std::vector<Engine::BatchItem>{{seqs[2].get(), p, int64_t(p.size()) - 1, sink_of(2)},
                                                               {seqs[3].get(), p, int64_t(p.size()) - 1, sink_of(3)}})
                    .ok());
    for (const int32_t t : next) {
      const std::vector<int32_t> one = {t};
      ASSERT_TRUE(e.forward_batch(std::vector<Engine::BatchItem>{{seqs[2].get(), one, 0, sink_of(2)},
                                                                 {seqs[3].get(), one, 0, sink_of(3)}})
                      .ok());
    }
    const EngineCounters& batched = e.counters();
    test::expect_exit_counters_as_alone(batched, alone, 4, c.n_layers);
    EXPECT_GT(alone.exits_after_layer.at(1), 0);
    for (size_t i : {size_t(0), size_t(1)}) {
      ASSERT_EQ(out[i + 2].size(), out[i].size());
      EXPECT_LT(test::normalized_max_error(out[i + 2], out[i]), 1e-5) << "sequence " << i;
      for (int32_t l = 0; l < c.n_layers; ++l)
        for (int32_t g = 0; g < c.n_kv_heads; ++g) {
          const HeadPageTable& a = seqs[i]->table(l, g);
          ASSERT_EQ(seqs[i + 2]->table(l, g).n_tokens(), a.n_tokens());
          for (int32_t t = 0; t < a.n_tokens(); ++t)
            for (int64_t d = 0; d < c.head_dim; ++d)
              ASSERT_NEAR(seqs[i + 2]->k_row(l, g, t)[d], seqs[i]->k_row(l, g, t)[d], 1e-4)
                  << "sequence " << i << " layer " << l << " head " << g << " token " << t;
        }
    }
    (void)e.set_method(nullptr, 0);
  }
}

TEST(ExitPolicy, APolicyThatDoesNotFitTheModelIsRefusedNamingWhy) {
  const ModelConfig& c = exit_model()->config();
  auto engine = Engine::create(exit_model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  auto refusal = [&](ConfidenceExit& m, uint32_t hooks = hooks_of<ConfidenceExit>()) {
    const Status s = (*engine)->set_method(&m, hooks, nullptr, "calm");
    return s.ok() ? std::string() : s.message();
  };
  ConfidenceExit m;
  m.policy = policy_checking(c, ExitMeasure::Softmax, {0});
  EXPECT_EQ(refusal(m), "");
  EXPECT_NE(refusal(m, kHookLoad).find("exit_threshold"), std::string::npos);
  m.policy.check.back() = 1;
  EXPECT_NE(refusal(m).find("after the last layer"), std::string::npos);
  m.policy = policy_checking(c, ExitMeasure::Softmax, {0});
  m.policy.check.pop_back();
  EXPECT_NE(refusal(m).find("checks 3 layers; the model has 4"), std::string::npos);
  m.policy = policy_checking(c, ExitMeasure::Classifier, {1});
  m.policy.classifiers[1] = ExitMap{};
  EXPECT_NE(refusal(m).find("needs a classifier at checked layer 1"), std::string::npos);
  m.policy = policy_checking(c, ExitMeasure::Softmax, {1});
  m.policy.heads = near_identity_heads(c);
  m.policy.heads[2].weight.pop_back();
  EXPECT_NE(refusal(m).find("exit heads of layer 2"), std::string::npos);
  m.policy.heads = near_identity_heads(c);
  m.policy.heads[0].bias[3] = std::nanf("");
  EXPECT_NE(refusal(m).find("not finite"), std::string::npos);
  m.policy = policy_checking(c, ExitMeasure::Softmax, {1});
  m.policy.norm_eps = 0;
  EXPECT_NE(refusal(m).find("norm_eps"), std::string::npos);
  // A refused method leaves the engine as it was: dense.
  auto seq = (*engine)->new_sequence();
  EXPECT_TRUE((*engine)->prefill(*seq, prompt()).ok());
  EXPECT_EQ((*engine)->counters().exit_checks, 0);
}

TEST(ExitPolicy, PredictionsFromGivenRowsAreTheOutputHeadsArgmaxAndMargin) {
  const ModelConfig& c = exit_model()->config();
  const ModelWeights& w = exit_model()->weights();
  auto engine = Engine::create(exit_model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  std::mt19937_64 rng(3);
  std::normal_distribution<float> dist;
  std::vector<float> rows(size_t(5 * c.n_embd));
  for (float& v : rows) v = dist(rng);
  std::vector<int32_t> top1;
  std::vector<float> margin;
  ASSERT_TRUE((*engine)->predict_rows(rows, nullptr, 1e-5f, top1, margin).ok());
  ASSERT_EQ(top1.size(), 5u);
  for (int64_t r = 0; r < 5; ++r) {
    std::vector<float> normed(size_t(c.n_embd)), logits(size_t(c.n_vocab));
    kernels::cpu::rmsnorm(normed.data(), rows.data() + r * c.n_embd, w.output_norm.data(), 1, c.n_embd, c.rms_eps);
    kernels::cpu::matmul_xwt(logits.data(), normed.data(), w.lm_head(), 1, c.n_vocab, c.n_embd);
    EXPECT_EQ(top1[size_t(r)], int32_t(kernels::cpu::argmax(logits.data(), c.n_vocab)));
    EXPECT_NEAR(margin[size_t(r)], kernels::cpu::softmax_margin(logits.data(), c.n_vocab), 1e-6);
  }
  EXPECT_FALSE((*engine)->predict_rows(std::span<const float>(rows.data(), 7), nullptr, 1e-5f, top1, margin).ok());
}

TEST(ExitKernels, TheSoftmaxMarginIgnoresNanAndHandlesTies) {
  const float nan = std::nanf(""), inf = INFINITY;
  const float a[] = {0.0f, std::log(3.0f), nan};  // probabilities 1/4, 3/4
  EXPECT_NEAR(kernels::cpu::softmax_margin(a, 3), 0.5f, 1e-6);
  const float tie[] = {1.0f, 1.0f};
  EXPECT_EQ(kernels::cpu::softmax_margin(tie, 2), 0.0f);
  const float one[] = {-inf, 2.0f, -inf};
  EXPECT_EQ(kernels::cpu::softmax_margin(one, 3), 1.0f);
  const float none[] = {nan, -inf};
  EXPECT_EQ(kernels::cpu::softmax_margin(none, 2), 0.0f);
  const float x[] = {1, 2, 3}, y[] = {2, 4, 6}, zero[] = {0, 0, 0};
  EXPECT_FLOAT_EQ(kernels::cpu::cosine_similarity(x, y, 3), 1.0f);
  EXPECT_EQ(kernels::cpu::cosine_similarity(x, zero, 3), 0.0f);
  const float z[] = {0.0f, std::log(3.0f)};
  EXPECT_NEAR(kernels::cpu::two_way_confidence(z), 0.75f, 1e-6);
}

}  // namespace test_exit_policy
}  // namespace inferlab
