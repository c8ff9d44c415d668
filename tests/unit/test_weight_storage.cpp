// Per-run weight storage (WeightEditor::set_storage): NF4, FP4 and Int4 as
// QLoRA compares them (each value the nearest of its format's 16 levels times
// its block's absmax; FP4's sign kept down to -0; 4.5 and 4.127 bits per
// parameter without and with double quantization, counted from the stored
// bytes), the fused GEMV and the dequantize-then-GEMM equal to the dequantized
// weights' product (rows that straddle blocks too), a run through them equal to
// one through their dequantized weights, adapters on top, the next run dense
// again, bad requests refused. Bit-exactness against bitsandbytes itself:
// test_bnb_reference.cpp.
#include <gtest/gtest.h>

#include <random>

#include "cpu/cpu_ops.h"
#include "cpu/quant4.h"
#include "plugin_test_support.h"
#include "storage_method.h"

namespace inferlab {
namespace test_weight_storage {

namespace kc = kernels::cpu;

std::vector<float> normal_tensor(int64_t n, uint64_t seed, float sigma = 0.02f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, sigma);
  std::vector<float> w(static_cast<size_t>(n));
  for (float& x : w) x = d(rng);
  return w;
}

constexpr kc::Quant4Format kFormats[] = {kc::Quant4Format::NF4, kc::Quant4Format::FP4, kc::Quant4Format::Int4};

TEST(Quant4, TheLevelsOfEachFormat) {
  const auto nf4 = kc::quant4_levels(kc::Quant4Format::NF4);
  ASSERT_EQ(nf4.size(), 16u);
  EXPECT_TRUE(std::is_sorted(nf4.begin(), nf4.end()));
  EXPECT_EQ(nf4[0], -1.0f);
  EXPECT_EQ(nf4[7], 0.0f);
  EXPECT_EQ(nf4[15], 1.0f);
  const auto fp4 = kc::quant4_levels(kc::Quant4Format::FP4);
  const float magnitudes[8] = {0.0f, 1.0f / 192, 2.0f / 3, 1.0f, 1.0f / 3, 0.5f, 1.0f / 6, 0.25f};
  for (int c = 0; c < 8; ++c) {
    EXPECT_NEAR(fp4[size_t(c)], magnitudes[c], 1e-7) << c;
    EXPECT_EQ(fp4[size_t(c + 8)], -fp4[size_t(c)]) << c;  // bit 3: the sign
  }
  // Codes 0 and 8 are both 0: up to 0 is code 0, just above it code 8 (as in bitsandbytes' CPU path).
  EXPECT_EQ(kc::quant4_encode(kc::Quant4Format::FP4, -1e-6f), 0);
  EXPECT_EQ(kc::quant4_encode(kc::Quant4Format::FP4, 0.0f), 0);
  EXPECT_EQ(kc::quant4_encode(kc::Quant4Format::FP4, 1e-6f), 8);
  EXPECT_EQ(kc::quant4_encode(kc::Quant4Format::FP4, -1.0f), 11);
  EXPECT_EQ(kc::quant4_encode(kc::Quant4Format::FP4, 0.3f), 4);  // nearest 1/3
  const auto int4 = kc::quant4_levels(kc::Quant4Format::Int4);
  for (int c = 0; c < 8; ++c) {
    EXPECT_FLOAT_EQ(int4[size_t(c)] * 7.0f, float(7 - c)) << c;
    EXPECT_FLOAT_EQ(int4[size_t(c + 8)] * 7.0f, -float(c)) << c;
  }
  EXPECT_EQ(kc::quant4_encode(kc::Quant4Format::Int4, 1.0f), 0);
  EXPECT_EQ(kc::quant4_encode(kc::Quant4Format::Int4, -1.0f), 15);
  EXPECT_EQ(kc::quant4_encode(kc::Quant4Format::Int4, 2.6f / 7.0f), 4);  // nearest 3/7
}

TEST(Quant4, ValuesAreTheNearestLevelTimesTheBlockAbsmax) {
  for (const auto format : kFormats) {
  SCOPED_TRACE(kc::quant4_name(format));
  const int64_t rows = 48, cols = 128;
  const auto w = normal_tensor(rows * cols, 1);
  const auto q = kc::quant4_quantize(w.data(), rows, cols, format, 64, false);
  ASSERT_EQ(q.blocks(), rows * cols / 64);
  std::vector<float> back(w.size());
  kc::quant4_dequantize(q, back.data());
  const auto levels = kc::quant4_levels(format);
  for (int64_t b = 0; b < q.blocks(); ++b) {
    float absmax = 0;
    for (int64_t i = b * 64; i < (b + 1) * 64; ++i) absmax = std::max(absmax, std::fabs(w[size_t(i)]));
    ASSERT_EQ(q.block_absmax(b), absmax) << "block " << b;
    for (int64_t i = b * 64; i < (b + 1) * 64; ++i) {
      const float x = w[size_t(i)] / absmax;
      size_t best = 0;
      for (size_t k = 1; k < 16; ++k)
        if (std::fabs(levels[k] - x) < std::fabs(levels[best] - x)) best = k;
      ASSERT_EQ(back[size_t(i)], levels[best] * absmax) << "value " << i;
    }
  }
  // Each block's largest value comes back exactly (level +-1 times itself).
  for (size_t i = 0; i < w.size(); ++i)
    if (std::fabs(w[i]) == q.block_absmax(int64_t(i) / 64)) {
      ASSERT_EQ(back[i], w[i]) << "value " << i;
    }
  // One row dequantized alone is the same row.
  std::vector<float> row(static_cast<size_t>(cols));
  kc::quant4_dequantize_row(q, 5, row.data());
  EXPECT_TRUE(std::equal(row.begin(), row.end(), back.begin() + 5 * cols));
  }
}

TEST(Quant4, BitsPerParameterFromTheStoredBytes) {
  const int64_t rows = 1024, cols = 256;  // 4,096 blocks of 64: 16 groups of 256 absmaxes
  const auto w = normal_tensor(rows * cols, 2);
  const auto plain = kc::quant4_quantize(w.data(), rows, cols, kc::Quant4Format::NF4, 64, false);
  const auto dq = kc::quant4_quantize(w.data(), rows, cols, kc::Quant4Format::NF4, 64, true);
  const double n = double(rows * cols);
  EXPECT_DOUBLE_EQ(8.0 * double(plain.bytes()) / n, 4.5);
  // 4 + 8/64 + (16 group scales and the offset, 4 bytes each) = 4.127...
  EXPECT_DOUBLE_EQ(8.0 * double(dq.bytes()) / n, 4.0 + 8.0 / 64.0 + 8.0 * (16 * 4 + 4) / n);
  EXPECT_NEAR(8.0 * double(dq.bytes()) / n, 4.127, 1e-3);
  EXPECT_EQ(dq.codes, plain.codes);  // double quantization changes the absmaxes only
  // Each absmax through 8 bits: within half the dynamic map's widest gap near 1 of its group's scale.
  for (int64_t b = 0; b < dq.blocks(); ++b) {
    const float scale = dq.absmax_scale[size_t(b / kc::kQuant4AbsmaxBlock)];
    ASSERT_NEAR(dq.block_absmax(b), plain.block_absmax(b), 0.01f * scale) << "block " << b;
  }
  const auto map = kc::dynamic_map_signed();
  ASSERT_EQ(map.size(), 256u);
  EXPECT_TRUE(std::is_sorted(map.begin(), map.end()));
  EXPECT_EQ(map.back(), 1.0f);
  EXPECT_EQ(std::count(map.begin(), map.end(), 0.0f), 1);
}

TEST(Quant4, MatmulThroughTheFourBitWeightEqualsTheDequantizedWeights) {
  // 63 columns: rows start mid-byte and mid-block.
  for (const auto format : kFormats)
    for (const int64_t cols : {64, 63}) {
      SCOPED_TRACE(std::string(kc::quant4_name(format)) + ", cols " + std::to_string(cols));
      const int64_t rows = 96;
      const auto w = normal_tensor(rows * cols, 3);
      const auto q = kc::quant4_quantize(w.data(), rows, cols, format, 32, true);
      std::vector<float> dense(w.size()), scratch;
      kc::quant4_dequantize(q, dense.data());
      for (int64_t m : {1, 3, 9}) {
        const auto x = normal_tensor(m * cols, 10 + uint64_t(m), 1.0f);
        std::vector<float> y(size_t(m * rows)), ref(size_t(m * rows));
        kc::quant4_matmul_xwt(y.data(), x.data(), q, m, scratch);
        kc::matmul_xwt(ref.data(), x.data(), dense.data(), m, rows, cols);
        EXPECT_LT(test::normalized_max_error(y, ref), 1e-5) << "m = " << m;
      }
    }
}

std::unique_ptr<Engine> cpu_engine() {
  auto engine = Engine::create(test::gqa_test_model("storage", 4), EngineOptions{8, 0, 0});
  EXPECT_TRUE(engine.ok());
  return engine.ok() ? std::move(*engine) : nullptr;
}

TEST(WeightStorage, ARunIn4BitsIsARunThroughItsDequantizedWeightsAndTheNextRunIsDense) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  const ModelConfig& c = engine->config();
  const auto tokens = test::random_tokens(c.n_vocab, 28, 11);
  auto dense = test::run_with_storage(*engine, nullptr, tokens, 6);
  ASSERT_TRUE(dense.ok()) << dense.message();
  for (const auto format : {WeightFormat::NF4, WeightFormat::FP4, WeightFormat::Int4})
  for (const bool dq : {false, true}) {
    SCOPED_TRACE(std::string(dq ? "double quantization" : "fp32 absmax") + ", format " +
                 std::to_string(int(format)));
    const WeightStorage nf4{format, 32, dq};
    // W_q of layer 0 doubled first: the storage quantizes the weight as replaced.
    test::StorageMethod stored(nf4, false, 2.0f), reference(nf4, true, 2.0f);
    auto a = test::run_with_storage(*engine, &stored, tokens, 6);
    auto b = test::run_with_storage(*engine, &reference, tokens, 6);
    ASSERT_TRUE(a.ok()) << a.message();
    ASSERT_TRUE(b.ok()) << b.message();
    EXPECT_GT(test::normalized_max_error(*a, *dense), 1e-3) << "4 bits changed nothing";
    EXPECT_LT(test::normalized_max_error(*a, *b), 1e-5);
    // QLoRA: unmerged adapters on top of the 4-bit weights.
    const auto adapters = test::adapters_on_every_projection(c);
    test::StorageMethod stored_lora(nf4, false, 2.0f, adapters), reference_lora(nf4, true, 2.0f, adapters);
    auto la = test::run_with_storage(*engine, &stored_lora, tokens, 6);
    auto lb = test::run_with_storage(*engine, &reference_lora, tokens, 6);
    ASSERT_TRUE(la.ok() && lb.ok());
    EXPECT_GT(test::normalized_max_error(*la, *a), 1e-3);
    EXPECT_LT(test::normalized_max_error(*la, *lb), 1e-5);
  }
  auto after = test::run_with_storage(*engine, nullptr, tokens, 6);
  ASSERT_TRUE(after.ok());
  EXPECT_EQ(*after, *dense);
}

