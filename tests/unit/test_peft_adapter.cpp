// PEFT LoRA adapters (formats/peft_adapter.h): adapter_config.json's keys
// (list, regex or all-linear targets, rank and alpha patterns, rsLoRA); the
// Q/K row permutation GGUF conversion applies, on crafted rows; a folder
// written here read into this model's projections with their scales, lora_B
// of q_proj and k_proj permuted; every inconsistency refused naming the file
// and the module; through the engine (WeightEditor::load_adapter) the same
// logits as the adapters added one by one, merged equal to unmerged, a zero
// lora_B dense, a refused folder adding nothing.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "adapter_method.h"
#include "formats/peft_adapter.h"
#include "formats/safetensors.h"
#include "test_support.h"

namespace inferlab {
namespace test_peft_adapter {

// A well-formed safetensors file of float32 tensors (name -> (shape, values)).
void write_safetensors(const std::filesystem::path& path,
                       const std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>& tensors) {
  std::vector<safetensors::F32Tensor> list;
  for (const auto& [name, t] : tensors) list.push_back({name, t.first, t.second});
  ASSERT_TRUE(safetensors::write_f32(path, list).ok());
}

std::vector<float> iota(size_t n, float from) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = from + float(i);
  return v;
}

// 2 layers, 4 query heads of 16 over 2 kv heads, width 64, FFN 160, vocabulary 300.
ModelShape shape() {
  ModelShape s;
  s.n_layers = 2, s.n_heads = 4, s.n_kv_heads = 2, s.head_dim = 16, s.n_embd = 64, s.n_ff = 160, s.n_vocab = 300;
  return s;
}

std::filesystem::path adapter_dir(const std::string& name, const std::string& config,
                                  const std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>>& t) {
  const auto dir = test::temp_path(name);
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "adapter_config.json") << config;
  write_safetensors(dir / "adapter_model.safetensors", t);
  return dir;
}

const std::string kPrefix = "base_model.model.model.layers.";

TEST(PeftAdapter, GgufConversionPairsEachHeadsHalvesRowByRow) {
  // One head of 4 rows (2 values each): HF rows r0..r3 become r0, r2, r1, r3.
  const std::vector<float> hf = {0, 0, 1, 1, 2, 2, 3, 3};
  EXPECT_EQ(peft::permute_rows_for_gguf(hf, 1, 4, 2), (std::vector<float>{0, 0, 2, 2, 1, 1, 3, 3}));
  // Two heads of 4 rows, one value: each head on its own.
  EXPECT_EQ(peft::permute_rows_for_gguf({0, 1, 2, 3, 4, 5, 6, 7}, 2, 4, 1),
            (std::vector<float>{0, 2, 1, 3, 4, 6, 5, 7}));
}

