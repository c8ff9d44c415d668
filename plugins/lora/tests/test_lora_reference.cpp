// LoRA on the real model (SmolLM2-135M-Instruct; skipped when it is not
// installed) against two independent implementations, from golden fixtures
// (tests/reference/make_peft_fixture.py, transformers + peft and llama.cpp):
//  - two PEFT adapters with random non-zero B written by peft on the model
//    transformers loaded from our GGUF: "a" (r 4, alpha 8, q/k/v/o/gate/up/down
//    of layers 0, 14, 29) and "b" (rsLoRA, r 8, alpha 16, a regex target: q
//    and v of layer 5), float16 files; the logits of both prompts at every
//    position with the base, a, b and both together (peft's summed adapters),
//    merged and unmerged here. That q_proj and k_proj meet GGUF's row order
//    (lora_B permuted) is what makes "a" agree at all.
//  - adapter "a" converted by llama.cpp's convert_lora_to_gguf.py, applied by
//    llama.cpp (F32 copy of the model, f32 KV cache) and read here as GGUF.
// Compared: each reference top-8 entry's logit and the log-sum-exp over the
// vocabulary, within 2e-3 (the references agree with each other to 7e-5;
// our CPU engine and llama.cpp on the base to about 1e-4). The adapters move
// logits by up to 3-5, so a misapplied adapter cannot pass.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "inferlab/testing.h"