class OneStorage final : public Method {
 public:
  OneStorage(std::string tensor, int32_t layer, WeightStorage storage)
      : tensor_(std::move(tensor)), layer_(layer), storage_(storage) {}
  Status on_load(const LoadContext& ctx) override { return ctx.overrides->set_storage(tensor_, layer_, storage_); }

 private:
  std::string tensor_;
  int32_t layer_;
  WeightStorage storage_;
};

TEST(WeightStorage, BadRequestsAreRefusedAtLoadNamingTheTensor) {
  auto engine = cpu_engine();
  ASSERT_NE(engine, nullptr);
  const auto tokens = test::random_tokens(engine->config().n_vocab, 10, 12);
  const WeightStorage nf4{WeightFormat::NF4, 64, false};
  for (const auto& [method, expected] :
       {std::pair{OneStorage("output", -1, nf4), "weight storage of output: the output projection keeps the model's"},
        std::pair{OneStorage("attn_q", 5, nf4), "weight storage of attn_q: layer 5 is not in 0..1"},
        std::pair{OneStorage("attn_q", 0, WeightStorage{WeightFormat::NF4, 3, false}),
                  "weight storage of attn_q (layer 0): block size 3 is not an even number in 2..4096"},
        std::pair{OneStorage("attn_q", 0, WeightStorage{WeightFormat(7), 64, false}),
                  "weight storage of attn_q (layer 0): unknown format 7"}}) {
    OneStorage m = method;
    auto r = test::run_with_storage(*engine, &m, tokens, 2);
    ASSERT_FALSE(r.ok()) << expected;
    EXPECT_NE(r.message().find(expected), std::string::npos) << r.message();
  }
  // Back to the model's storage: dense again.
  OneStorage back("attn_q", 0, WeightStorage{});
  EXPECT_EQ(*test::run_with_storage(*engine, &back, tokens, 2), *test::run_with_storage(*engine, nullptr, tokens, 2));
}

}  // namespace test_weight_storage
}  // namespace inferlab
