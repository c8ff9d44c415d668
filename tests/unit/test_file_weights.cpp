// weights = file on the CPU backend: projections and the output head computed
// with the model file's own Q4_0 / Q4_1 / Q8_0 blocks (llama.cpp's arithmetic,
// kernels/cpu/quant_matmul) instead of float32 copies. Against the real model
// and llama.cpp: EngineRealModel.FileWeightsMatchLlamaCppOnTheSameFile.
#include <gtest/gtest.h>

#include "engine/engine.h"
#include "inferlab/testing/support.h"

namespace inferlab {
namespace test_file_weights {

// Logits of a prompt of `prefill` tokens (one call), then one decode call per token.
std::vector<std::vector<float>> run(Engine& engine, const std::vector<int32_t>& tokens, size_t prefill) {
  std::vector<std::vector<float>> rows;
  auto keep = [&](int64_t, std::span<const float> l) { rows.emplace_back(l.begin(), l.end()); };
  auto seq = engine.new_sequence();
  EXPECT_TRUE(engine.forward(*seq, std::span(tokens.data(), prefill), 0, keep).ok());
  for (size_t i = prefill; i < tokens.size(); ++i)
    EXPECT_TRUE(engine.forward(*seq, std::span(&tokens[i], 1), 0, keep).ok());
  return rows;
}

TEST(FileWeights, QuantizedBlocksAreComputedWithAndStayCloseToTheFloatWeights) {
  for (const auto type : {gguf::TensorType::Q4_0, gguf::TensorType::Q4_1, gguf::TensorType::Q8_0}) {
    SCOPED_TRACE(std::string(gguf::type_name(type)));
    SyntheticModelSpec spec;
    spec.name = "file_weights";
    spec.weight_type = type;
    spec.n_embd = 128;  // every input width a multiple of the 32-value blocks
    spec.n_ff = 256;
    auto model = test::load_synthetic(spec);
    ASSERT_TRUE(model);
    ASSERT_FALSE(model->weights().layers[0].file[size_t(LayerTensor::attn_q)].empty());
    auto f32 = Engine::create(model);
    auto file = Engine::create(model, EngineOptions{.weights = WeightSource::File});
    ASSERT_TRUE(f32.ok() && file.ok());
    const auto tokens = test::random_tokens(model->config().n_vocab, 30, 4);
    // 20 rows in one call: dequantized weights and sgemm, the float32 product;
    // the one-row calls after it: activations quantized per block, integer dots.
    const auto a = run(**file, tokens, 20), b = run(**f32, tokens, 20);
    ASSERT_EQ(a.size(), 30u);
    for (size_t r = 0; r < a.size(); ++r) {
      const double err = test::normalized_max_error(a[r], b[r]);
      if (r < 20) {
        EXPECT_LT(err, 1e-5) << "row " << r;
      } else {
        EXPECT_GT(err, 1e-6) << "row " << r << ": the quantized blocks were not computed with";
        EXPECT_LT(err, 0.05) << "row " << r;  // 8-bit activations, not another model
      }
    }
  }
}

TEST(FileWeights, AFloatModelRunsBitForBitAsWithFloatWeights) {
  SyntheticModelSpec spec;
  spec.name = "file_weights_f32";
  auto model = test::load_synthetic(spec);
  ASSERT_TRUE(model);
  EXPECT_TRUE(model->weights().layers[0].file[size_t(LayerTensor::attn_q)].empty());
  EXPECT_EQ(model->weights().file_tensor_bytes(), 0);
  auto f32 = Engine::create(model);
  auto file = Engine::create(model, EngineOptions{.weights = WeightSource::File});
  ASSERT_TRUE(f32.ok() && file.ok());
  const auto tokens = test::random_tokens(model->config().n_vocab, 12, 5);
  EXPECT_EQ(run(**file, tokens, 8), run(**f32, tokens, 8));
}

TEST(FileWeights, OnlyTheCpuBackendTakesThemAndNamesAreChecked) {
  SyntheticModelSpec spec;
  spec.name = "file_weights_cuda";
  spec.weight_type = gguf::TensorType::Q8_0;
  auto model = test::load_synthetic(spec);
  ASSERT_TRUE(model);
  auto cuda = Engine::create(model, EngineOptions{.backend = BackendKind::Cuda, .weights = WeightSource::File});
  ASSERT_FALSE(cuda.ok());
  EXPECT_NE(cuda.message().find("weights = file"), std::string::npos) << cuda.message();
  EXPECT_TRUE(parse_weight_source("file").ok());
  EXPECT_TRUE(parse_weight_source("f32").ok());
  auto bad = parse_weight_source("q4");
  ASSERT_FALSE(bad.ok());
  EXPECT_NE(bad.message().find("\"q4\" is not one of f32, file"), std::string::npos) << bad.message();
}

}  // namespace test_file_weights
}  // namespace inferlab
