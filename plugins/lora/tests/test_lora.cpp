// LoRA: an adapter whose B is zero is dense (merged or not); merged equals
// unmerged and both move the logits; two active adapters equal one adapter of
// their stacked ranks (the deltas add); rsLoRA's alpha / sqrt(r) equals the
// plain scale it amounts to; a llama.cpp GGUF adapter equals the PEFT folder
// it holds the same weights as (q's rows in GGUF's order); bad input (another
// shape, a model instead of an adapter, an output adapter on a tied model, a
// file that is neither) is refused naming the file. Against transformers +
// peft and llama.cpp on the real model: test_lora_reference.cpp.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <random>
#include <string>
#include <vector>

#include "experiment/calibration.h"
#include "formats/peft_adapter.h"
#include "formats/safetensors.h"
#include "gguf/gguf.h"
#include "inferlab/testing.h"

namespace inferlab {
namespace test_lora {

std::shared_ptr<Model> model() { return test::gqa_test_model("lora", 7); }

std::vector<float> randn(size_t n, uint64_t seed, float sd) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, sd);
  std::vector<float> v(n);
  for (auto& x : v) x = dist(rng);
  return v;
}

// One module's low-rank pair in PEFT's layout: A (r, in), B (out, r).
struct Pair {
  std::string module;  // e.g. "0.self_attn.q_proj"
  int64_t r = 0, out = 0, in = 0;
  std::vector<float> a, b;
};

Pair pair(const std::string& module, int64_t r, int64_t out, int64_t in, uint64_t seed, float b_sd = 0.3f) {
  return {module, r, out, in, randn(size_t(r * in), seed, 0.3f), randn(size_t(out * r), seed + 100, b_sd)};
}

std::filesystem::path folder(const std::string& name, const std::string& config, const std::vector<Pair>& pairs) {
  const auto dir = test::temp_path(name);
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "adapter_config.json") << config;
  std::vector<safetensors::F32Tensor> tensors;
  for (const Pair& p : pairs) {
    const std::string prefix = "base_model.model.model.layers." + p.module;
    tensors.push_back({prefix + ".lora_A.weight", {p.r, p.in}, p.a});
    tensors.push_back({prefix + ".lora_B.weight", {p.out, p.r}, p.b});
  }
  EXPECT_TRUE(safetensors::write_f32(dir / "adapter_model.safetensors", tensors).ok());
  return dir;
}

struct Shape {
  int64_t embd, q, kv, ff, heads, head_dim;
};
Shape shape() {
  const ModelConfig& c = model()->config();
  return {c.n_embd, c.q_dim(), c.kv_dim(), c.n_ff, c.n_heads, c.head_dim};
}

// q_proj of layer 0, v_proj and down_proj of layer 1.
std::vector<Pair> three_pairs(int64_t r, uint64_t seed, float b_sd = 0.3f) {
  const Shape s = shape();
  return {pair("0.self_attn.q_proj", r, s.q, s.embd, seed, b_sd), pair("1.self_attn.v_proj", r, s.kv, s.embd, seed + 1, b_sd),
          pair("1.mlp.down_proj", r, s.embd, s.ff, seed + 2, b_sd)};
}

const char* kTargets = R"("target_modules":["q_proj","v_proj","down_proj"])";

std::string config(int r, double alpha, const std::string& extra = "") {
  return "{\"r\":" + std::to_string(r) + ",\"lora_alpha\":" + std::to_string(alpha) + "," + kTargets + extra + "}";
}

ParamValue paths(std::initializer_list<std::filesystem::path> list) {
  std::vector<std::string> out;
  for (const auto& p : list) out.push_back(p.string());
  return out;
}

test::ForwardTrace trace(const ParamValues& p, const std::vector<int32_t>& prompt) {
  auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
  EXPECT_TRUE(engine.ok());
  test::ActiveMethod active = test::activate_method(**engine, "lora", p);
  return test::run_trace(**engine, active.handle.get(), prompt, 6, std::vector<int32_t>{5, 9, 11, 3, 7, 2});
}

test::ForwardTrace dense_trace(const std::vector<int32_t>& prompt) {
  auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
  EXPECT_TRUE(engine.ok());
  return test::run_trace(**engine, nullptr, prompt, 6, std::vector<int32_t>{5, 9, 11, 3, 7, 2});
}

std::vector<int32_t> prompt() { return test::random_tokens(model()->config().n_vocab, 23, 4); }

TEST(Lora, AZeroAdapterIsDenseMergedOrNot) {
  auto pairs = three_pairs(4, 1);
  for (auto& p : pairs) std::fill(p.b.begin(), p.b.end(), 0.0f);
  const auto dir = folder("zero", config(4, 8), pairs);
  for (const bool merge : {false, true})
    EXPECT_DENSE_EQUIVALENT(model(), "lora", test::params({{"adapter", paths({dir})}, {"merge", merge}}));
}