namespace inferlab {
namespace test_lora_reference {

const std::filesystem::path kReference = std::filesystem::path(__FILE__).parent_path() / "../../../tests/reference";

nlohmann::json read_json(const std::string& name) {
  std::ifstream in(kReference / name);
  EXPECT_TRUE(in) << "missing fixture " << (kReference / name);
  return in ? nlohmann::json::parse(in) : nlohmann::json();
}

std::shared_ptr<Model> real_model() { return test::default_model(); }

// The largest difference between our logits of `prompt` (all positions) and
// a reference run (per position: top-8 [id, logit] and lse).
double max_difference(Engine& e, Method* method, const std::vector<int32_t>& prompt, const nlohmann::json& run) {
  const auto got = test::run_trace(e, method, prompt, 0);
  const int64_t v = e.config().n_vocab;
  EXPECT_EQ(int64_t(got.logits.size()), int64_t(prompt.size()) * v);
  double worst = 0;
  for (size_t pos = 0; pos < prompt.size() && (pos + 1) * size_t(v) <= got.logits.size(); ++pos) {
    const float* row = got.logits.data() + pos * size_t(v);
    double max = row[0], sum = 0;
    for (int64_t i = 0; i < v; ++i) max = std::max(max, double(row[i]));
    for (int64_t i = 0; i < v; ++i) sum += std::exp(double(row[i]) - max);
    worst = std::max(worst, std::fabs(max + std::log(sum) - run[pos].at("lse").get<double>()));
    for (const auto& entry : run[pos].at("top"))
      worst = std::max(worst, std::fabs(double(row[entry[0].get<int64_t>()]) - entry[1].get<double>()));
  }
  return worst;
}

constexpr double kTolerance = 2e-3;

TEST(LoraReference, PeftAdaptersGiveTransformersAndPeftLogits) {
  auto model = real_model();
  if (!model) GTEST_SKIP() << "default model not installed (scripts/fetch-model.sh)";
  const auto fixture = read_json("peft_smollm2_logits.json");
  auto engine = Engine::create(model, EngineOptions{16, 0, 0});
  ASSERT_TRUE(engine.ok());
  const auto a = (kReference / "peft_smollm2_a").lexically_normal().string();
  const auto b = (kReference / "peft_smollm2_b").lexically_normal().string();
  const std::vector<std::pair<std::string, std::vector<std::string>>> runs = {
      {"a", {a}}, {"b", {b}}, {"a+b", {a, b}}};
  double worst = 0;
  for (size_t p = 0; p < fixture.at("prompts").size(); ++p) {
    const auto prompt = fixture.at("prompts")[p].get<std::vector<int32_t>>();
    SCOPED_TRACE("prompt " + std::to_string(p));
    EXPECT_LT(max_difference(**engine, nullptr, prompt, fixture.at("runs").at("base")[p]), kTolerance) << "base";
    for (const auto& [name, paths] : runs)
      for (const bool merge : {false, true}) {
        test::ActiveMethod active =
            test::activate_method(**engine, "lora", test::params({{"adapter", paths}, {"merge", merge}}));
        ASSERT_NE(active.handle.get(), nullptr);
        const double diff = max_difference(**engine, active.handle.get(), prompt, fixture.at("runs").at(name)[p]);
        (void)(*engine)->set_method(nullptr, 0);
        EXPECT_LT(diff, kTolerance) << name << (merge ? " merged" : " unmerged");
        worst = std::max(worst, diff);
        // The adapter mattered: the base run is far from this one.
        EXPECT_GT(max_difference(**engine, nullptr, prompt, fixture.at("runs").at(name)[p]), 0.1) << name;
      }
  }
  std::printf("[ measured ] largest |logit - transformers+peft| with adapters: %.2e\n", worst);
}

// An adapter `inferlab finetune` trained and wrote (tests/reference/
// make_finetune_peft_fixture.py), loaded by PEFT onto the transformers model:
// the same logits as the lora plugin gives with that folder. q_proj and k_proj
// agreeing shows the writer put lora_B's rows back in Hugging Face's order.
TEST(LoraReference, AnAdapterInferlabTrainedGivesPeftsLogits) {
  auto model = real_model();
  if (!model) GTEST_SKIP() << "default model not installed (scripts/fetch-model.sh)";
  const auto fixture = read_json("finetuned_smollm2_logits.json");
  auto engine = Engine::create(model, EngineOptions{16, 0, 0});
  ASSERT_TRUE(engine.ok());
  const auto adapter = (kReference / fixture.at("adapter").get<std::string>()).lexically_normal().string();
  double worst = 0;
  for (size_t p = 0; p < fixture.at("prompts").size(); ++p) {
    const auto prompt = fixture.at("prompts")[p].get<std::vector<int32_t>>();
    SCOPED_TRACE("prompt " + std::to_string(p));
    for (const bool merge : {false, true}) {
      test::ActiveMethod active = test::activate_method(
          **engine, "lora", test::params({{"adapter", std::vector<std::string>{adapter}}, {"merge", merge}}));
      ASSERT_NE(active.handle.get(), nullptr);
      const double diff = max_difference(**engine, active.handle.get(), prompt, fixture.at("runs").at("finetuned")[p]);
      (void)(*engine)->set_method(nullptr, 0);
      EXPECT_LT(diff, kTolerance) << (merge ? "merged" : "unmerged");
      worst = std::max(worst, diff);
    }
    EXPECT_GT(max_difference(**engine, nullptr, prompt, fixture.at("runs").at("finetuned")[p]), 0.1)
        << "the trained adapter changes nothing";
  }
  std::printf("[ measured ] largest |logit - transformers+peft| with the adapter inferlab trained: %.2e\n", worst);
}

TEST(LoraReference, TheGgufAdapterGivesLlamaCppLogits) {
  auto model = real_model();
  if (!model) GTEST_SKIP() << "default model not installed (scripts/fetch-model.sh)";
  const auto fixture = read_json("llamacpp_lora_logits.json");
  auto engine = Engine::create(model, EngineOptions{16, 0, 0});
  ASSERT_TRUE(engine.ok());
  const auto adapter = (kReference / fixture.at("adapter").get<std::string>()).lexically_normal().string();
  for (size_t p = 0; p < fixture.at("prompts").size(); ++p) {
    const auto prompt = fixture.at("prompts")[p].get<std::vector<int32_t>>();
    SCOPED_TRACE("prompt " + std::to_string(p));
    EXPECT_LT(max_difference(**engine, nullptr, prompt, fixture.at("runs").at("base")[p]), kTolerance) << "base";
    test::ActiveMethod active =
        test::activate_method(**engine, "lora", test::params({{"adapter", std::vector<std::string>{adapter}}}));
    ASSERT_NE(active.handle.get(), nullptr);
    const double diff = max_difference(**engine, active.handle.get(), prompt, fixture.at("runs").at("a")[p]);
    (void)(*engine)->set_method(nullptr, 0);
    EXPECT_LT(diff, kTolerance);
    std::printf("[ measured ] prompt %zu: largest |logit - llama.cpp| with the GGUF adapter: %.2e\n", p, diff);
  }
}

}  // namespace test_lora_reference
}  // namespace inferlab
