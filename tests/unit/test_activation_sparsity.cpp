// Activation sparsity (Method::activation_sparsity: TEAL's input thresholds,
// CATS's gated FFN): the CPU kernels against plain sums, and the engine — dense
// at threshold 0, the one-row kernels (transposed weights) agreeing with the
// many-row path (a sparsified input through the dense GEMM), zero counts equal
// to what the taps show, bad declarations refused.
#include <gtest/gtest.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <vector>

#include "cpu/activation_sparse.h"
#include "engine/engine.h"
#include "inferlab/testing.h"
#include "sparse_method.h"

namespace inferlab {
namespace test_activation_sparsity {

namespace cpu = kernels::cpu;

std::vector<float> random_values(size_t n, uint64_t seed, float zero_fraction = 0.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> value(0.0f, 1.0f);
  std::uniform_real_distribution<float> u(0.0f, 1.0f);
  std::vector<float> v(n);
  for (float& x : v) x = u(rng) < zero_fraction ? 0.0f : value(rng);
  return v;
}

TEST(ActivationSparsity, SparseInputGemvSumsTheKeptRowsOfTheTransposedWeight) {
  for (const auto& [in, out] : {std::pair<int64_t, int64_t>{576, 192}, {1536, 576}, {37, 13}, {64, 4096}}) {
    const auto x = random_values(size_t(in), 1, 0.2f), wt = random_values(size_t(in * out), 2);
    for (const float threshold : {0.0f, 0.5f, 1.0f, 100.0f}) {
      std::vector<float> y(size_t(out), -7.0f);
      const int64_t zeros = cpu::sparse_input_gemv(y.data(), x.data(), wt.data(), in, out, threshold);
      int64_t expected_zeros = 0;
      std::vector<double> ref(size_t(out), 0.0);
      for (int64_t i = 0; i < in; ++i) {
        if (std::fabs(x[size_t(i)]) <= threshold) {
          ++expected_zeros;
          continue;
        }
        for (int64_t o = 0; o < out; ++o) ref[size_t(o)] += double(x[size_t(i)]) * wt[size_t(i * out + o)];
      }
      EXPECT_EQ(zeros, expected_zeros) << in << "x" << out << " t " << threshold;
      for (int64_t o = 0; o < out; ++o)
        ASSERT_NEAR(y[size_t(o)], ref[size_t(o)], 1e-4 * (1 + std::fabs(ref[size_t(o)]))) << o;
    }
  }
}

TEST(ActivationSparsity, SparseInputGemvDoesNotDependOnTheThreadCount) {
  const int64_t in = 1536, out = 576;  // 48 chunks of kept rows
  const auto x = random_values(size_t(in), 7, 0.1f), wt = random_values(size_t(in * out), 8);
  std::vector<float> one(static_cast<size_t>(out)), two(static_cast<size_t>(out));
  const int threads = omp_get_max_threads();
  omp_set_num_threads(1);
  cpu::sparse_input_gemv(one.data(), x.data(), wt.data(), in, out, 0.3f);
  omp_set_num_threads(std::max(2, threads));
  cpu::sparse_input_gemv(two.data(), x.data(), wt.data(), in, out, 0.3f);
  omp_set_num_threads(threads);
  EXPECT_EQ(one, two);
}

TEST(ActivationSparsity, SparsifyZeroesSmallEntriesAndCountsThem) {
  const std::vector<float> x = {0.0f, -0.5f, 0.5f, 0.51f, -2.0f, 0.1f};
  std::vector<float> out(x.size());
  EXPECT_EQ(cpu::sparsify(out.data(), x.data(), int64_t(x.size()), 0.5f), 4);
  EXPECT_EQ(out, (std::vector<float>{0.0f, 0.0f, 0.0f, 0.51f, -2.0f, 0.0f}));
  EXPECT_EQ(cpu::sparsify(out.data(), x.data(), int64_t(x.size()), 0.0f), 1);  // exact zeros only
  EXPECT_EQ(out, x);
}

TEST(ActivationSparsity, GatedSiluComputesUpOnlyForKeptNeurons) {
  const int64_t n_ff = 300, in = 96;
  const auto gate = random_values(size_t(n_ff), 3), x = random_values(size_t(in), 4),
             w_up = random_values(size_t(n_ff * in), 5);
  const float threshold = 0.2f;
  const size_t nf = static_cast<size_t>(n_ff);
  std::vector<float> act(nf), up(nf), act_mul(nf);
  const int64_t zeros = cpu::gated_silu_up(act.data(), gate.data(), x.data(), w_up.data(), n_ff, in, threshold);
  int64_t expected = 0;
  for (int64_t j = 0; j < n_ff; ++j) {
    double dot = 0;
    for (int64_t d = 0; d < in; ++d) dot += double(w_up[size_t(j * in + d)]) * x[size_t(d)];
    up[size_t(j)] = float(dot);
    const double s = gate[size_t(j)] / (1.0 + std::exp(-double(gate[size_t(j)])));
    if (std::fabs(s) <= threshold) {
      ++expected;
      EXPECT_EQ(act[size_t(j)], 0.0f);
    } else {
      EXPECT_NEAR(act[size_t(j)], s * dot, 1e-4 * (1 + std::fabs(s * dot)));
    }
  }
  EXPECT_EQ(zeros, expected);
  EXPECT_GT(expected, 10);
  EXPECT_LT(expected, n_ff - 10);
  // Many rows: the same neurons from a dense up projection.
  EXPECT_EQ(cpu::gated_silu_mul(act_mul.data(), gate.data(), up.data(), n_ff, threshold), expected);
  for (int64_t j = 0; j < n_ff; ++j) EXPECT_NEAR(act_mul[size_t(j)], act[size_t(j)], 1e-4 * (1 + std::fabs(act[size_t(j)])));
}

using test::SparseMethod;

ActivationSparsity uniform(int32_t n_layers, std::array<float, kSparseProjections> t, float gate = -1.0f) {
  ActivationSparsity a;
  a.input_threshold.assign(size_t(n_layers), t);
  if (gate >= 0) a.gate_threshold.assign(size_t(n_layers), gate);
  return a;
}

TEST(ActivationSparsity, ThresholdZeroIsDense) {
  auto model = test::gqa_test_model("activation-sparsity", 7);
  const auto prompt = test::random_tokens(model->config().n_vocab, 24, 3);
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const test::ForwardTrace dense = test::run_trace(**engine, nullptr, prompt, 6);
  const int32_t L = model->config().n_layers;
  for (const float gate : {-1.0f, 0.0f}) {
    SparseMethod method(uniform(L, {0, 0, 0, 0, 0, 0, 0}, gate));
    ASSERT_TRUE((*engine)->set_method(&method, 0).ok());
    (*engine)->reset_counters();
    const test::ForwardTrace got = test::run_trace(**engine, &method, prompt, 6, dense.tokens);
    const auto counters = (*engine)->counters().as_map();
    ASSERT_TRUE((*engine)->set_method(nullptr, 0).ok());
    EXPECT_LT(test::normalized_max_error(got.logits, dense.logits), 1e-5) << "gate " << gate;
    EXPECT_GT(counters.at("sparse_inputs"), 0);
  }
}

// Counts what the taps show: entries of each projection's input at or below its threshold.
class ZeroCounter final : public ForwardObserver {
 public:
  ZeroCounter(std::array<float, kSparseProjections> t, float gate) : t_(t), gate_(gate) {}
  uint32_t taps() const override { return kTapAttentionIn | kTapAttentionOut | kTapFfnIn | kTapFfnGate | kTapFfnActivation; }
  void on_layer(const CalibrationTaps& taps) override {
    auto count = [](std::span<const float> v, float t) {
      int64_t n = 0;
      for (const float x : v) n += std::fabs(x) <= t;
      return n;
    };
    for (int p = 0; p < 3; ++p) zeros[size_t(p)] += count(taps.attention_in, t_[size_t(p)]);
    zeros[3] += count(taps.attention_out, t_[3]);
    zeros[4] += count(taps.ffn_in, t_[4]);
    if (gate_ >= 0) {
      for (const float g : taps.ffn_gate) zeros[5] += std::fabs(cpu::silu(g)) <= gate_;
      zeros[6] += count(taps.ffn_activation, std::max(0.0f, t_[6]));
    } else {
      zeros[5] += count(taps.ffn_in, t_[5]);
      zeros[6] += count(taps.ffn_activation, t_[6]);
    }
  }
  std::array<int64_t, kSparseProjections> zeros{};