TEST(Lora, MergedEqualsUnmergedAndTheAdapterMovesTheLogits) {
  const auto dir = folder("moving", config(4, 8), three_pairs(4, 2));
  const auto dense = dense_trace(prompt());
  const auto unmerged = trace(test::params({{"adapter", paths({dir})}}), prompt());
  const auto merged = trace(test::params({{"adapter", paths({dir})}, {"merge", true}}), prompt());
  EXPECT_GT(test::normalized_max_error(unmerged.logits, dense.logits), 1e-2);
  EXPECT_LT(test::normalized_max_error(merged.logits, unmerged.logits), 1e-5);
  // scale multiplies the file's own alpha / r: scale 2 is alpha 16.
  const auto doubled = folder("doubled", config(4, 16), three_pairs(4, 2));
  EXPECT_EQ(trace(test::params({{"adapter", paths({dir})}, {"scale", 2.0}}), prompt()).logits,
            trace(test::params({{"adapter", paths({doubled})}}), prompt()).logits);
}

TEST(Lora, TwoActiveAdaptersEqualOneAdapterOfTheirStackedRanks) {
  // a: rank 2, b: rank 3, both scale 1 (alpha = r); stacked: rank 5, A = [A_a; A_b], B = [B_a | B_b].
  const auto a = three_pairs(2, 10), b = three_pairs(3, 20);
  std::vector<Pair> stacked;
  for (size_t i = 0; i < a.size(); ++i) {
    Pair s = a[i];
    s.r = 5;
    s.a.insert(s.a.end(), b[i].a.begin(), b[i].a.end());
    s.b.clear();
    for (int64_t row = 0; row < s.out; ++row) {
      s.b.insert(s.b.end(), a[i].b.begin() + row * 2, a[i].b.begin() + row * 2 + 2);
      s.b.insert(s.b.end(), b[i].b.begin() + row * 3, b[i].b.begin() + row * 3 + 3);
    }
    stacked.push_back(std::move(s));
  }
  const auto da = folder("a", config(2, 2), a), db = folder("b", config(3, 3), b),
             ds = folder("stacked", config(5, 5), stacked);
  const auto one = trace(test::params({{"adapter", paths({ds})}}), prompt());
  for (const bool merge : {false, true}) {
    const auto both =
        trace(test::params({{"adapter", paths({da, db})}, {"merge", merge}}), prompt());
    EXPECT_LT(test::normalized_max_error(both.logits, one.logits), 1e-5) << "merge " << merge;
  }
  // Per-adapter factors: b at 0 is a alone.
  const auto a_only = trace(test::params({{"adapter", paths({da, db})}, {"adapter_scales", std::vector<double>{1.0, 0.0}}}),
                            prompt());
  EXPECT_LT(test::normalized_max_error(a_only.logits, trace(test::params({{"adapter", paths({da})}}), prompt()).logits),
            1e-6);
  // Each alone differs from both together.
  const auto only_a = trace(test::params({{"adapter", paths({da})}}), prompt());
  EXPECT_GT(test::normalized_max_error(only_a.logits, one.logits), 1e-3);
}

TEST(Lora, RsLoraScalesByAlphaOverTheSquareRootOfTheRank) {
  // r = 4, alpha = 8: rsLoRA's 8 / sqrt(4) = 4 is plain LoRA's 16 / 4.
  const auto pairs = three_pairs(4, 30);
  const auto rs = folder("rs", config(4, 8, ",\"use_rslora\":true"), pairs), plain = folder("plain", config(4, 16), pairs),
             unscaled = folder("unscaled", config(4, 8), pairs);
  const auto got = trace(test::params({{"adapter", paths({rs})}}), prompt());
  EXPECT_EQ(got.logits, trace(test::params({{"adapter", paths({plain})}}), prompt()).logits);
  EXPECT_GT(test::normalized_max_error(got.logits, trace(test::params({{"adapter", paths({unscaled})}}), prompt()).logits),
            1e-3);
}

