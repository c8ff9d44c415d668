// Fine-tuning's gradients on the real model (SmolLM2-135M-Instruct; skipped
// when it is not installed) against PyTorch autograd, from a golden fixture
// (tests/reference/make_lora_grad_fixture.py: transformers loads our GGUF
// file in float32, PEFT loads the committed adapter peft_smollm2_a, r 4 on
// every projection of layers 0, 14 and 29): two sequences of 40 tokens, the
// summed cross-entropy over 68 targets, and d(loss)/d(lora_A), d(loss)/d(lora_B)
// of all 21 modules. Our lora_B gradients of q_proj and k_proj are in GGUF's
// row order, so the reference's are permuted the same way before comparing.
// Also the writers' round trips: what peft::write_adapter writes,
// read_adapter reads back bit for bit (rows of q/k restored, scales, a regex
// target for a ragged set of modules, rank and alpha patterns); likewise a
// llama.cpp GGUF adapter.
#include <gtest/gtest.h>
#include <nlohmann/json.hpp>

#include <cmath>
#include <filesystem>
#include <fstream>

#include "engine/engine.h"
#include "finetune/lora_graph.h"
#include "formats/gguf_adapter.h"
#include "formats/peft_adapter.h"
#include "formats/safetensors.h"
#include "test_support.h"

