// End-to-end checks on the default model (skipped when it is not installed):
// golden top-1 predictions from llama.cpp, an independent implementation, and
// tokenization of the same prompts. Regenerate the fixture with
// tests/reference/make_top1_fixture.py.
#include <gtest/gtest.h>

#include <fstream>
#include <nlohmann/json.hpp>

#include "engine/engine.h"
#include "engine/generation.h"
#include "test_support.h"

namespace inferlab {
namespace test_real_model {

std::shared_ptr<Model> real_model() { return test::default_model(); }

nlohmann::json fixture() {
  std::ifstream in(std::filesystem::path(__FILE__).parent_path() / "../reference/smollm2_llamacpp_top1.json");
  return nlohmann::json::parse(in);
}

TEST(EngineRealModel, Top1MatchesLlamaCpp) {
  auto model = real_model();
  if (!model) GTEST_SKIP() << "default model not installed (scripts/fetch-model.sh)";
  const auto golden = fixture();
  ASSERT_EQ(model->checksum(), golden.at("model_sha256").get<std::string>());
  auto engine = Engine::create(model);
  ASSERT_TRUE(engine.ok());
  for (const auto& c : golden.at("cases")) {
    const auto tokens = c.at("tokens").get<std::vector<int32_t>>();
    const auto top1 = c.at("top1").get<std::vector<int32_t>>();
    const auto margin = c.at("margin").get<std::vector<double>>();
    EXPECT_EQ(model->tokenizer().encode(c.at("text").get<std::string>(), false, true), tokens) << c.at("name");
    auto seq = (*engine)->new_sequence();
    std::vector<int32_t> ours;
    auto s = (*engine)->forward(*seq, tokens, 0, [&](int64_t, std::span<const float> l) {
      ours.push_back(int32_t(std::max_element(l.begin(), l.end()) - l.begin()));
    });
    ASSERT_TRUE(s.ok()) << s.message();
    ASSERT_EQ(ours.size(), top1.size());
    for (size_t i = 0; i < ours.size(); ++i) {
      // Both compute in f32; a tie closer than rounding noise may flip.
      if (margin[i] > 1e-3) {
        EXPECT_EQ(ours[i], top1[i]) << c.at("name") << " position " << i;
      }
    }
  }
}

// weights = file computes with the Q4_1 blocks as llama.cpp does (activations
// quantized per 32 values to 8 bits, integer dots) for decode-sized calls, and
// through dequantized weights for larger ones; checked against llama.cpp on the
// same file. The first token of a prompt has no attention to differ in: there
// the two agree to float rounding (a rare activation rounding flip allowed).
// Later positions differ as two realizations of the 8-bit activation noise: a
// last-bit difference in attention flips an activation's rounding, and the
// flips spread through the layers (measured: the same size as the f32 path's
// own distance to llama.cpp's Q4_1 logits, about 0.7 on the top logits).
TEST(EngineRealModel, FileWeightsMatchLlamaCppOnTheSameFile) {
  auto model = real_model();
  if (!model) GTEST_SKIP() << "default model not installed (scripts/fetch-model.sh)";
  std::ifstream in(std::filesystem::path(__FILE__).parent_path() / "../reference/smollm2_llamacpp_q4_1.json");
  ASSERT_TRUE(in) << "missing fixture smollm2_llamacpp_q4_1.json";
  const auto golden = nlohmann::json::parse(in);
  ASSERT_EQ(model->checksum(), golden.at("model_sha256").get<std::string>());
  auto engine = Engine::create(model, EngineOptions{.weights = WeightSource::File});
  ASSERT_TRUE(engine.ok()) << engine.message();
  for (const bool one_at_a_time : {true, false}) {
    SCOPED_TRACE(one_at_a_time ? "one token per call (integer dots)" : "whole prompts (dequantized weights)");
    double worst = 0, worst_first = 0;
    int agree = 0, decided = 0;
    for (const auto& c : golden.at("cases")) {
      const auto tokens = c.at("tokens").get<std::vector<int32_t>>();
      std::vector<std::vector<float>> rows;
      auto keep = [&](int64_t, std::span<const float> l) { rows.emplace_back(l.begin(), l.end()); };
      auto seq = (*engine)->new_sequence();
      if (one_at_a_time) {
        for (const int32_t t : tokens) ASSERT_TRUE((*engine)->forward(*seq, std::span(&t, 1), 0, keep).ok());
      } else {
        ASSERT_TRUE((*engine)->forward(*seq, tokens, 0, keep).ok());
      }
      const auto& want = c.at("rows");
      ASSERT_EQ(rows.size(), want.size());
      for (size_t r = 0; r < rows.size(); ++r) {
        const auto& top = want[r].at("top");
        double diff = 0;
        for (const auto& pair : top)
          diff = std::max(diff, std::abs(rows[r][size_t(pair[0].get<int32_t>())] - pair[1].get<double>()));
        worst = std::max(worst, diff);
        if (r == 0) worst_first = std::max(worst_first, diff);
        if (top[0][1].get<double>() - top[1][1].get<double>() > 0.5) {  // a clear winner
          ++decided;
          agree += int32_t(std::max_element(rows[r].begin(), rows[r].end()) - rows[r].begin()) ==
                   top[0][0].get<int32_t>();
        }
      }
    }
    std::cout << "[ info ] top-8 logits vs llama.cpp: worst " << worst << ", first tokens " << worst_first
              << "; clear top-1 agreement " << agree << "/" << decided << "\n";
    if (one_at_a_time) {
      EXPECT_LT(worst_first, 0.05);
    }
    EXPECT_LT(worst, 1.5);
    EXPECT_GT(decided, 40);
    EXPECT_EQ(agree, decided);
  }
}

TEST(EngineRealModel, GreedyAnswersTheCapitalOfFrance) {
  auto model = real_model();
  if (!model) GTEST_SKIP() << "default model not installed (scripts/fetch-model.sh)";
  auto engine = Engine::create(model);
  ASSERT_TRUE(engine.ok());
  const auto prompt = model->tokenizer().encode("The capital of France is", false, true);
  auto result = generate(**engine, prompt, 4, {}, nullptr);
  ASSERT_TRUE(result.ok());
  EXPECT_NE(model->tokenizer().decode(result->tokens).find("Paris"), std::string::npos)
      << model->tokenizer().decode(result->tokens);
}

}  // namespace test_real_model
}  // namespace inferlab
