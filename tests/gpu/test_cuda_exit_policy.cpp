// Early exit by confidence on the CUDA backend (ExitPolicy): the measures'
// kernels against their CPU twins (kernels/cpu/early_exit.h), NaN and
// -infinity logits included; the engine under a policy of each measure, with
// and without exit heads: a threshold no confidence can pass gives the CUDA
// engine's dense tokens and logits (and its steps still replay), one under
// every confidence exits at the first check, and one between the confidences
// makes the same decode steps exit after the same layer as on the CPU engine,
// with the same logits within f16 rounding.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <span>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "cpu/early_exit.h"
#include "cpu/predictors.h"
#include "cuda/early_exit.cuh"
#include "cuda/predictors.cuh"
#include "gpu_engine_support.h"
#include "gpu_kernel_support.h"
#include "gpu_test_support.h"
#include "inferlab/testing.h"
#include "model/synthetic_model.h"

namespace inferlab {
namespace test_cuda_exit_policy {

namespace kc = kernels::cuda;
namespace cpu = kernels::cpu;
using gpu_test::DeviceBuffer;
using gpu_test::Traced;
using gpu_test::traced;

constexpr float kNan = std::numeric_limits<float>::quiet_NaN();
constexpr float kInf = std::numeric_limits<float>::infinity();

// The one float a measure's kernel writes, read back.
template <typename Launch>
float on_device(Launch launch) {
  DeviceBuffer<float> out(std::vector<float>{-7.0f});
  EXPECT_EQ(launch(out.get()), cudaSuccess);
  EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  return out.download()[0];
}

float device_margin(const std::vector<float>& logits) {
  DeviceBuffer<float> d(logits);
  return on_device([&](float* out) { return kc::softmax_margin(d.get(), int64_t(logits.size()), out, nullptr); });
}

float device_cosine(const std::vector<float>& a, const std::vector<float>& b) {
  DeviceBuffer<float> da(a), db(b);
  return on_device([&](float* out) { return kc::cosine_similarity(da.get(), db.get(), int64_t(a.size()), out, nullptr); });
}

float device_two_way(const std::vector<float>& z) {
  DeviceBuffer<float> dz(z);
  return on_device([&](float* out) { return kc::two_way_confidence(dz.get(), out, nullptr); });
}

TEST(CudaExitPolicy, SoftmaxMarginMatchesItsTwin) {
  INFERLAB_REQUIRE_GPU();
  for (const int64_t n : {int64_t(1), int64_t(2), int64_t(37), int64_t(323), int64_t(32000), int64_t(151936)}) {
    for (const float scale : {0.5f, 4.0f, 30.0f}) {
      SCOPED_TRACE("n " + std::to_string(n) + " scale " + std::to_string(scale));
      auto logits = gpu_test::random_floats(size_t(n), uint64_t(n) * 7 + uint64_t(scale * 2), scale);
      EXPECT_NEAR(device_margin(logits), cpu::softmax_margin(logits.data(), n), 1e-6);
      // Every fifth logit NaN or -infinity (n 1: none finite is left, n 2: one).
      for (int64_t i = 0; i < n; i += 5) logits[size_t(i)] = (i / 5) % 2 == 0 ? kNan : -kInf;
      EXPECT_NEAR(device_margin(logits), cpu::softmax_margin(logits.data(), n), 1e-6) << "with NaN and -inf";
    }
  }
  const int64_t n = 5000;
  EXPECT_EQ(device_margin(std::vector<float>(size_t(n), -kInf)), 0.0f) << "all -inf";
  EXPECT_EQ(device_margin(std::vector<float>(size_t(n), kNan)), 0.0f) << "all NaN";
  std::vector<float> one(size_t(n), kNan);
  for (int64_t i = 0; i < n; i += 2) one[size_t(i)] = -kInf;
  EXPECT_EQ(device_margin(one), 0.0f) << "NaN and -inf only";
  one[1234] = 3.0f;
  EXPECT_EQ(device_margin(one), 1.0f) << "one finite logit";
  EXPECT_EQ(cpu::softmax_margin(one.data(), n), 1.0f);
  auto tied = gpu_test::random_floats(size_t(n), 5, 2.0f);
  const float top = *std::max_element(tied.begin(), tied.end()) + 1.0f;
  tied[17] = tied[4001] = top;
  EXPECT_EQ(device_margin(tied), 0.0f) << "a maximum twice is also the second";
  EXPECT_EQ(cpu::softmax_margin(tied.data(), n), 0.0f);
  DeviceBuffer<float> d(tied), out(size_t(1));
  EXPECT_EQ(kc::softmax_margin(d.get(), 0, out.get(), nullptr), cudaErrorInvalidValue);
}

TEST(CudaExitPolicy, CosineMatchesItsTwin) {
  INFERLAB_REQUIRE_GPU();
  for (const int64_t n : {int64_t(1), int64_t(7), int64_t(256), int64_t(4096), int64_t(5000)}) {
    SCOPED_TRACE("n " + std::to_string(n));
    const auto a = gpu_test::random_floats(size_t(n), uint64_t(n), 3.0f);
    const auto b = gpu_test::random_floats(size_t(n), uint64_t(n) + 1, 0.5f);
    EXPECT_NEAR(device_cosine(a, b), cpu::cosine_similarity(a.data(), b.data(), n), 1e-6);
    auto near = gpu_test::random_floats(size_t(n), uint64_t(n) + 2, 1e-3f);  // a saturated state: cos close to 1
    for (size_t i = 0; i < near.size(); ++i) near[i] += a[i];
    EXPECT_NEAR(device_cosine(a, near), cpu::cosine_similarity(a.data(), near.data(), n), 1e-6);
    EXPECT_LE(device_cosine(a, a), 1.0f) << "capped at 1";
    EXPECT_FLOAT_EQ(device_cosine(a, a), 1.0f);
    std::vector<float> opposite(a.size());
    std::transform(a.begin(), a.end(), opposite.begin(), [](float x) { return -3.0f * x; });
    EXPECT_NEAR(device_cosine(a, opposite), -1.0f, 1e-6);
    const std::vector<float> zero(size_t(n), 0.0f);
    EXPECT_EQ(device_cosine(zero, a), 0.0f);
    EXPECT_EQ(device_cosine(a, zero), 0.0f);
  }
  DeviceBuffer<float> d(std::vector<float>{1.0f}), out(size_t(1));
  EXPECT_EQ(kc::cosine_similarity(d.get(), d.get(), 0, out.get(), nullptr), cudaErrorInvalidValue);
}

TEST(CudaExitPolicy, TwoWayClassifierMatchesItsTwin) {
  INFERLAB_REQUIRE_GPU();
  std::vector<std::vector<float>> cases = {{0.0f, 0.0f}, {2.5f, 2.5f}, {100.0f, -100.0f}, {-100.0f, 100.0f},
                                           {1e4f, -1e4f}, {-1e4f, 1e4f}};
  const auto random = gpu_test::random_floats(40, 9, 3.0f);
  for (size_t i = 0; i < random.size(); i += 2) cases.push_back({random[i], random[i + 1]});
  for (const auto& z : cases)
    EXPECT_NEAR(device_two_way(z), cpu::two_way_confidence(z.data()), 2e-7) << z[0] << ", " << z[1];
  // The classifier as the backend runs it: the row over its RMS, the 2-way layer, the confidence.
  for (const int64_t d : {int64_t(256), int64_t(4096)}) {
    SCOPED_TRACE("n_embd " + std::to_string(d));
    const auto h = gpu_test::random_floats(size_t(d), uint64_t(d), 3.0f);
    const auto w = gpu_test::random_floats(size_t(2 * d), uint64_t(d) + 1, 1.0f / std::sqrt(float(d)));
    const auto b = gpu_test::random_floats(2, uint64_t(d) + 2, 0.5f);
    std::vector<float> x(h.size()), z(2);
    cpu::rms_scale_rows(x.data(), h.data(), 1, d, 1e-5f);
    cpu::predictor_layer(z.data(), x.data(), w.data(), b.data(), 1, d, 2, false);
    DeviceBuffer<float> dh(h), dx(h.size()), dw(w), db(b), dz(size_t(2));
    const float got = on_device([&](float* out) {
      cudaError_t err = kc::rms_scale_rows(dh.get(), 1, d, 1e-5f, dx.get(), nullptr);
      if (err == cudaSuccess) err = kc::predictor_layer(dx.get(), dw.get(), db.get(), 1, d, 2, false, dz.get(), nullptr);
      return err == cudaSuccess ? kc::two_way_confidence(dz.get(), out, nullptr) : err;
    });
    EXPECT_NEAR(got, cpu::two_way_confidence(z.data()), 1e-5);
  }
}

// The engine tests' model has an output head of its own (not the embeddings):
// the hidden state after a middle layer then does not predict its own input
// token with near certainty, so the softmax margins spread out.
std::shared_ptr<Model> exit_model() {  // n_embd 256: head_dim 64, the attention kernels' smallest
  return test::shared_synthetic({.name = "gpu-exits", .n_layers = 3, .n_embd = 256, .n_ff = 512, .n_heads = 4,
                                 .n_kv_heads = 2, .tied_embeddings = false, .seed = 5});
}

constexpr int kPrompt = 40, kSteps = 24;
constexpr uint32_t kExits = kHookExitConfidence;
constexpr uint32_t kRecords = kHookLayerPlan | kHookLayerExit;
// Smallest distance of a threshold from any confidence the host computed: the
// device computes the same from the same rows within ~1e-6 (an exit head's
// f16 rounding is ~4e-5 on a margin: f16_mapped reproduces it).
constexpr double kTieMargin = 2e-5;

// A method with an exit policy and a fixed threshold. With kRecords it also
// keeps the residual row exit_after_layer reads after every layer that did not
// exit, in decode steps (it never exits itself); without a policy it only
// records.
class ExitMethod final : public Method {
 public:
  ExitMethod(ExitPolicy policy, double threshold) : policy_(std::move(policy)), threshold_(threshold) {}
  double exit_threshold(const StepInfo& step) override {
    (void)step;
    return threshold_;
  }
  ExitPolicy exit_policy() const override { return policy_; }
  bool exit_after_layer(const StepInfo& step, int32_t layer, std::span<const float> hidden) override {
    if (step.decode()) seen_[{layer, step.first_position}].assign(hidden.begin(), hidden.end());
    return false;
  }
  // Decode step `step` (0..kSteps-1, after the prompt) ran past `layer`.
  bool seen(int32_t layer, int32_t step) const { return seen_.count({layer, kPrompt + step}) != 0; }
  // The rows after `layer` of every decode step, (kSteps, n_embd).
  std::vector<float> rows(int32_t layer) const {
    std::vector<float> out;
    for (int32_t step = 0; step < kSteps; ++step) {
      const auto it = seen_.find({layer, kPrompt + step});
      if (it == seen_.end()) {
        ADD_FAILURE() << "no row after layer " << layer << " in decode step " << step;
        continue;
      }
      out.insert(out.end(), it->second.begin(), it->second.end());
    }
    return out;
  }

