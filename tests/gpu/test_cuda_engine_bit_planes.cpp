// The CUDA backend on bit-plane KV pages (a method's progressive
// quantization) against the CPU backend on the same small model: the same
// logits within f16 rounding and the same refetch and traffic counters within
// a few rows near the threshold, alone, with value pruning, and under SpAtten
// with every mechanism on (the cascade's retention moving bit-plane rows on
// the device).
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <span>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "gpu_engine_support.h"
#include "gpu_test_support.h"
#include "plugin_test_support.h"

namespace inferlab::test {
namespace test_cuda_engine_bit_planes {

using gpu_test::normalized_error;

// A method that quantizes its KV pages, with value pruning when keep < 1.
class QuantMethod final : public Method {
 public:
  QuantMethod(int32_t msb, int32_t lsb, double threshold, double keep) : quant_{msb, lsb, threshold}, keep_(keep) {}
  KvQuantization kv_quantization() const override { return quant_; }
  ValuePruning value_pruning() const override { return keep_ < 1.0 ? ValuePruning{keep_, false} : ValuePruning{}; }

 private:
  KvQuantization quant_;
  double keep_;
};

struct MethodRun {
  std::vector<float> logits;
  EngineCounters counters;
  KvPageFormat format = KvPageFormat::Any;
};

// The prompt in one call (logits of its last row: a cascade may prune the
// others inside the call), then one call per forced token.
MethodRun run_method(BackendKind backend, Method* method, const std::string& plugin, const ParamValues& params,
                     const std::vector<int32_t>& tokens, int32_t prompt) {
  MethodRun run;
  auto engine = gpu_test::make_engine(gpu_test::small_model(), backend, 16);
  if (engine == nullptr) return run;
  ActiveMethod active;
  if (method != nullptr) {
    EXPECT_TRUE(engine->set_method(method, 0).ok());
  } else {
    active = activate_method(*engine, plugin, params);
    method = active.handle.get();
  }
  if (method == nullptr) return run;
  auto seq = engine->new_sequence();
  run.format = seq->pool().format();
  method->begin_sequence(engine->shape());
  engine->reset_counters();
  const auto sink = [&](int64_t, std::span<const float> l) { run.logits.insert(run.logits.end(), l.begin(), l.end()); };
  auto s = engine->forward(*seq, std::span<const int32_t>(tokens.data(), size_t(prompt)), prompt - 1, sink);
  EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
  for (size_t i = size_t(prompt); i < tokens.size() && s.ok(); ++i) {
    s = engine->forward(*seq, std::span<const int32_t>(&tokens[i], 1), 0, sink);
    EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
  }
  run.counters = engine->counters();
  return run;
}

int64_t total(const std::vector<int64_t>& per_layer) {
  int64_t sum = 0;
  for (int64_t x : per_layer) sum += x;
  return sum;
}

struct EngineCase {
  std::string label;
  double threshold, keep;
  std::string name() const { return label; }
};

class CudaEngineBitPlanes : public testing::TestWithParam<EngineCase> {};

// The refetch decisions follow each row's largest probability, which f16
// weights move a little: the counts may differ by a few rows near the
// threshold, the logits by f16 rounding and the odd MSB bucket a K or V
// value crosses.
TEST_P(CudaEngineBitPlanes, RefetchCountersAndLogitsMatchTheCpuBackend) {
  INFERLAB_REQUIRE_GPU();
  const EngineCase& p = GetParam();
  const auto tokens = random_tokens(gpu_test::small_model()->config().n_vocab, 60 + 12, 13);
  QuantMethod on_cpu(4, 4, p.threshold, p.keep), on_gpu(4, 4, p.threshold, p.keep);
  const MethodRun cpu_run = run_method(BackendKind::Cpu, &on_cpu, "", {}, tokens, 60);
  const MethodRun gpu_run = run_method(BackendKind::Cuda, &on_gpu, "", {}, tokens, 60);
  EXPECT_EQ(gpu_run.format, KvPageFormat::BitPlanes);
  ASSERT_EQ(gpu_run.logits.size(), cpu_run.logits.size());
  EXPECT_LT(normalized_error(gpu_run.logits, cpu_run.logits), 5e-2) << p.label;
  EXPECT_GE(gpu_test::top1_agreement(gpu_run.logits, cpu_run.logits, gpu_test::small_model()->config().n_vocab), 0.85)
      << p.label;
  const EngineCounters &a = cpu_run.counters, &b = gpu_run.counters;
  ASSERT_EQ(b.requant_rows.size(), a.requant_rows.size());
  EXPECT_EQ(b.requant_rows, a.requant_rows) << p.label << ": every (row, head) is checked on both";
  const int64_t rows = total(a.requant_rows), refetched = total(a.requant_refetched);
  EXPECT_GT(refetched, rows / 10) << p.label << ": the CPU refetched too few rows for a comparison";
  EXPECT_LT(refetched, rows - rows / 10) << p.label << ": the CPU refetched too many rows for a comparison";
  const double slack = std::max(3.0, 0.03 * double(rows));
  EXPECT_NEAR(double(total(b.requant_refetched)), double(refetched), slack) << p.label;
  EXPECT_EQ(b.decode_keys_read, a.decode_keys_read) << p.label;
  EXPECT_NEAR(double(b.decode_lsb_keys_read), double(a.decode_lsb_keys_read),
              std::max(64.0, 0.1 * double(a.decode_lsb_keys_read)))
      << p.label;
  EXPECT_NEAR(double(b.decode_kv_bytes_read), double(a.decode_kv_bytes_read), 0.1 * double(a.decode_kv_bytes_read))
      << p.label;
  if (p.keep < 1.0) {
    EXPECT_GT(b.decode_values_skipped, 0) << p.label;
    EXPECT_NEAR(double(b.decode_values_skipped), double(a.decode_values_skipped),
                std::max(16.0, 0.1 * double(a.decode_values_skipped)))
        << p.label;
  }
}

INSTANTIATE_TEST_SUITE_P(Methods, CudaEngineBitPlanes,
                         testing::Values(EngineCase{"quantize", 0.5, 1.0}, EngineCase{"quantize_values", 0.5, 0.5}),
                         [](const auto& info) { return info.param.name(); });

// A method's view of bit-plane pages (the backend's KvView) gives each row
// decoded from both planes: on its grid (integer multiples of its largest
// magnitude over qmax) and, for layer 0's keys, which come from the tokens
// alone, within a grid step or two of the CPU backend's view.
class ViewMethod final : public Method {
 public:
  KvQuantization kv_quantization() const override { return {4, 4, 0.5}; }
  void on_attention(const StepInfo&, const KvView& view, const AttentionStats& stats) override {
    if (stats.layer != 0 || stats.kv_head != 0) return;
    keys.clear();
    for (int32_t t = 0; t < view.n_tokens(0, 0); ++t) {
      const float* k = view.key(0, 0, t);
      keys.insert(keys.end(), k, k + gpu_test::small_model()->config().head_dim);
    }
  }
  std::vector<float> keys;  // layer 0, kv head 0, after the latest call
};

TEST(CudaEngineBitPlanesView, TheMethodsViewDecodesBothPlanes) {
  INFERLAB_REQUIRE_GPU();
  const int32_t hd = gpu_test::small_model()->config().head_dim, qmax = (1 << 7) - 1;
  const auto tokens = random_tokens(gpu_test::small_model()->config().n_vocab, 37, 19);
  std::vector<float> keys[2];
  int i = 0;
  for (BackendKind backend : {BackendKind::Cpu, BackendKind::Cuda}) {
    auto engine = gpu_test::make_engine(gpu_test::small_model(), backend, 16);
    ASSERT_NE(engine, nullptr);
    ViewMethod method;
    ASSERT_TRUE(engine->set_method(&method, kHookAttentionFeedback).ok());
    auto seq = engine->new_sequence();
    ASSERT_TRUE(engine->forward(*seq, tokens, int64_t(tokens.size()), {}).ok());
    keys[i++] = method.keys;
  }
  ASSERT_EQ(keys[1].size(), size_t(37 * hd));
  ASSERT_EQ(keys[1].size(), keys[0].size());
  for (int32_t t = 0; t < 37; ++t) {
    const float* row = &keys[1][size_t(t * hd)];
    float amax = 0.0f;
    for (int32_t d = 0; d < hd; ++d) amax = std::max(amax, std::fabs(row[d]));
    ASSERT_GT(amax, 0.0f) << "token " << t;
    for (int32_t d = 0; d < hd; ++d) {
      const float steps = row[d] / (amax / float(qmax));
      EXPECT_NEAR(steps, std::nearbyint(steps), 1e-3f) << "token " << t << " channel " << d;
    }
  }
  EXPECT_LT(normalized_error(keys[1], keys[0]), 2e-2);
}

// SpAtten with every mechanism on (the cascade's retention moves bit-plane
// rows on the device, head masks, value pruning, progressive quantization)
// gives the CPU backend's logits within what the cascade's near ties allow.
TEST(CudaEngineBitPlanesSpatten, AllMechanismsMatchTheCpuBackend) {
  INFERLAB_REQUIRE_GPU();
  const auto tokens = random_tokens(gpu_test::small_model()->config().n_vocab, 120 + 24, 17);
  const ParamValues params(std::map<std::string, ParamValue>{
      {"quantize", true}, {"msb_bits", int64_t{4}}, {"lsb_bits", int64_t{4}}, {"requant_threshold", 0.5}});
  const MethodRun cpu_run = run_method(BackendKind::Cpu, nullptr, "spatten", params, tokens, 120);
  const MethodRun gpu_run = run_method(BackendKind::Cuda, nullptr, "spatten", params, tokens, 120);
  EXPECT_EQ(gpu_run.format, KvPageFormat::BitPlanes);
  ASSERT_EQ(gpu_run.logits.size(), cpu_run.logits.size());
  EXPECT_LT(normalized_error(gpu_run.logits, cpu_run.logits), 5e-2);
  EXPECT_GE(gpu_test::top1_agreement(gpu_run.logits, cpu_run.logits, gpu_test::small_model()->config().n_vocab), 0.85);
  EXPECT_GT(gpu_run.counters.tokens_evicted, 0);
  EXPECT_GT(total(gpu_run.counters.requant_refetched), 0);
}

}  // namespace test_cuda_engine_bit_planes
}  // namespace inferlab::test