namespace inferlab {
namespace test_lora_grad_reference {

const std::filesystem::path kReference = std::filesystem::path(__FILE__).parent_path() / "../reference";

std::shared_ptr<Model> real_model() { return test::default_model(); }

std::string hf_module(const finetune::AdapterTensor& t) {
  static const char* names[] = {"self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                "mlp.gate_proj",    "mlp.up_proj",      "mlp.down_proj"};
  return "base_model.model.model.layers." + std::to_string(t.layer) + "." + names[t.slot];
}

TEST(LoraGradReference, GradientsMatchPyTorchAutogradOnTheRealModel) {
  auto model = real_model();
  if (!model) GTEST_SKIP() << "SmolLM2-135M-Instruct is not installed (scripts/fetch-model.sh)";
  std::ifstream in(kReference / "lora_grad_smollm2.json");
  ASSERT_TRUE(in) << "missing fixture lora_grad_smollm2.json";
  const auto fixture = nlohmann::json::parse(in);
  const ModelConfig& c = model->config();

  auto read = peft::read_adapter(kReference / "peft_smollm2_a", model_shape(c), c.tied_embeddings);
  ASSERT_TRUE(read.ok()) << read.message();
  auto set = finetune::from_projection_adapters(c, *read);
  ASSERT_TRUE(set.ok()) << set.message();
  ASSERT_EQ(set->adapters.size(), 21u);

  finetune::Batch b;
  b.sequences = int64_t(fixture["tokens"].size());
  b.seq_len = int64_t(fixture["tokens"][0].size());
  for (const auto& row : fixture["tokens"])
    for (const auto& t : row) b.tokens.push_back(t.get<int32_t>());
  for (const auto& row : fixture["targets"])
    for (const auto& t : row) b.targets.push_back(t.get<int32_t>());

  auto graph = finetune::LoraGraph::create(model, {});
  ASSERT_TRUE(graph.ok()) << graph.message();
  auto grads = finetune::AdapterGrads::like(*set);
  auto r = (*graph)->forward_backward(b, *set, grads, 1.0f);
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_EQ(r->tokens, fixture["tokens_with_target"].get<int64_t>());
  const double ref_loss = fixture["loss_sum"].get<double>();
  EXPECT_NEAR(r->loss_sum, ref_loss, 1e-4 * ref_loss);

  auto file = safetensors::File::open(kReference / "lora_grad_smollm2.safetensors");
  ASSERT_TRUE(file.ok()) << file.message();
  double worst = 0;
  for (size_t i = 0; i < set->adapters.size(); ++i) {
    const auto& t = set->adapters[i];
    const std::string module = hf_module(t);
    const auto* ga = file->find(module + ".lora_A.weight");
    const auto* gb = file->find(module + ".lora_B.weight");
    ASSERT_TRUE(ga && gb) << module;
    const std::vector<float> ref_a = file->read_f32(*ga);
    std::vector<float> ref_b = file->read_f32(*gb);
    if (t.slot <= 1) ref_b = peft::permute_rows_for_gguf(ref_b, t.slot == 0 ? c.n_heads : c.n_kv_heads, c.head_dim, t.rank);
    ASSERT_EQ(ref_a.size(), grads.a[i].size()) << module;
    ASSERT_EQ(ref_b.size(), grads.b[i].size()) << module;
    const double ea = test::normalized_max_error(grads.a[i], ref_a), eb = test::normalized_max_error(grads.b[i], ref_b);
    EXPECT_LT(ea, 2e-3) << module << " lora_A";
    EXPECT_LT(eb, 2e-3) << module << " lora_B";
    worst = std::max({worst, ea, eb});
  }
  std::printf("loss %.6f vs PyTorch %.6f; worst normalized gradient difference %.2e\n", r->loss_sum, ref_loss, worst);
}

TEST(LoraGradReference, WrittenAdaptersReadBackBitForBit) {
  SyntheticModelSpec spec;
  spec.name = "peft-writer";
  spec.n_layers = 3;
  spec.n_heads = 4;
  spec.n_kv_heads = 2;
  auto model = test::load_synthetic(spec);
  ASSERT_NE(model, nullptr);
  const ModelConfig& c = model->config();
  finetune::AdapterInit init;
  init.rank = 4;
  init.alpha = 8;
  init.slots = {0, 1, 2, 3, 4, 5, 6};
  init.layers = {0, 2};
  init.seed = 3;
  auto set = finetune::init_adapters(c, init);
  ASSERT_TRUE(set.ok());
  float v = 0.01f;
  for (auto& t : set->adapters)
    for (float& x : t.b) x = (v += 0.001f);

  for (bool ragged : {false, true}) {
    finetune::AdapterSet written = *set;
    if (ragged) {  // one module fewer, another of a different rank and scale
      written.adapters.erase(written.adapters.begin() + 3);
      finetune::AdapterInit other = init;
      other.rank = 2;
      other.alpha = 5;
      other.slots = {4};
      other.layers = {1};
      written.adapters.push_back(finetune::init_adapters(c, other)->adapters[0]);
      for (float& x : written.adapters.back().b) x = 0.5f;
    }
    const auto dir = test::temp_path(ragged ? "ragged" : "product");
    peft::WriteOptions options;
    options.base_model = "synthetic";
    ASSERT_TRUE(peft::write_adapter(dir, finetune::to_projection_adapters(written), model_shape(c), options).ok());
    std::ifstream config_file(dir / "adapter_config.json");
    const auto config = nlohmann::json::parse(config_file);
    EXPECT_EQ(config["r"], 4);
    EXPECT_EQ(config["lora_alpha"], 8.0);
    if (ragged) {
      EXPECT_TRUE(config["target_modules"].is_string());
      EXPECT_EQ(config["rank_pattern"].size(), 1u);
      EXPECT_EQ(config["alpha_pattern"].size(), 1u);
    } else {
      EXPECT_EQ(config["target_modules"].size(), 7u);
      EXPECT_EQ(config["layers_to_transform"], nlohmann::json::array({0, 2}));
    }
    auto back = peft::read_adapter(dir, model_shape(c), c.tied_embeddings);
    ASSERT_TRUE(back.ok()) << back.message();
    auto read_set = finetune::from_projection_adapters(c, *back);
    ASSERT_TRUE(read_set.ok()) << read_set.message();
    std::sort(written.adapters.begin(), written.adapters.end(), [](const auto& x, const auto& y) {
      return std::pair(x.layer, x.slot) < std::pair(y.layer, y.slot);
    });
    ASSERT_EQ(read_set->adapters.size(), written.adapters.size());
    for (size_t i = 0; i < written.adapters.size(); ++i) {
      const auto &w = written.adapters[i], &r = read_set->adapters[i];
      EXPECT_EQ(r.layer, w.layer);
      EXPECT_EQ(r.slot, w.slot);
      EXPECT_EQ(r.rank, w.rank);
      EXPECT_FLOAT_EQ(r.scale, w.scale);
      EXPECT_EQ(r.a, w.a);
      EXPECT_EQ(r.b, w.b) << "layer " << w.layer << " slot " << w.slot;
    }
    // The file holds Hugging Face's row order: q_proj's lora_B differs from ours.
    auto file = safetensors::File::open(dir / "adapter_model.safetensors");
    const auto* qb = file->find("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight");
    ASSERT_NE(qb, nullptr);
    EXPECT_NE(file->read_f32(*qb), written.adapters[0].b);
  }

  // The same adapters as a llama.cpp GGUF adapter: read back bit for bit.
  const auto gguf_path = test::temp_path("adapter.gguf");
  ASSERT_TRUE(gguf_adapter::write_adapter(gguf_path, finetune::to_projection_adapters(*set), c.architecture).ok());
  auto from_gguf = gguf_adapter::read_adapter(gguf_path, model_shape(c), c.architecture, c.tied_embeddings);
  ASSERT_TRUE(from_gguf.ok()) << from_gguf.message();
  auto gguf_set = finetune::from_projection_adapters(c, *from_gguf);
  ASSERT_TRUE(gguf_set.ok()) << gguf_set.message();
  ASSERT_EQ(gguf_set->adapters.size(), set->adapters.size());
  for (size_t i = 0; i < set->adapters.size(); ++i) {
    EXPECT_EQ(gguf_set->adapters[i].a, set->adapters[i].a);
    EXPECT_EQ(gguf_set->adapters[i].b, set->adapters[i].b);
    EXPECT_FLOAT_EQ(gguf_set->adapters[i].scale, set->adapters[i].scale);
  }
  // One alpha for all in GGUF: adapters whose scale x rank differ are refused.
  auto mixed = finetune::to_projection_adapters(*set);
  mixed[1].adapter.scale *= 2;
  auto refused = gguf_adapter::write_adapter(test::temp_path("mixed.gguf"), mixed, c.architecture);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find("one alpha for all"), std::string::npos) << refused.message();

  // An existing folder with files is refused, nothing touched; with overwrite it is replaced whole.
  const auto dir = test::temp_path("taken");
  std::filesystem::create_directories(dir);
  std::ofstream(dir / "adapter_config.json") << "{}";
  peft::WriteOptions options;
  auto st = peft::write_adapter(dir, finetune::to_projection_adapters(*set), model_shape(c), options);
  ASSERT_FALSE(st.ok());
  EXPECT_NE(st.message().find("already holds files"), std::string::npos) << st.message();
  std::ifstream still(dir / "adapter_config.json");
  EXPECT_EQ(std::string(std::istreambuf_iterator<char>(still), {}), "{}");
  options.overwrite = true;
  ASSERT_TRUE(peft::write_adapter(dir, finetune::to_projection_adapters(*set), model_shape(c), options).ok());
  EXPECT_TRUE(peft::read_adapter(dir, model_shape(c), c.tied_embeddings).ok());
  for (const auto& entry : std::filesystem::directory_iterator(dir.parent_path()))
    EXPECT_EQ(entry.path().filename().string().find(".tmp-"), std::string::npos) << entry.path();
}

}  // namespace test_lora_grad_reference
}  // namespace inferlab