 private:
  ExitPolicy policy_;
  double threshold_;
  std::map<std::pair<int32_t, int32_t>, std::vector<float>> seen_;  // (layer, position) -> row
};

// A policy of `measure` checking `check`: random exit heads (when `heads`)
// and, for the classifier measure, random classifiers on every layer but the
// last; the first layer's without a bias.
ExitPolicy make_policy(const ModelConfig& c, ExitMeasure measure, std::vector<uint8_t> check, bool heads) {
  const int64_t d = c.n_embd;
  const auto L = size_t(c.n_layers);
  ExitPolicy p;
  p.measure = measure;
  p.check = std::move(check);
  auto map = [&](int64_t out, size_t layer, uint64_t seed) {
    ExitMap m;
    m.weight = gpu_test::random_floats(size_t(out * d), seed, 1.0f / std::sqrt(float(d)));
    if (layer > 0) m.bias = gpu_test::random_floats(size_t(out), seed + 1, 0.1f);
    return m;
  };
  if (heads) p.heads.resize(L);
  if (measure == ExitMeasure::Classifier) p.classifiers.resize(L);
  for (size_t l = 0; l + 1 < L; ++l) {
    if (heads) p.heads[l] = map(d, l, 100 + 10 * l);
    if (measure == ExitMeasure::Classifier) p.classifiers[l] = map(2, l, 200 + 10 * l);
  }
  return p;
}

std::vector<float> f16_rounded(const std::vector<float>& v) {
  return gpu_test::to_floats(gpu_test::to_bytes(v, kernels::DType::F16), kernels::DType::F16);
}

// W (row / RMS) + b of an exit head as the CUDA backend computes it: the
// scaled rows and the weights in f16, float sums.
std::vector<float> f16_mapped(const ExitMap& head, const std::vector<float>& rows, int64_t d, float eps) {
  const int64_t n = int64_t(rows.size()) / d;
  std::vector<float> x(rows.size()), y(rows.size());
  cpu::rms_scale_rows(x.data(), rows.data(), n, d, eps);
  const auto x16 = f16_rounded(x), w16 = f16_rounded(head.weight);
  cpu::predictor_layer(y.data(), x16.data(), w16.data(), head.bias.empty() ? nullptr : head.bias.data(), n, d, d,
                       false);
  return y;
}

// The policy's confidence after `layer` in each decode step, computed on the
// host from the rows a run that never exited read back (`before`: the layer's
// input rows, `after`: its output rows) as `engine` computes it: the softmax
// measure through the engine's own output norm and head (predict_rows), after
// the exit head the engine's backend would run.
std::vector<float> host_confidences(Engine& engine, bool gpu, const ExitPolicy& p, int32_t layer,
                                    const std::vector<float>& before, const std::vector<float>& after) {
  const int64_t d = engine.config().n_embd, n = int64_t(after.size()) / d;
  std::vector<float> out(static_cast<size_t>(n));
  if (p.measure == ExitMeasure::State) {
    for (int64_t s = 0; s < n; ++s)
      out[size_t(s)] = cpu::cosine_similarity(&before[size_t(s * d)], &after[size_t(s * d)], d);
  } else if (p.measure == ExitMeasure::Classifier) {
    const ExitMap& m = p.classifiers[size_t(layer)];
    std::vector<float> x(after.size()), z(size_t(2 * n));
    cpu::rms_scale_rows(x.data(), after.data(), n, d, p.norm_eps);
    cpu::predictor_layer(z.data(), x.data(), m.weight.data(), m.bias.empty() ? nullptr : m.bias.data(), n, d, 2, false);
    for (int64_t s = 0; s < n; ++s) out[size_t(s)] = cpu::two_way_confidence(&z[size_t(2 * s)]);
  } else {
    const ExitMap* head = p.heads.empty() || !p.heads[size_t(layer)].present() ? nullptr : &p.heads[size_t(layer)];
    const std::vector<float> rows = head != nullptr && gpu ? f16_mapped(*head, after, d, p.norm_eps) : after;
    std::vector<int32_t> top1;
    const auto s = engine.predict_rows(rows, gpu ? nullptr : head, p.norm_eps, top1, out);
    EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
  }
  return out;
}

// A threshold that splits the steps, the same on both backends: the middle of
// the widest gap between the confidences (of either) that no step's pair
// straddles, with between a fifth and four fifths of the steps above it.
struct Cut {
  double threshold = 2, separation = 0;
  int exits = 0;
};
Cut middle_cut(const std::vector<float>& a, const std::vector<float>& b) {
  std::vector<double> all(a.begin(), a.end());
  all.insert(all.end(), b.begin(), b.end());
  std::sort(all.begin(), all.end());
  const int n = int(a.size());
  Cut best;
  for (size_t i = 0; i + 1 < all.size(); ++i) {
    const double t = (all[i] + all[i + 1]) / 2, separation = (all[i + 1] - all[i]) / 2;
    int exits = 0;
    bool straddled = false;
    for (int s = 0; s < n; ++s) {
      straddled = straddled || (double(a[size_t(s)]) > t) != (double(b[size_t(s)]) > t);
      exits += double(a[size_t(s)]) > t;
    }
    if (!straddled && exits >= n / 5 && exits <= n - n / 5 && separation > best.separation) best = {t, separation, exits};
  }
  return best;
}

double counter(const std::map<std::string, double>& counters, const std::string& key) {
  const auto it = counters.find(key);
  return it == counters.end() ? 0.0 : it->second;
}

// A CPU and a CUDA engine of the exit model, a prompt and the forced decode tokens.
struct Engines {
  std::unique_ptr<Engine> cpu, gpu;
  std::vector<int32_t> prompt, forced;
};
Engines engines() {
  Engines e;
  e.cpu = gpu_test::make_engine(exit_model(), BackendKind::Cpu);
  e.gpu = gpu_test::make_engine(exit_model(), BackendKind::Cuda);
  if (!e.cpu || !e.gpu) return e;
  e.prompt = test::random_tokens(e.cpu->config().n_vocab, kPrompt, 21);
  e.forced = test::random_tokens(e.cpu->config().n_vocab, kSteps, 22);
  return e;
}

class CudaExitEngine : public ::testing::TestWithParam<std::tuple<ExitMeasure, bool>> {};

TEST_P(CudaExitEngine, NoConfidenceCanPassAtThresholdTwo) {
  INFERLAB_REQUIRE_GPU();
  const auto [measure, heads] = GetParam();
  auto gpu = gpu_test::make_engine(exit_model(), BackendKind::Cuda);
  ASSERT_TRUE(gpu);
  const auto prompt = test::random_tokens(gpu->config().n_vocab, kPrompt, 21);
  const test::ForwardTrace dense = test::run_trace(*gpu, nullptr, prompt, kSteps);
  ExitMethod m(make_policy(gpu->config(), measure, {1, 1, 0}, heads), 2.0);
  const auto set = gpu->set_method(&m, kExits);
  ASSERT_TRUE(set.ok()) << set.message();
  gpu->reset_counters();
  const test::ForwardTrace got = test::run_trace(*gpu, &m, prompt, kSteps);
  const auto counters = gpu->counters().as_map();
  ASSERT_TRUE(gpu->set_method(nullptr, 0).ok());
  EXPECT_EQ(got.tokens, dense.tokens);
  EXPECT_EQ(got.logits, dense.logits);
  EXPECT_EQ(counters.count("exit_checks"), 0u) << "a confidence computed where none could pass";
  EXPECT_EQ(counters.count("early_exits"), 0u);
  EXPECT_EQ(counter(counters, "graph_replays"), double(kSteps)) << "such steps still replay";
  EXPECT_EQ(test::run_trace(*gpu, nullptr, prompt, kSteps).logits, dense.logits) << "after the policy is dropped";
}

TEST_P(CudaExitEngine, AThresholdUnderEveryConfidenceExitsAtTheFirstCheck) {
  INFERLAB_REQUIRE_GPU();
  const auto [measure, heads] = GetParam();
  Engines e = engines();
  ASSERT_TRUE(e.cpu && e.gpu);
  ExitMethod m(make_policy(e.cpu->config(), measure, {1, 1, 0}, heads), -2.0);  // every confidence is at least -1
  const Traced dense = traced(*e.cpu, nullptr, e.prompt, e.forced);
  const Traced on_cpu = traced(*e.cpu, &m, e.prompt, e.forced, kExits);
  const Traced on_gpu = traced(*e.gpu, &m, e.prompt, e.forced, kExits);
  for (const Traced* t : {&on_cpu, &on_gpu}) {
    EXPECT_EQ(counter(t->counters, "exits_after_layer.layer00"), double(kSteps));
    EXPECT_EQ(counter(t->counters, "early_exits"), double(kSteps));
    EXPECT_EQ(counter(t->counters, "exit_checks"), double(kSteps)) << "no second check after an exit";
    EXPECT_EQ(counter(t->counters, "layers_skipped"), double(2 * kSteps));
  }
  EXPECT_GT(test::normalized_max_error(on_cpu.logits, dense.logits), 1e-2) << "the exits changed nothing";
  ASSERT_EQ(on_gpu.logits.size(), on_cpu.logits.size());
  EXPECT_LT(gpu_test::normalized_error(on_gpu.logits, on_cpu.logits), 2e-2);
}

TEST_P(CudaExitEngine, AThresholdBetweenConfidencesExitsTheSameStepsAsTheCpu) {
  INFERLAB_REQUIRE_GPU();
  const auto [measure, heads] = GetParam();
  Engines e = engines();
  ASSERT_TRUE(e.cpu && e.gpu);
  // One check, after the middle layer: an exit skips only the last layer, so
  // the checked layer's rows in later steps are those of a run that never exits.
  constexpr int32_t kLayer = 1;
  const ExitPolicy policy = make_policy(e.cpu->config(), measure, {0, 1, 0}, heads);
  Engine* both[2] = {e.cpu.get(), e.gpu.get()};
  std::vector<float> confidences[2];
  for (int i = 0; i < 2; ++i) {
    ExitMethod recorder(ExitPolicy{}, 2.0);  // no policy: nothing exits
    traced(*both[i], &recorder, e.prompt, e.forced, kRecords);
    confidences[i] = host_confidences(*both[i], i == 1, policy, kLayer, recorder.rows(kLayer - 1), recorder.rows(kLayer));
    ASSERT_EQ(confidences[i].size(), size_t(kSteps));
  }
  const Cut cut = middle_cut(confidences[0], confidences[1]);
  ASSERT_GT(cut.separation, kTieMargin) << "no threshold away from every confidence splits the steps";
  std::vector<uint8_t> want;
  for (const float confidence : confidences[0]) want.push_back(double(confidence) > cut.threshold);
  Traced runs[2];
  for (int i = 0; i < 2; ++i) {
    ExitMethod m(policy, cut.threshold);
    runs[i] = traced(*both[i], &m, e.prompt, e.forced, kExits | kRecords);
    std::vector<uint8_t> exited;  // a step that exited after the layer did not run past it
    for (int32_t step = 0; step < kSteps; ++step) exited.push_back(!m.seen(kLayer, step));
    EXPECT_EQ(exited, want) << (i == 0 ? "cpu" : "cuda") << ", threshold " << cut.threshold;
    EXPECT_EQ(counter(runs[i].counters, "exits_after_layer.layer01"), double(cut.exits));
    EXPECT_EQ(counter(runs[i].counters, "early_exits"), double(cut.exits));
    EXPECT_EQ(counter(runs[i].counters, "exit_checks"), double(kSteps));
  }
  const Traced dense = traced(*e.cpu, nullptr, e.prompt, e.forced);
  EXPECT_GT(test::normalized_max_error(runs[0].logits, dense.logits), 1e-2) << "the exits changed nothing";
  ASSERT_EQ(runs[1].logits.size(), runs[0].logits.size());
  EXPECT_LT(gpu_test::normalized_error(runs[1].logits, runs[0].logits), 2e-2);
}

std::string case_name(const ::testing::TestParamInfo<std::tuple<ExitMeasure, bool>>& info) {
  static const char* const names[] = {"Softmax", "State", "Classifier"};
  return std::string(names[int(std::get<0>(info.param))]) + (std::get<1>(info.param) ? "_heads" : "_noheads");
}

INSTANTIATE_TEST_SUITE_P(Measures, CudaExitEngine,
                         ::testing::Combine(::testing::Values(ExitMeasure::Softmax, ExitMeasure::State,
                                                              ExitMeasure::Classifier),
                                            ::testing::Bool()),
                         case_name);

}  // namespace test_cuda_exit_policy
}  // namespace inferlab