TEST(PeftAdapter, ConfigKeysAreRead) {
  auto c = peft::parse_config(
      R"({"peft_type":"LORA","r":8,"lora_alpha":16,"use_rslora":true,"target_modules":["q_proj","v_proj"],)"
      R"("rank_pattern":{"layers.1.self_attn.q_proj":4},"alpha_pattern":{"v_proj":2},"layers_to_transform":[0,1],)"
      R"("task_type":"CAUSAL_LM","unknown_key":{"x":1}})",
      "cfg.json");
  ASSERT_TRUE(c.ok()) << c.message();
  EXPECT_EQ(c->r, 8);
  EXPECT_EQ(c->lora_alpha, 16);
  EXPECT_TRUE(c->use_rslora);
  EXPECT_EQ(c->target_list, (std::vector<std::string>{"q_proj", "v_proj"}));
  EXPECT_EQ(c->rank_pattern.size(), 1u);
  EXPECT_EQ(c->layers_to_transform, (std::vector<int32_t>{0, 1}));
  auto regex = peft::parse_config(R"({"r":4,"target_modules":".*\\.(q|k)_proj"})", "cfg.json");
  ASSERT_TRUE(regex.ok()) << regex.message();
  EXPECT_EQ(regex->target_regex, ".*\\.(q|k)_proj");
  EXPECT_EQ(regex->lora_alpha, 4);  // alpha defaults to r
  auto all = peft::parse_config(R"({"r":4,"target_modules":"all-linear"})", "cfg.json");
  ASSERT_TRUE(all.ok());
  EXPECT_TRUE(all->all_linear);
  const std::pair<std::string, std::string> bad[] = {
      {"{", "cfg.json: not JSON"},
      {R"({"target_modules":["q_proj"]})", "cfg.json: r: expected a rank"},
      {R"({"r":4})", "cfg.json: target_modules: missing"},
      {R"({"r":4,"target_modules":"(("})", "target_modules: '((' is not a regular expression"},
      {R"({"r":4,"target_modules":[]})", "target_modules: empty"},
      {R"({"peft_type":"IA3","r":4,"target_modules":["q_proj"]})", "peft_type: \"IA3\""},
      {R"({"r":4,"target_modules":["q_proj"],"lora_alpha":"big"})", "lora_alpha: expected a number"},
      {R"({"r":4,"target_modules":["q_proj"],"rank_pattern":{"((":2}})", "rank_pattern: '((' is not a regular expression"},
      {R"({"r":4,"target_modules":["q_proj"],"use_dora":true})", "use_dora: true: DoRA"},
      {R"({"r":4,"target_modules":["q_proj"],"bias":"lora_only"})", "bias: \"lora_only\": trained biases"},
      {R"({"r":4,"target_modules":["q_proj"],"fan_in_fan_out":true})", "fan_in_fan_out: true"},
  };
  for (const auto& [text, want] : bad) {
    auto r = peft::parse_config(text, "cfg.json");
    ASSERT_FALSE(r.ok()) << text;
    EXPECT_NE(r.message().find(want), std::string::npos) << r.message();
  }
}

TEST(PeftAdapter, AFolderBecomesThisModelsProjectionsWithTheirScales) {
  const ModelShape s = shape();
  const int r = 2;
  const auto dir = adapter_dir(
      "peft-ok",
      R"({"r":2,"lora_alpha":8,"target_modules":["q_proj","k_proj","down_proj"],"alpha_pattern":{"down_proj":2}})",
      {{kPrefix + "0.self_attn.q_proj.lora_A.weight", {{r, 64}, iota(size_t(r * 64), 0)}},
       {kPrefix + "0.self_attn.q_proj.lora_B.weight", {{64, r}, iota(size_t(64 * r), 1000)}},
       {kPrefix + "1.self_attn.k_proj.lora_A.weight", {{r, 64}, iota(size_t(r * 64), 0)}},
       {kPrefix + "1.self_attn.k_proj.lora_B.weight", {{32, r}, iota(size_t(32 * r), 2000)}},
       {kPrefix + "1.mlp.down_proj.lora_A.weight", {{r, 160}, iota(size_t(r * 160), 0)}},
       {kPrefix + "1.mlp.down_proj.lora_B.weight", {{64, r}, iota(size_t(64 * r), 3000)}}});
  auto adapters = peft::read_adapter(dir, s, true);
  ASSERT_TRUE(adapters.ok()) << adapters.message();
  ASSERT_EQ(adapters->size(), 3u);
  std::map<std::string, const peft::ProjectionAdapter*> by;
  for (const auto& a : *adapters) by[a.tensor + "." + std::to_string(a.layer)] = &a;
  const auto& q = *by.at("attn_q.0");
  EXPECT_EQ(q.adapter.rank, 2);
  EXPECT_FLOAT_EQ(q.adapter.scale, 4.0f);  // 8 / 2
  EXPECT_EQ(q.adapter.a, iota(size_t(r * 64), 0));
  EXPECT_EQ(q.adapter.b, peft::permute_rows_for_gguf(iota(size_t(64 * r), 1000), 4, 16, r));
  EXPECT_NE(q.adapter.b, iota(size_t(64 * r), 1000));
  const auto& k = *by.at("attn_k.1");  // permuted over the 2 kv heads
  EXPECT_EQ(k.adapter.b, peft::permute_rows_for_gguf(iota(size_t(32 * r), 2000), 2, 16, r));
  const auto& down = *by.at("ffn_down.1");  // not permuted; alpha from the pattern
  EXPECT_EQ(down.adapter.b, iota(size_t(64 * r), 3000));
  EXPECT_FLOAT_EQ(down.adapter.scale, 1.0f);  // 2 / 2
  // rsLoRA: alpha / sqrt(r)
  const auto rs = adapter_dir("peft-rs", R"({"r":2,"lora_alpha":8,"use_rslora":true,"target_modules":"all-linear"})",
                              {{kPrefix + "0.mlp.up_proj.lora_A.weight", {{r, 64}, iota(size_t(r * 64), 0)}},
                               {kPrefix + "0.mlp.up_proj.lora_B.weight", {{160, r}, iota(size_t(160 * r), 0)}}});
  auto rs_adapters = peft::read_adapter(rs, s, true);
  ASSERT_TRUE(rs_adapters.ok()) << rs_adapters.message();
  EXPECT_FLOAT_EQ(rs_adapters->at(0).adapter.scale, float(8 / std::sqrt(2.0)));
}

TEST(PeftAdapter, InconsistentFoldersAreRefusedNamingFileAndModule) {
  const ModelShape s = shape();
  const std::string cfg = R"({"r":2,"lora_alpha":4,"target_modules":["q_proj","lm_head"]})";
  auto a = [](int64_t rows, int64_t cols) { return std::make_pair(std::vector<int64_t>{rows, cols}, iota(size_t(rows * cols), 0)); };
  struct Case {
    std::string name, config;
    std::map<std::string, std::pair<std::vector<int64_t>, std::vector<float>>> tensors;
    std::string want;
  };
  const std::vector<Case> cases = {
      {"far-layer", cfg, {{kPrefix + "7.self_attn.q_proj.lora_A.weight", a(2, 64)}, {kPrefix + "7.self_attn.q_proj.lora_B.weight", a(64, 2)}},
       "module model.layers.7.self_attn.q_proj is not a projection of this model (2 layers"},
      {"bad-shape", cfg, {{kPrefix + "0.self_attn.q_proj.lora_A.weight", a(2, 63)}, {kPrefix + "0.self_attn.q_proj.lora_B.weight", a(64, 2)}},
       "module model.layers.0.self_attn.q_proj: lora_A (2, 63) and lora_B (64, 2); this model's attn_q needs (2, 64)"},
      {"half", cfg, {{kPrefix + "0.self_attn.q_proj.lora_A.weight", a(2, 64)}},
       "module model.layers.0.self_attn.q_proj has lora_A without lora_B"},
      {"untargeted", cfg, {{kPrefix + "0.self_attn.v_proj.lora_A.weight", a(2, 64)}, {kPrefix + "0.self_attn.v_proj.lora_B.weight", a(32, 2)}},
       "module model.layers.0.self_attn.v_proj has weights but"},
      {"tied-head", cfg, {{"base_model.model.lm_head.lora_A.weight", a(2, 64)}, {"base_model.model.lm_head.lora_B.weight", a(300, 2)}},
       "module lm_head: this model ties its output head to the embedding"},
      {"embedding", cfg, {{"base_model.model.model.embed_tokens.lora_embedding_A", a(2, 300)}},
       "LoRA on the embedding is not supported"},
      {"stray", cfg, {{"something.else", a(1, 1)}}, "tensor something.else: not a LoRA weight"},
      {"empty", cfg, {}, "no LoRA weights"},
  };
  for (const Case& c : cases) {
    const auto dir = adapter_dir("peft-" + c.name, c.config, c.tensors);
    auto r = peft::read_adapter(dir, s, true);
    ASSERT_FALSE(r.ok()) << c.name;
    EXPECT_NE(r.message().find((dir / "adapter_model.safetensors").string()), std::string::npos) << r.message();
    EXPECT_NE(r.message().find(c.want), std::string::npos) << c.name << ": " << r.message();
  }
  auto none = peft::read_adapter(test::temp_path("peft-missing"), s, true);
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.message().find("adapter_config.json: cannot open"), std::string::npos) << none.message();
}

// Loads a PEFT folder at on_load (WeightEditor::load_adapter).
class FolderMethod final : public Method {
 public:
  FolderMethod(std::filesystem::path dir, float scale, bool merge) : dir_(std::move(dir)), scale_(scale), merge_(merge) {}
  Status on_load(const LoadContext& ctx) override { return ctx.overrides->load_adapter(dir_.string(), scale_, merge_); }

 private:
  std::filesystem::path dir_;
  float scale_;
  bool merge_;
};

TEST(PeftAdapter, TheEngineAppliesAFolderAsTheAdaptersItHolds) {
  SyntheticModelSpec spec;
  spec.name = "peft-engine";
  spec.seed = 13;  // 2 layers, 4 heads over 2 kv heads, width 64, FFN 160, tied output
  auto model = test::load_synthetic(spec);
  auto engine = Engine::create(model, EngineOptions{8, 0, 0});
  ASSERT_TRUE(engine.ok());
  const ModelConfig& c = (*engine)->config();
  const int r = 4;
  const auto qa = test::random_adapter(c.q_dim(), c.n_embd, r, 1, 1.0f, false, 0.2f);
  const auto da = test::random_adapter(c.n_embd, c.n_ff, r, 2, 1.0f, false, 0.2f);
  auto write = [&](const std::string& name, bool zero_b) {
    std::vector<float> qb = qa.b, db = da.b;
    if (zero_b) std::fill(qb.begin(), qb.end(), 0.0f), std::fill(db.begin(), db.end(), 0.0f);
    return adapter_dir(name, R"({"r":4,"lora_alpha":8,"target_modules":["q_proj","down_proj"]})",
                       {{kPrefix + "0.self_attn.q_proj.lora_A.weight", {{r, c.n_embd}, qa.a}},
                        {kPrefix + "0.self_attn.q_proj.lora_B.weight", {{c.q_dim(), r}, qb}},
                        {kPrefix + "1.mlp.down_proj.lora_A.weight", {{r, c.n_ff}, da.a}},
                        {kPrefix + "1.mlp.down_proj.lora_B.weight", {{c.n_embd, r}, db}}});
  };
  const auto dir = write("peft-engine", false), zero = write("peft-engine-zero", true);
  const auto tokens = test::random_tokens(c.n_vocab, 14, 3);
  auto dense = test::run_with_method(**engine, nullptr, 0, tokens, 4);
  ASSERT_TRUE(dense.ok()) << dense.message();
  // The same adapters added one by one: q's lora_B in GGUF's row order, scale 8 / 4, times 0.5.
  auto q = qa, d = da;
  q.b = peft::permute_rows_for_gguf(qa.b, c.n_heads, c.head_dim, r);
  q.scale = d.scale = 2.0f * 0.5f;
  test::AdapterMethod by_hand({{"attn_q", 0, q}, {"ffn_down", 1, d}});
  auto want = test::run_with_adapters(**engine, &by_hand, tokens, 4);
  ASSERT_TRUE(want.ok()) << want.message();
  FolderMethod unmerged(dir, 0.5f, false), merged(dir, 0.5f, true), zeroed(zero, 1.0f, false);
  auto got = test::run_with_method(**engine, &unmerged, kHookLoad, tokens, 4);
  ASSERT_TRUE(got.ok()) << got.message();
  EXPECT_EQ(*got, *want);
  EXPECT_GT(test::normalized_max_error(*got, *dense), 1e-3) << "the adapter changed nothing";
  auto folded = test::run_with_method(**engine, &merged, kHookLoad, tokens, 4);
  ASSERT_TRUE(folded.ok()) << folded.message();
  EXPECT_LT(test::normalized_max_error(*folded, *got), 1e-5);
  auto nothing = test::run_with_method(**engine, &zeroed, kHookLoad, tokens, 4);
  ASSERT_TRUE(nothing.ok()) << nothing.message();
  EXPECT_EQ(*nothing, *dense);
  // A refused folder: the method does not load, the error names the file.
  const auto bad = adapter_dir("peft-engine-bad", R"({"r":4,"target_modules":["q_proj"]})",
                               {{kPrefix + "0.self_attn.q_proj.lora_A.weight", {{r, c.n_embd}, qa.a}},
                                {kPrefix + "0.self_attn.q_proj.lora_B.weight",
                                 {{c.q_dim() - 1, r}, std::vector<float>(qa.b.begin(), qa.b.end() - r)}}});
  FolderMethod refused(bad, 1.0f, false);
  auto no = test::run_with_method(**engine, &refused, kHookLoad, tokens, 4);
  ASSERT_FALSE(no.ok());
  EXPECT_NE(no.message().find("adapter_model.safetensors: module model.layers.0.self_attn.q_proj"), std::string::npos)
      << no.message();
}

// [model] adapter: a model that merges a folder at load computes what the
// base model computes under the same folder merged for a method's runs; its
// checksum names the weights; what it cannot take is refused, naming the file.
TEST(PeftAdapter, AModelMergesAFolderAtLoadAsAMethodMergesIt) {
  SyntheticModelSpec spec;
  spec.name = "peft-model-merge";
  spec.seed = 17;
  auto base = test::load_synthetic(spec);
  ASSERT_TRUE(base);
  const ModelConfig& c = base->config();
  const int r = 4;
  const auto qa = test::random_adapter(c.q_dim(), c.n_embd, r, 5, 1.0f, false, 0.2f);
  const auto ua = test::random_adapter(c.n_ff, c.n_embd, r, 6, 1.0f, false, 0.2f);
  const auto dir = adapter_dir("peft-model-merge", R"({"r":4,"lora_alpha":8,"target_modules":["q_proj","up_proj"]})",
                               {{kPrefix + "1.self_attn.q_proj.lora_A.weight", {{r, c.n_embd}, qa.a}},
                                {kPrefix + "1.self_attn.q_proj.lora_B.weight", {{c.q_dim(), r}, qa.b}},
                                {kPrefix + "0.mlp.up_proj.lora_A.weight", {{r, c.n_embd}, ua.a}},
                                {kPrefix + "0.mlp.up_proj.lora_B.weight", {{c.n_ff, r}, ua.b}}});
  const auto tokens = test::random_tokens(c.n_vocab, 12, 8);
  auto base_engine = Engine::create(base, EngineOptions{8, 0, 0});
  ASSERT_TRUE(base_engine.ok());
  FolderMethod merged(dir, 0.5f, true);
  auto want = test::run_with_method(**base_engine, &merged, kHookLoad, tokens, 3);
  ASSERT_TRUE(want.ok()) << want.message();

  auto tuned = test::load_synthetic(spec);
  ASSERT_TRUE(tuned);
  const std::string file_sum = tuned->checksum();
  ASSERT_TRUE(tuned->merge_adapter(dir, 0.5f).ok());
  EXPECT_EQ(tuned->file_checksum(), file_sum);
  EXPECT_NE(tuned->checksum(), file_sum);  // cached artifacts of the base model do not apply
  EXPECT_EQ(tuned->adapter_digest().rfind("sha256:", 0), 0u);
  auto tuned_engine = Engine::create(tuned, EngineOptions{8, 0, 0});
  ASSERT_TRUE(tuned_engine.ok());
  auto got = test::run_with_method(**tuned_engine, nullptr, 0, tokens, 3);
  ASSERT_TRUE(got.ok()) << got.message();
  auto dense = test::run_with_method(**base_engine, nullptr, 0, tokens, 3);
  ASSERT_TRUE(dense.ok());
  EXPECT_LT(test::normalized_max_error(*got, *want), 1e-5);  // one SGEMM vs the method's loop
  EXPECT_GT(test::normalized_max_error(*got, *dense), 1e-3) << "the adapter changed nothing";

  // Once per model; the file's quantized blocks do not hold it.
  auto again = tuned->merge_adapter(dir, 0.5f);
  ASSERT_FALSE(again.ok());
  EXPECT_NE(again.message().find("already has an adapter merged"), std::string::npos) << again.message();
  EngineOptions file_weights{8, 0, 0};
  file_weights.weights = WeightSource::File;
  auto refused = Engine::create(tuned, file_weights);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find("model.adapter"), std::string::npos) << refused.message();

  // A folder that does not fit: refused naming the file and module, the model unchanged.
  const auto bad = adapter_dir("peft-model-merge-bad", R"({"r":4,"target_modules":["q_proj"]})",
                               {{kPrefix + "0.self_attn.q_proj.lora_A.weight", {{r, c.n_embd + 1}, std::vector<float>(size_t(r * (c.n_embd + 1)))}},
                                {kPrefix + "0.self_attn.q_proj.lora_B.weight", {{c.q_dim(), r}, qa.b}}});
  auto untouched = test::load_synthetic(spec);
  auto no = untouched->merge_adapter(bad);
  ASSERT_FALSE(no.ok());
  EXPECT_NE(no.message().find("model.layers.0.self_attn.q_proj"), std::string::npos) << no.message();
  EXPECT_TRUE(untouched->adapter_digest().empty());
  EXPECT_EQ(untouched->checksum(), file_sum);
  auto missing = untouched->merge_adapter(test::temp_path("no-such-adapter"));
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.message().find("no-such-adapter"), std::string::npos) << missing.message();
}

}  // namespace test_peft_adapter
}  // namespace inferlab
