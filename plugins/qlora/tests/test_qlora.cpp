// QLoRA: every layer projection of the run in 4 bits, for each format (NF4,
// FP4, Int4; with and without double quantization) equal to a run through the
// same weights quantized and dequantized by the kernels and put back in f32;
// adapters unmerged on top (equal to the dequantized weights plus the same
// adapters); the formats differ; the next run dense again. Bits per parameter
// are measured from the allocations; a compute_dtype the engine does not run
// is refused. Bit-exactness against bitsandbytes:
// tests/unit/test_bnb_reference.cpp; the formats' perplexities on the real
// model: the README's experiment.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "experiment/calibration.h"
#include "formats/peft_adapter.h"
#include "formats/safetensors.h"
#include "inferlab/testing.h"
#include "tests/unit/storage_method.h"

namespace inferlab {
namespace test_qlora {

std::shared_ptr<Model> model() { return test::gqa_test_model("qlora", 9); }

std::vector<int32_t> prompt() { return test::random_tokens(model()->config().n_vocab, 21, 6); }
const std::vector<int32_t> kForced = {4, 8, 15, 16, 23};

std::unique_ptr<Engine> engine() {
  auto e = Engine::create(model(), EngineOptions{4, 0, 0});
  EXPECT_TRUE(e.ok());
  return e.ok() ? std::move(*e) : nullptr;
}

// The reference a 4-bit run must equal: every layer projection replaced by its
// 4-bit values dequantized (tests/unit/storage_method.h), the folder's
// adapters unmerged on top.
test::ForwardTrace reference_trace(Engine& e, WeightFormat format, bool dq, const std::filesystem::path& adapter) {
  std::vector<test::AdapterSpec> adapters;
  if (!adapter.empty()) {
    auto read = peft::read_adapter(adapter, e.shape(), e.config().tied_embeddings);
    EXPECT_TRUE(read.ok()) << (read.ok() ? "" : read.message());
    if (read.ok())
      for (auto& p : *read) adapters.push_back({p.tensor, p.layer, std::move(p.adapter)});
  }
  test::StorageMethod method(WeightStorage{format, 64, dq}, /*reference=*/true, 1.0f, std::move(adapters));
  WeightOverrides overrides;
  PluginEntry entry;
  entry.name = "dequantized";
  entry.hooks = kHookLoad;
  auto loaded = prepare_method(method, entry, ParamValues{}, e, test::temp_path("artifacts"), &overrides);
  EXPECT_TRUE(loaded.ok()) << (loaded.ok() ? "" : loaded.message());
  EXPECT_TRUE(e.set_method(&method, kHookLoad, &overrides, "dequantized").ok());
  auto t = test::run_trace(e, &method, prompt(), int(kForced.size()), kForced);
  (void)e.set_method(nullptr, 0);
  return t;
}

std::filesystem::path adapter_folder() {
  const ModelConfig& c = model()->config();
  const auto dir = test::temp_path("qlora-adapter");
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "adapter_config.json") << R"({"r":2,"lora_alpha":4,"target_modules":["v_proj","up_proj"]})";
  std::vector<safetensors::F32Tensor> t;
  auto values = [](size_t n, float step) {
    std::vector<float> v(n);
    for (size_t i = 0; i < n; ++i) v[i] = step * float(int(i % 7) - 3);
    return v;
  };
  const std::string p = "base_model.model.model.layers.";
  t.push_back({p + "1.self_attn.v_proj.lora_A.weight", {2, c.n_embd}, values(size_t(2 * c.n_embd), 0.05f)});
  t.push_back({p + "1.self_attn.v_proj.lora_B.weight", {c.kv_dim(), 2}, values(size_t(2 * c.kv_dim()), 0.04f)});
  t.push_back({p + "0.mlp.up_proj.lora_A.weight", {2, c.n_embd}, values(size_t(2 * c.n_embd), 0.03f)});
  t.push_back({p + "0.mlp.up_proj.lora_B.weight", {c.n_ff, 2}, values(size_t(2 * c.n_ff), 0.05f)});
  EXPECT_TRUE(safetensors::write_f32(dir / "adapter_model.safetensors", t).ok());
  return dir;
}

TEST(Qlora, EachFormatRunsThroughItsDequantizedWeightsAndAdaptersStayOnTop) {
  auto e = engine();
  ASSERT_NE(e, nullptr);
  const auto dense = test::run_trace(*e, nullptr, prompt(), int(kForced.size()), kForced);
  const auto adapter = adapter_folder();
  const std::pair<const char*, WeightFormat> formats[] = {
      {"nf4", WeightFormat::NF4}, {"fp4", WeightFormat::FP4}, {"int4", WeightFormat::Int4}};
  std::vector<std::vector<float>> seen;
  for (const auto& [name, format] : formats)
    for (const bool dq : {true, false})
      for (const bool with_adapter : {false, true}) {
        SCOPED_TRACE(std::string(name) + (dq ? " + double quantization" : "") + (with_adapter ? " + adapter" : ""));
        auto p = test::params({{"quant", std::string(name)}, {"double_quant", dq}});
        if (with_adapter) p.set("adapter", std::vector<std::string>{adapter.string()});
        test::ActiveMethod active = test::activate_method(*e, "qlora", p);
        ASSERT_NE(active.handle.get(), nullptr);
        const auto got = test::run_trace(*e, active.handle.get(), prompt(), int(kForced.size()), kForced);
        const auto stored = e->stored_weights();
        (void)e->set_method(nullptr, 0);
        const auto want = reference_trace(*e, format, dq, with_adapter ? adapter : std::filesystem::path());
        EXPECT_LT(test::normalized_max_error(got.logits, want.logits), 1e-5);
        EXPECT_GT(test::normalized_max_error(got.logits, dense.logits), 1e-4) << "4 bits changed nothing";
        // Every layer projection, and only those, in 4 bits: 4 bits a value plus the absmaxes.
        const ModelConfig& c = model()->config();
        const int64_t values = int64_t(c.n_layers) * (int64_t(c.n_embd) * (c.q_dim() + 2 * c.kv_dim()) +
                                                      int64_t(c.q_dim()) * c.n_embd + 3 * int64_t(c.n_embd) * c.n_ff);
        EXPECT_EQ(stored.values, values);
        const double bits = 8.0 * double(stored.bytes) / double(stored.values);
        if (dq) {
          EXPECT_NEAR(bits, 4.127, 0.02);  // a small model: the per-group scales weigh a little more
        } else {
          EXPECT_DOUBLE_EQ(bits, 4.5);
        }
        if (!with_adapter) seen.push_back(got.logits);
      }
  // The formats differ from one another.
  EXPECT_GT(test::normalized_max_error(seen[0], seen[2]), 1e-4);  // nf4 vs fp4 (double quantization)
  EXPECT_GT(test::normalized_max_error(seen[0], seen[4]), 1e-4);  // nf4 vs int4
  // The next run is dense again.
  EXPECT_EQ(test::run_trace(*e, nullptr, prompt(), int(kForced.size()), kForced).logits, dense.logits);
  EXPECT_EQ(e->stored_weights().values, 0);
}

TEST(Qlora, AComputeDtypeTheEngineDoesNotRunIsRefused) {
  auto e = engine();
  ASSERT_NE(e, nullptr);
  const PluginEntry* entry = test::plugin_registry().find("qlora");
  ASSERT_NE(entry, nullptr);
  for (const auto& [dtype, ok] : {std::pair{"float32", true}, std::pair{"auto", true}, std::pair{"bfloat16", false}}) {
    const auto p = test::params({{"compute_dtype", std::string(dtype)}});
    auto handle = test::plugin_registry().create("qlora", p);
    ASSERT_TRUE(handle.ok());
    WeightOverrides overrides;
    auto loaded = prepare_method(*handle->get(), *entry, test::resolved_params(*entry, p), *e,
                                 test::temp_path("artifacts"), &overrides);
    EXPECT_EQ(loaded.ok(), ok) << dtype;
    if (!ok) {
      EXPECT_NE(loaded.message().find("compute_dtype = bfloat16, but this engine computes in float32"),
                std::string::npos)
          << loaded.message();
    }
  }
}

TEST(Qlora, BatchInvariance) {
  EXPECT_BATCH_INVARIANT(model(), "qlora", test::params({{"quant", std::string("nf4")}, {"double_quant", true}}));
}

}  // namespace test_qlora
}  // namespace inferlab
