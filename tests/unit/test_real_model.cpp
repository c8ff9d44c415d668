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
namespace {

std::shared_ptr<Model> real_model() {
  static std::shared_ptr<Model> model = [] {
    const auto path = test::default_model_path();
    if (path.empty()) return std::shared_ptr<Model>();
    auto loaded = Model::load(path);
    EXPECT_TRUE(loaded.ok()) << (loaded.ok() ? "" : loaded.message());
    return loaded.ok() ? *loaded : nullptr;
  }();
  return model;
}

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

}  // namespace
}  // namespace inferlab
