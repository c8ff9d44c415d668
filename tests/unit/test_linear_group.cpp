// Products that share one input in one parallel region: the float32 GEMV
// group (cpu_ops) and the quantized group (quant_matmul) against the products
// taken one at a time; a few rows through the GEMV equal each row alone.
#include <gtest/gtest.h>

#include <cblas.h>

#include "cpu/cpu_ops.h"
#include "cpu/quant_matmul.h"
#include "gguf/gguf.h"
#include "inferlab/testing/support.h"

namespace inferlab {
namespace test_linear_group {

namespace kc = kernels::cpu;

// Row counts of Q, K, V of a small GQA layer, one of them not a multiple of the
// four-row tiles, and input widths on and off the 16-float vectors.
TEST(LinearGroup, FloatGroupEqualsEachGemv) {
  for (const int64_t k : {576, 136, 64}) {
    const std::vector<int64_t> rows{576, 190, 3};
    const auto x = test::normal_floats(k, 1);
    std::vector<std::vector<float>> w, y, want;
    std::vector<kc::GemvTarget> targets;
    for (size_t i = 0; i < rows.size(); ++i) {
      w.push_back(test::normal_floats(rows[i] * k, 10 + i));
      y.emplace_back(size_t(rows[i]), -1.0f);
      want.emplace_back(size_t(rows[i]));
      cblas_sgemv(CblasRowMajor, CblasNoTrans, int(rows[i]), int(k), 1.0f, w[i].data(), int(k), x.data(), 1, 0.0f,
                  want[i].data(), 1);
    }
    for (size_t i = 0; i < rows.size(); ++i) targets.push_back({y[i].data(), w[i].data(), rows[i]});
    kc::gemv_group(targets.data(), int(targets.size()), x.data(), 1, k);
    for (size_t i = 0; i < rows.size(); ++i)
      for (int64_t r = 0; r < rows[i]; ++r)
        ASSERT_NEAR(y[i][size_t(r)], want[i][size_t(r)], 1e-4f * std::sqrt(float(k))) << "k " << k << " matrix " << i;
  }
}

// Several rows of x (a decode step of several sequences): each row's products
// are those of that row alone, bit for bit, so a sequence's logits do not
// depend on the batch it decodes in; beyond kGemvMaxRows rows, sgemm.
TEST(LinearGroup, SeveralRowsEqualEachRowAloneBitForBit) {
  for (const int64_t k : {576, 136}) {
    for (const int64_t m : {int64_t(2), int64_t(5), kc::kGemvMaxRows}) {
      const int64_t n = 190;
      const auto x = test::normal_floats(m * k, 3), w = test::normal_floats(n * k, 4);
      std::vector<float> y(static_cast<size_t>(m * n), -1.0f), one(static_cast<size_t>(n));
      kc::matmul_xwt(y.data(), x.data(), w.data(), m, n, k);
      for (int64_t i = 0; i < m; ++i) {
        kc::matmul_xwt(one.data(), x.data() + i * k, w.data(), 1, n, k);
        EXPECT_EQ(std::vector<float>(y.begin() + i * n, y.begin() + (i + 1) * n), one) << "k " << k << " m " << m;
      }
      std::vector<float> g(size_t(m * n), -1.0f);
      const kc::GemvTarget target{g.data(), w.data(), n};
      kc::gemv_group(&target, 1, x.data(), m, k);
      EXPECT_EQ(g, y) << "k " << k << " m " << m;
    }
  }
}

TEST(LinearGroup, QuantizedGroupEqualsEachProductBitForBit) {
  const int64_t k = 256;
  const std::vector<std::pair<gguf::TensorType, kc::QuantType>> types{
      {gguf::TensorType::Q4_1, kc::QuantType::Q4_1}, {gguf::TensorType::Q8_0, kc::QuantType::Q8_0},
      {gguf::TensorType::Q4_0, kc::QuantType::Q4_0}};
  const std::vector<int64_t> rows{130, 64, 7};
  for (const int64_t m : {int64_t(1), int64_t(3)}) {
    const auto x = test::normal_floats(m * k, 2);
    std::vector<std::vector<uint8_t>> blocks;
    std::vector<std::vector<float>> y, want;
    std::vector<kc::QuantTarget> targets;
    kc::QuantScratch scratch;
    for (size_t i = 0; i < rows.size(); ++i) {  // a different type per matrix: one activation format serves all
      auto q = gguf::quantize(types[i].first, test::normal_floats(rows[i] * k, 20 + i).data(), rows[i] * k);
      ASSERT_TRUE(q.ok());
      blocks.push_back(std::move(*q));
      y.emplace_back(size_t(m * rows[i]), -1.0f);
      want.emplace_back(size_t(m * rows[i]));
    }
    for (size_t i = 0; i < rows.size(); ++i) {
      const kc::QuantMatrixRef w{types[i].second, blocks[i].data(), rows[i], k};
      kc::quant_matmul_xwt(want[i].data(), x.data(), w, m, scratch);
      targets.push_back({y[i].data(), w});
    }
    kc::quant_matmul_group(targets.data(), int(targets.size()), x.data(), m, scratch);
    for (size_t i = 0; i < rows.size(); ++i) EXPECT_EQ(y[i], want[i]) << "m " << m << " matrix " << i;
  }
}

}  // namespace test_linear_group
}  // namespace inferlab