 private:
  std::array<float, kSparseProjections> t_;
  float gate_;
};

TEST(ActivationSparsity, OneRowKernelsAgreeWithTheManyRowPathAndCountWhatTheTapsShow) {
  auto model = test::gqa_test_model("activation-sparsity", 7);
  const int32_t L = model->config().n_layers;
  const auto prompt = test::random_tokens(model->config().n_vocab, 20, 5);
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const test::ForwardTrace dense = test::run_trace(**engine, nullptr, prompt, 8);
  const std::array<float, kSparseProjections> t = {0.4f, 0.5f, 0.6f, 0.02f, 0.45f, 0.55f, 0.01f};
  for (const float gate : {-1.0f, 0.05f}) {
    SparseMethod method(uniform(L, t, gate));
    ASSERT_TRUE((*engine)->set_method(&method, 0).ok());
    // Prefill then one-row decode steps ...
    (*engine)->reset_counters();
    const test::ForwardTrace stepped = test::run_trace(**engine, &method, prompt, 8, dense.tokens);
    const EngineCounters counted = (*engine)->counters();
    // ... against the whole sequence in one many-row call, observed.
    std::vector<int32_t> all = prompt;
    all.insert(all.end(), dense.tokens.begin(), dense.tokens.end());
    std::vector<float> whole;
    ZeroCounter observer(t, gate);
    auto seq = (*engine)->new_sequence();
    (*engine)->reset_counters();
    ASSERT_TRUE((*engine)
                    ->forward(*seq, all, 0,
                              [&](int64_t, std::span<const float> l) { whole.insert(whole.end(), l.begin(), l.end()); },
                              &observer)
                    .ok());
    const EngineCounters one_call = (*engine)->counters();
    ASSERT_TRUE((*engine)->set_method(nullptr, 0).ok());
    // Row for row the same logits, whichever path computed them.
    ASSERT_EQ(whole.size(), stepped.logits.size());
    EXPECT_LT(test::normalized_max_error(stepped.logits, whole), 1e-4) << "gate " << gate;
    EXPECT_GT(test::normalized_max_error(stepped.logits, dense.logits), 1e-3) << "the thresholds changed nothing";
    ASSERT_EQ(one_call.sparse_zeros.size(), size_t(kSparseProjections));
    for (int p = 0; p < kSparseProjections; ++p) {
      EXPECT_EQ(one_call.sparse_zeros[size_t(p)], observer.zeros[size_t(p)]) << "projection " << p << " gate " << gate;
      EXPECT_GT(counted.sparse_zeros[size_t(p)], 0) << p;
      EXPECT_LT(counted.sparse_zeros[size_t(p)], counted.sparse_inputs[size_t(p)]) << p;
    }
    // Every layer's projections counted their inputs: rows x width.
    const ModelConfig& c = model->config();
    const int64_t rows = int64_t(all.size()) * L;
    EXPECT_EQ(one_call.sparse_inputs[0], rows * c.n_embd);
    EXPECT_EQ(one_call.sparse_inputs[3], rows * c.q_dim());
    EXPECT_EQ(one_call.sparse_inputs[5], rows * (gate >= 0 ? c.n_ff : c.n_embd));
    EXPECT_EQ(one_call.sparse_inputs[6], rows * c.n_ff);
  }
}

TEST(ActivationSparsity, BadDeclarationsAreRefusedNamingTheProblem) {
  auto model = test::gqa_test_model("activation-sparsity", 7);
  auto engine = Engine::create(model, EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const int32_t L = model->config().n_layers;
  ActivationSparsity short_list = uniform(L + 1, {0, 0, 0, 0, 0, 0, 0});
  SparseMethod too_many(short_list);
  auto s = (*engine)->set_method(&too_many, 0, nullptr, "teal");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find(fmt::format("input thresholds for {} layers; the model has {}", L + 1, L)),
            std::string::npos)
      << s.message();
  ActivationSparsity gates;
  gates.gate_threshold = {0.1f};
  SparseMethod one_gate(gates);
  s = (*engine)->set_method(&one_gate, 0, nullptr, "cats");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("gate thresholds for 1 layers"), std::string::npos) << s.message();
  ActivationSparsity nan = uniform(L, {0, 0, 0, 0, 0, 0, 0});
  nan.input_threshold[1][2] = std::nanf("");
  SparseMethod with_nan(nan);
  s = (*engine)->set_method(&with_nan, 0, nullptr, "teal");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("layer 1 is NaN"), std::string::npos) << s.message();
  SparseMethod masked(uniform(L, {0, 0, 0, 0, 0, 0, 0}));
  s = (*engine)->set_method(&masked, kHookComponentMask, nullptr, "mixed");
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("component masks"), std::string::npos) << s.message();
  // Inactive (every threshold < 0): a dense method, nothing to refuse.
  SparseMethod off(uniform(L, {-1, -1, -1, -1, -1, -1, -1}));
  EXPECT_TRUE((*engine)->set_method(&off, 0).ok());
}

}  // namespace test_activation_sparsity
}  // namespace inferlab
