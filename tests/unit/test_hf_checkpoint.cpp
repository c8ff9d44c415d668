// Hugging Face checkpoint folders against transformers: tiny random Llama,
// Llama with attention biases in shards, Qwen2 (Q/K/V biases, tied, BF16,
// padded vocabulary), Mistral (sliding window) and Llama 3.1 (llama3 RoPE
// scaling; its GGUF form, rope_freqs.weight, too), written by
// tests/reference/make_hf_model_fixture.py with transformers' float32 logits
// and greedy continuations. The same weights converted to GGUF (Q/K rows
// permuted for Llama, NeoX pairs for Qwen2) give the same logits.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "adapter_method.h"
#include "engine/engine.h"
#include "formats/gguf_adapter.h"
#include "formats/peft_adapter.h"
#include "formats/safetensors.h"
#include "model/hf_checkpoint.h"
#include "model/model.h"

namespace inferlab {
namespace test_hf_checkpoint {

namespace fs = std::filesystem;
const fs::path kReference = fs::path(__FILE__).parent_path() / "../reference";
const fs::path kModels = kReference / "hf_models";

const nlohmann::json& fixture() {
  static const nlohmann::json j = [] {
    std::ifstream in(kReference / "hf_models_logits.json");
    return in ? nlohmann::json::parse(in) : nlohmann::json::object();
  }();
  return j;
}

std::shared_ptr<Model> load(const fs::path& path) {
  auto model = Model::load(path);
  EXPECT_TRUE(model.ok()) << model.message();
  return model.ok() ? *model : nullptr;
}

std::vector<int32_t> ids_of(const nlohmann::json& c) { return c["ids"].get<std::vector<int32_t>>(); }

// All rows' logits of `ids` from a fresh sequence.
std::vector<std::vector<float>> logits(Engine& engine, const std::vector<int32_t>& ids) {
  std::vector<std::vector<float>> rows;
  auto seq = engine.new_sequence();
  auto s = engine.forward(*seq, ids, 0, [&](int64_t, std::span<const float> l) { rows.emplace_back(l.begin(), l.end()); });
  EXPECT_TRUE(s.ok()) << s.message();
  return rows;
}

std::vector<int32_t> greedy(Engine& engine, const std::vector<int32_t>& ids, int steps) {
  auto seq = engine.new_sequence();
  auto last = engine.prefill(*seq, ids);
  EXPECT_TRUE(last.ok()) << last.message();
  std::vector<int32_t> out;
  for (int i = 0; i < steps && last.ok(); ++i) {
    const auto& l = *last;
    out.push_back(int32_t(std::max_element(l.begin(), l.end()) - l.begin()));
    last = engine.decode(*seq, out.back());
    EXPECT_TRUE(last.ok()) << last.message();
  }
  return out;
}

class HfCheckpoint : public ::testing::TestWithParam<std::string> {};

TEST_P(HfCheckpoint, LogitsAndGreedyTokensMatchTransformers) {
  const std::string name = GetParam();
  ASSERT_TRUE(fixture().contains(name)) << "missing fixture hf_models_logits.json (make_hf_model_fixture.py)";
  auto model = load(kModels / name);
  ASSERT_TRUE(model);
  auto engine = Engine::create(model, EngineOptions{.page_size = 8});
  ASSERT_TRUE(engine.ok()) << engine.message();
  int checked = 0;
  for (const auto& c : fixture()[name]) {
    const auto ids = ids_of(c);
    // The HF tokenizer's ids, special tokens included, from our tokenizer.json reader.
    EXPECT_EQ(model->tokenizer().encode(c["text"].get<std::string>(), model->tokenizer().add_bos_default(), false), ids)
        << name << ": " << c["text"];
    const auto rows = logits(**engine, ids);
    ASSERT_EQ(rows.size(), ids.size());
    for (size_t k = 0; k < c["rows"].size(); ++k) {
      const int32_t r = c["rows"][k].get<int32_t>();
      const auto want = c["logits"][k].get<std::vector<float>>();
      ASSERT_EQ(rows[size_t(r)].size(), want.size());
      float worst = 0, scale = 0;
      for (size_t v = 0; v < want.size(); ++v) {
        worst = std::max(worst, std::fabs(rows[size_t(r)][v] - want[v]));
        scale = std::max(scale, std::fabs(want[v]));
      }
      EXPECT_LT(worst, 1e-4f * std::max(1.0f, scale)) << name << " row " << r << " (logits up to " << scale << ")";
    }
    EXPECT_EQ(greedy(**engine, ids, int(c["greedy"].size())), c["greedy"].get<std::vector<int32_t>>()) << name;
    ++checked;
  }
  EXPECT_GE(checked, 2);
}

INSTANTIATE_TEST_SUITE_P(Models, HfCheckpoint, ::testing::Values("llama", "llama-sharded", "qwen2", "mistral", "llama31"),
                         [](const auto& info) {
                           std::string s = info.param;
                           std::replace(s.begin(), s.end(), '-', '_');
                           return s;
                         });

TEST(HfCheckpointConfig, ReadsEachVariantsShape) {
  auto llama = load(kModels / "llama");
  auto sharded = load(kModels / "llama-sharded");
  auto qwen = load(kModels / "qwen2");
  auto mistral = load(kModels / "mistral");
  ASSERT_TRUE(llama && sharded && qwen && mistral);
  EXPECT_EQ(llama->config().architecture, "llama");
  EXPECT_TRUE(llama->config().rope_neox);
  EXPECT_FALSE(llama->config().qkv_bias);
  EXPECT_FALSE(llama->config().tied_embeddings);
  EXPECT_EQ(llama->config().head_dim, 8);
  EXPECT_EQ(llama->config().n_kv_heads, 2);
  EXPECT_TRUE(sharded->config().qkv_bias && sharded->config().o_bias);
  EXPECT_EQ(sharded->weights().layers[1].bo.size(), 32u);
  EXPECT_TRUE(qwen->config().qkv_bias);
  EXPECT_FALSE(qwen->config().o_bias);
  EXPECT_TRUE(qwen->config().tied_embeddings);
  EXPECT_EQ(qwen->config().n_vocab, 392);  // padded past the tokenizer's 384
  EXPECT_EQ(qwen->tokenizer().vocab_size(), 384);
  EXPECT_EQ(mistral->config().window(0), 64);
  EXPECT_EQ(mistral->config().window(1), 64);
  EXPECT_FALSE(llama->config().has_window());
  auto llama31 = load(kModels / "llama31");
  ASSERT_TRUE(llama31);
  const kernels::RopeScaling s = llama31->config().rope();
  EXPECT_EQ(s.kind, kernels::RopeScaling::Kind::Llama3);
  EXPECT_EQ(s.factor, 8.0f);
  EXPECT_EQ(s.original_context, 16.0f);
  // The rule's three bands at head dim 8 (inverse frequencies 1, 0.1, 0.01,
  // 0.001; wavelengths 6.3, 63, 628, 6283 against 16 / 4 and 16 / 1):
  EXPECT_NEAR(kernels::rope_inv_freq(1, 8, 10000.0f, s), 0.1f / 8, 1e-7);    // low frequency: divided
  const float smooth = (16.0f / (2 * 3.14159265f) - 1.0f) / 3.0f;          // pair 0: blended
  EXPECT_NEAR(kernels::rope_inv_freq(0, 8, 10000.0f, s), (1 - smooth) / 8 + smooth, 1e-6);
  auto converted = load(kModels / "llama31.gguf");
  ASSERT_TRUE(converted);
  EXPECT_EQ(converted->config().rope_freq_factors.size(), 4u);  // llama.cpp's rope_freqs.weight
  // The chat template comes from tokenizer_config.json.
  EXPECT_NE(qwen->chat_template().find("<|im_start|>"), std::string::npos);
  // A checkpoint's checksum covers the folder; the weights' bytes are the file size.
  EXPECT_EQ(llama->checksum().size(), 64u);
  EXPECT_GT(sharded->file_size(), 100000u);
}

// The GGUF conversion of the same weights: what llama.cpp's converter writes
// (Q/K rows permuted into adjacent pairs for Llama; Qwen2 keeps NeoX pairs).
TEST(HfCheckpointConfig, TheGgufConversionGivesTheSameLogits) {
  for (const auto& [folder, gguf] :
       {std::pair{"llama", "llama.gguf"}, {"qwen2", "qwen2.gguf"}, {"llama31", "llama31.gguf"}}) {
    auto hf = load(kModels / folder);
    auto converted = load(kModels / gguf);
    ASSERT_TRUE(hf && converted);
    EXPECT_EQ(converted->config().rope_neox, std::string(folder) == "qwen2");
    EXPECT_EQ(converted->config().qkv_bias, hf->config().qkv_bias);
    auto a = Engine::create(hf, EngineOptions{.page_size = 8});
    auto b = Engine::create(converted, EngineOptions{.page_size = 8});
    ASSERT_TRUE(a.ok() && b.ok());
    const auto ids = ids_of(fixture()[folder][0]);
    const auto la = logits(**a, ids), lb = logits(**b, ids);
    ASSERT_EQ(la.size(), lb.size());
    float worst = 0;
    for (size_t r = 0; r < la.size(); ++r)
      for (size_t v = 0; v < la[r].size(); ++v) worst = std::max(worst, std::fabs(la[r][v] - lb[r][v]));
    EXPECT_LT(worst, 1e-4f) << folder;
  }
}

// The long Mistral prompt (169 tokens, window 64) matches transformers above;
// here the same checkpoint without its window: the rows before the window
// agree, the last rows do not (the window is doing something).
TEST(HfCheckpointConfig, TheSlidingWindowIsWhatMakesTheLongPromptMatch) {
  const fs::path dir = fs::temp_directory_path() / ("inferlab_hf_nowindow_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::copy(kModels / "mistral", dir, fs::copy_options::recursive);
  nlohmann::json j;
  {
    std::ifstream in(dir / "config.json");
    j = nlohmann::json::parse(in);
  }
  j["sliding_window"] = nullptr;
  std::ofstream(dir / "config.json") << j.dump(2);
  auto windowed = load(kModels / "mistral");
  auto full = load(dir);
  ASSERT_TRUE(windowed && full);
  EXPECT_FALSE(full->config().has_window());
  auto a = Engine::create(windowed, EngineOptions{.page_size = 8});
  auto b = Engine::create(full, EngineOptions{.page_size = 8});
  ASSERT_TRUE(a.ok() && b.ok());
  const auto ids = ids_of(fixture()["mistral"][2]);
  ASSERT_GT(ids.size(), 100u);
  const auto la = logits(**a, ids), lb = logits(**b, ids);
  ASSERT_EQ(la.size(), ids.size());
  ASSERT_EQ(lb.size(), ids.size());
  for (size_t r = 0; r < 64; ++r)  // the same arithmetic, in a call of 64 rows instead of 169
    for (size_t v = 0; v < la[r].size(); ++v) ASSERT_NEAR(la[r][v], lb[r][v], 1e-4f) << "row " << r;
  float differ = 0;
  for (size_t v = 0; v < la.back().size(); ++v) differ = std::max(differ, std::fabs(la.back()[v] - lb.back()[v]));
  EXPECT_GT(differ, 1e-2f);
  fs::remove_all(dir);
}

// ---- bad input: a copy of a fixture folder, broken one way at a time ----

class HfBadInput : public ::testing::Test {
 protected:
  void SetUp() override {
    dir_ = fs::temp_directory_path() / ("inferlab_hf_bad_" + std::to_string(::getpid()));
    fs::remove_all(dir_);
    fs::copy(kModels / "llama", dir_, fs::copy_options::recursive);
  }
  void TearDown() override { fs::remove_all(dir_); }
  void edit_config(const std::function<void(nlohmann::json&)>& change) {
    nlohmann::json j;
    {
      std::ifstream in(dir_ / "config.json");
      j = nlohmann::json::parse(in);
    }
    change(j);
    std::ofstream(dir_ / "config.json") << j.dump(2);
  }
  std::string error() {
    auto m = Model::load(dir_);
    EXPECT_FALSE(m.ok());
    return m.ok() ? std::string() : m.message();
  }
  fs::path dir_;
};

TEST_F(HfBadInput, ConfigProblemsNameTheFileAndTheKey) {
  edit_config([](auto& j) { j["model_type"] = "gpt_neox"; });
  std::string e = error();
  EXPECT_NE(e.find("config.json"), std::string::npos) << e;
  EXPECT_NE(e.find("\"model_type\" \"gpt_neox\" is not supported"), std::string::npos) << e;

  edit_config([](auto& j) {
    j["model_type"] = "llama";
    j.erase("hidden_size");
    j["rope_parameters"]["rope_type"] = "yarn";
  });
  e = error();
  EXPECT_NE(e.find("missing key \"hidden_size\""), std::string::npos) << e;
  EXPECT_NE(e.find("rope_parameters.rope_type"), std::string::npos) << e;

  edit_config([](auto& j) {
    j["hidden_size"] = 32;
    j["rope_parameters"]["rope_type"] = "default";
    j["hidden_act"] = "gelu";
    j["num_key_value_heads"] = 3;
  });
  e = error();
  EXPECT_NE(e.find("\"hidden_act\" 'gelu'"), std::string::npos) << e;
  EXPECT_NE(e.find("\"num_key_value_heads\" 3"), std::string::npos) << e;

  std::ofstream(dir_ / "config.json") << "{\"model_type\": \"llama\",";
  e = error();
  EXPECT_NE(e.find("config.json: malformed JSON at byte"), std::string::npos) << e;
}

TEST_F(HfBadInput, WeightProblemsNameTheFileAndTheTensor) {
  edit_config([](auto& j) { j["intermediate_size"] = 48; });
  std::string e = error();
  EXPECT_NE(e.find("model.safetensors: tensor model.layers.0.mlp.gate_proj.weight has shape 64x32 but config.json "
                   "implies 48x32"),
            std::string::npos)
      << e;

  edit_config([](auto& j) { j["intermediate_size"] = 64; j["attention_bias"] = true; });
  e = error();
  EXPECT_NE(e.find("no file holds tensor model.layers.0.self_attn."), std::string::npos) << e;

  edit_config([](auto& j) { j["attention_bias"] = false; });
  fs::remove(dir_ / "model.safetensors");
  e = error();
  EXPECT_NE(e.find("neither model.safetensors nor model.safetensors.index.json"), std::string::npos) << e;

  std::ofstream(dir_ / "model.safetensors.index.json")
      << R"({"weight_map": {"model.embed_tokens.weight": "../elsewhere.safetensors"}})";
  e = error();
  EXPECT_NE(e.find("\"weight_map.model.embed_tokens.weight\" = \"../elsewhere.safetensors\" is not a file name inside "
                   "the folder"),
            std::string::npos)
      << e;

  ASSERT_TRUE(safetensors::write_f32(dir_ / "model.safetensors", {{"model.extra.weight", {2}, {1.0f, 2.0f}}}).ok());
  fs::remove(dir_ / "model.safetensors.index.json");
  e = error();
  EXPECT_NE(e.find("unexpected tensor model.extra.weight"), std::string::npos) << e;

  fs::remove(dir_ / "tokenizer.json");
  e = error();
  EXPECT_NE(e.find("tokenizer.json"), std::string::npos) << e;
}

// Loads an adapter file or folder at on_load (WeightEditor::load_adapter).
class AdapterFileMethod final : public Method {
 public:
  explicit AdapterFileMethod(fs::path path) : path_(std::move(path)) {}
  Status on_load(const LoadContext& ctx) override { return ctx.overrides->load_adapter(path_.string(), 1.0f, false); }

 private:
  fs::path path_;
};

// The same adapters as a PEFT folder and as a llama.cpp GGUF adapter meet the
// same rows whether the model is the checkpoint folder (Hugging Face's Q/K row
// order) or its GGUF conversion (rows permuted): four runs, one set of logits.
TEST(HfCheckpointConfig, AdaptersMeetTheSameRowsOnTheFolderAndOnItsGgufConversion) {
  auto hf = load(kModels / "llama");
  auto converted = load(kModels / "llama.gguf");
  ASSERT_TRUE(hf && converted);
  const ModelConfig& c = converted->config();
  // In the GGUF model's row order (this engine's for it).
  std::vector<peft::ProjectionAdapter> adapters;
  uint64_t seed = 5;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    adapters.push_back({"attn_q", l, test::random_adapter(c.q_dim(), c.n_embd, 2, seed++, 2.0f, false, 0.3f)});
    adapters.push_back({"attn_k", l, test::random_adapter(c.kv_dim(), c.n_embd, 2, seed++, 2.0f, false, 0.3f)});
  }
  const fs::path dir = fs::temp_directory_path() / ("inferlab_hf_adapters_" + std::to_string(::getpid()));
  fs::remove_all(dir);
  fs::create_directories(dir);
  peft::WriteOptions options;
  options.overwrite = true;
  ASSERT_TRUE(peft::write_adapter(dir / "peft", adapters, model_shape(c), options).ok());
  ASSERT_TRUE(gguf_adapter::write_adapter(dir / "adapter.gguf", adapters, "llama").ok());
  const auto tokens = ids_of(fixture()["llama"][0]);
  std::vector<std::vector<float>> runs;
  for (const auto& model : {converted, hf})
    for (const fs::path& file : {dir / "peft", dir / "adapter.gguf"}) {
      auto engine = Engine::create(model, EngineOptions{.page_size = 8});
      ASSERT_TRUE(engine.ok());
      AdapterFileMethod method(file);
      auto logits = test::run_with_method(**engine, &method, kHookLoad, tokens, 4);
      ASSERT_TRUE(logits.ok()) << file << ": " << logits.message();
      runs.push_back(*logits);
    }
  auto dense = Engine::create(converted, EngineOptions{.page_size = 8});
  ASSERT_TRUE(dense.ok());
  auto plain = test::run_with_method(**dense, nullptr, 0, tokens, 4);
  ASSERT_TRUE(plain.ok());
  EXPECT_GT(test::normalized_max_error(runs[0], *plain), 1e-3) << "the adapters changed nothing";
  for (size_t i = 1; i < runs.size(); ++i) EXPECT_LT(test::normalized_max_error(runs[i], runs[0]), 1e-5) << "run " << i;
  fs::remove_all(dir);
}

TEST(HfCheckpointConfig, AFolderWithoutConfigIsNotAModel) {
  const fs::path dir = fs::temp_directory_path() / ("inferlab_hf_empty_" + std::to_string(::getpid()));
  fs::create_directories(dir);
  auto r = resolve_model(dir.string());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("without config.json"), std::string::npos) << r.message();
  auto ok = resolve_model((kModels / "llama").string());
  EXPECT_TRUE(ok.ok()) << ok.message();
  fs::remove_all(dir);
}

}  // namespace test_hf_checkpoint
}  // namespace inferlab