// The three pairs as llama.cpp's GGUF adapter: lora_a dims [in, r], lora_b
// [r, out], q's B rows in GGUF's order (as llama.cpp's converter writes them).
std::filesystem::path gguf_adapter(const std::string& name, const std::vector<Pair>& pairs, float alpha,
                                   const std::string& type = "adapter") {
  const Shape s = shape();
  gguf::Writer w;
  w.set_string("general.architecture", "llama");
  w.set_string("general.type", type);
  w.set_string("adapter.type", "lora");
  w.set_f32("adapter.lora.alpha", alpha);
  const std::map<std::string, std::string> names = {{"0.self_attn.q_proj", "blk.0.attn_q"},
                                                    {"1.self_attn.v_proj", "blk.1.attn_v"},
                                                    {"1.mlp.down_proj", "blk.1.ffn_down"},
                                                    {"lm_head", "output"}};
  for (const Pair& p : pairs) {
    const auto b = p.module == "0.self_attn.q_proj"
                       ? peft::permute_rows_for_gguf(p.b, int32_t(s.heads), int32_t(s.head_dim), p.r)
                       : p.b;
    EXPECT_TRUE(w.add_tensor_f32(names.at(p.module) + ".weight.lora_a", gguf::TensorType::F32, {p.in, p.r}, p.a).ok());
    EXPECT_TRUE(w.add_tensor_f32(names.at(p.module) + ".weight.lora_b", gguf::TensorType::F32, {p.r, p.out}, b).ok());
  }
  const auto path = test::temp_path(name + ".gguf");
  EXPECT_TRUE(w.write(path).ok());
  return path;
}

TEST(Lora, AGgufAdapterEqualsThePeftFolderWithTheSameWeights) {
  const auto pairs = three_pairs(4, 40);
  const auto dir = folder("peft", config(4, 8), pairs);
  const auto file = gguf_adapter("gguf", pairs, 8.0f);
  for (const bool merge : {false, true})
    EXPECT_EQ(trace(test::params({{"adapter", paths({file})}, {"merge", merge}}), prompt()).logits,
              trace(test::params({{"adapter", paths({dir})}, {"merge", merge}}), prompt()).logits)
        << "merge " << merge;
}

// prepare_method's error for `p` (empty: it loaded).
std::string load_error(const ParamValues& p) {
  auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
  EXPECT_TRUE(engine.ok());
  const PluginEntry* entry = test::plugin_registry().find("lora");
  auto handle = test::plugin_registry().create("lora", p);
  if (!handle) return handle.message();
  WeightOverrides overrides;
  auto loaded = prepare_method(*handle->get(), *entry, test::resolved_params(*entry, p), **engine,
                               test::temp_path("artifacts"), &overrides);
  return loaded.ok() ? std::string() : loaded.message();
}

TEST(Lora, BadAdaptersAreRefusedNamingTheFile) {
  EXPECT_NE(load_error(test::params({})).find("adapter: required"), std::string::npos);
  EXPECT_NE(load_error(test::params({{"adapter", paths({model()->path(), model()->path()})},
                                     {"adapter_scales", std::vector<double>{1.0}}}))
                .find("adapter_scales: 1 factors for 2 adapters"),
            std::string::npos);
  // A folder for another model: q_proj's B has the wrong number of rows.
  const Shape s = shape();
  const auto wide = folder("wide", config(4, 8), {pair("0.self_attn.q_proj", 4, s.q * 2, s.embd, 1)});
  std::string why = load_error(test::params({{"adapter", paths({wide})}}));
  EXPECT_NE(why.find((wide / "adapter_model.safetensors").string() + ": module model.layers.0.self_attn.q_proj"),
            std::string::npos)
      << why;
  // A GGUF that is not an adapter (a model), and one of another shape.
  why = load_error(test::params({{"adapter", paths({model()->path()})}}));
  EXPECT_NE(why.find(model()->path().string() + ": general.type is"), std::string::npos) << why;
  const auto wrong = gguf_adapter("wrong", {pair("1.mlp.down_proj", 4, s.embd, s.ff + 1, 2)}, 8.0f);
  why = load_error(test::params({{"adapter", paths({wrong})}}));
  EXPECT_NE(why.find(wrong.string() + ": blk.1.ffn_down.weight: lora_a ["), std::string::npos) << why;
  // An output adapter on this model, whose output head is its embedding.
  const auto output = gguf_adapter("output", {pair("lm_head", 2, model()->config().n_vocab, s.embd, 3)}, 4.0f);
  why = load_error(test::params({{"adapter", paths({output})}}));
  EXPECT_NE(why.find(output.string() + ": output.weight: this model ties its output head to the embedding"),
            std::string::npos)
      << why;
  // A file that is neither.
  const auto junk = test::temp_path("junk.bin");
  std::ofstream(junk) << "not an adapter";
  why = load_error(test::params({{"adapter", paths({junk})}}));
  EXPECT_NE(why.find(junk.string() + ": expected a PEFT adapter folder"), std::string::npos) << why;
}

TEST(Lora, BatchInvariance) {
  const auto dir = folder("batched", config(4, 8), three_pairs(4, 2));
  for (const bool merge : {false, true})
    EXPECT_BATCH_INVARIANT(model(), "lora", test::params({{"adapter", paths({dir})}, {"merge", merge}}));
}

}  // namespace test_lora
}  // namespace inferlab
