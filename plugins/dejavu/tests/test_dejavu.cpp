// Deja Vu: keeping everything is dense, with or without trained predictors
// choosing every component; trained predictors find the labelled neurons and
// heads far better than chance, and the engine computes exactly the predicted
// budget per decode step; a corrupt or missing checkpoint is refused naming
// it; oracle mode asks the engine for its own top-k.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "experiment/calibration.h"
#include "inferlab/quantiles.h"
#include "inferlab/testing.h"

namespace inferlab {
namespace test_dejavu {

// 2 layers, n_embd 64, n_ff 160, 4 query heads over 2 kv heads.
std::shared_ptr<Model> model() { return test::gqa_test_model("dejavu", 7); }

ParamValues settings(double neuron_keep, double head_keep, int64_t dense_layers = 0,
                     const std::string& mode = "predictor", int64_t samples = 16) {
  return test::params({{"mode", mode},
                       {"neuron_keep", neuron_keep},
                       {"head_keep", head_keep},
                       {"dense_layers", dense_layers},
                       {"rank", int64_t(32)},
                       {"corpus", std::string("kv_retrieval")},
                       {"calibration_samples", samples},
                       {"calibration_tokens", int64_t(64)}});
}

// A method calibrated (or its artifacts reused) under `root` and loaded.
struct Prepared {
  MethodHandle handle;
  Result<PreparedMethod> prepared = Error{"not prepared"};
};
Prepared prepare(Engine& engine, const ParamValues& given, const std::filesystem::path& root) {
  const PluginEntry* entry = test::plugin_registry().find("dejavu");
  EXPECT_NE(entry, nullptr);
  Prepared p;
  if (entry == nullptr) return p;
  p.handle = test::make_method("dejavu", given);
  if (p.handle.get() != nullptr)
    p.prepared = prepare_method(*p.handle.get(), *entry, test::resolved_params(*entry, given), engine, root);
  return p;
}

const std::vector<std::string> kColumns = {"neuron_k",          "neuron_recall",   "neuron_precision",
                                           "neuron_val_loss",   "neuron_best_epoch", "head_k",
                                           "head_recall",       "head_precision",  "head_best_epoch"};

TEST(DejaVu, KeepingEverythingIsDense) {
  EXPECT_DENSE_EQUIVALENT(model(), "dejavu", settings(1.0, 1.0));
  EXPECT_DENSE_EQUIVALENT(model(), "dejavu", settings(1.0, 1.0, 0, "oracle"));
}

// 0.999 of 160 neurons and of 4 heads is all of them: the predictors are
// trained and run, choose everything, and the gathered path gives dense logits.
TEST(DejaVu, TrainedPredictorsChoosingEverythingAreDense) {
  EXPECT_DENSE_EQUIVALENT(model(), "dejavu", settings(0.999, 0.999));
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  test::ActiveMethod active = test::activate_method(**engine, "dejavu", settings(0.999, 0.999));
  ASSERT_NE(active.handle.get(), nullptr);
  // The engine runs the predictors (Method::component_predictors): every layer has them.
  const ComponentPredictors predictors = active.handle->component_predictors();
  ASSERT_EQ(predictors.neurons.size(), 2u);
  ASSERT_EQ(predictors.heads.size(), 2u);
  for (size_t l = 0; l < 2; ++l) {
    EXPECT_EQ(predictors.neurons[l].keep, 160);
    EXPECT_EQ(predictors.heads[l].keep, 4);
    EXPECT_EQ(predictors.neurons[l].w1.size(), size_t(32) * 64);  // rank 32 of the 64-wide model
  }
  (*engine)->reset_counters();
  test::run_trace(**engine, active.handle.get(), test::random_tokens(300, 20, 3), 4);
  EXPECT_EQ((*engine)->counters().neurons_skipped, 0);
  EXPECT_EQ((*engine)->counters().heads_skipped, 0);
}

TEST(DejaVu, PredictorsBeatChanceAndTheEngineComputesTheirBudget) {
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const auto root = test::temp_path("dejavu-recall");
  // Layer 0 dense; layer 1 keeps 40 of 160 neurons and 2 of 4 heads. Labels:
  // the top 40 neurons (label_fraction 0.25) and the top 2 heads per token;
  // 64 windows of 64 tokens, 410 validation rows.
  Prepared p = prepare(**engine, settings(0.25, 0.5, 1, "predictor", 64), root);
  ASSERT_TRUE(p.prepared.ok()) << p.prepared.message();
  auto table = read_layer_table((p.prepared->artifact_dir / "metrics.tsv").string(), kColumns, 2);
  ASSERT_TRUE(table.ok()) << table.message();
  const auto& dense = (*table)[0];
  for (const double v : dense) EXPECT_EQ(v, -1.0);  // layer 0: nothing trained
  const auto& m = (*table)[1];
  EXPECT_EQ(m[0], 40);
  EXPECT_EQ(m[5], 2);
  // Chance: recall k / n = 0.25 for neurons, 0.5 for heads. Reached here
  // (rank 32): neurons 0.58; heads 0.58 (a random model's head norms are
  // weakly predictable from the previous layer's input; SE of chance ~0.025).
  EXPECT_GT(m[1], 1.8 * 0.25) << "neuron recall";
  EXPECT_NEAR(m[2], m[1], 1e-9);  // as many labelled as kept: precision = recall
  EXPECT_GT(m[6], 0.54) << "head recall";
  std::printf("[ dejavu ] layer 1 validation recall: neurons %.3f (chance 0.25), heads %.3f (chance 0.5)\n", m[1],
              m[6]);

  WeightOverrides overrides;
  ASSERT_TRUE((*engine)->set_method(p.handle.get(), test::plugin_registry().find("dejavu")->hooks, &overrides,
                                    "dejavu").ok());
  auto seq = (*engine)->new_sequence();
  p.handle->begin_sequence((*engine)->shape());
  const auto prompt = test::random_tokens(300, 24, 5);
  ASSERT_TRUE((*engine)->forward(*seq, prompt, 0, {}).ok());
  (*engine)->reset_counters();
  constexpr int kSteps = 6;
  for (int s = 0; s < kSteps; ++s)
    ASSERT_TRUE((*engine)->forward(*seq, std::vector<int32_t>{prompt[size_t(s)]}, 0, {}).ok());
  const EngineCounters c = (*engine)->counters();
  EXPECT_EQ(c.decode_steps, kSteps);
  EXPECT_EQ(c.neurons_skipped, int64_t(kSteps) * (160 - 40));  // one sparse layer
  EXPECT_EQ(c.heads_skipped, int64_t(kSteps) * 2);
  // The validation metrics ride with the run's counters into the results database.
  EXPECT_DOUBLE_EQ(p.handle->counters().at("train_neuron_recall.layer01"), m[1]);
  EXPECT_DOUBLE_EQ(p.handle->counters().at("train_neuron_recall_mean"), m[1]);  // the only trained layer
  EXPECT_DOUBLE_EQ(p.handle->counters().at("train_head_recall_mean"), m[6]);
  EXPECT_EQ(p.handle->counters().count("train_neuron_recall.layer00"), 0u);  // dense layer: nothing trained
  (void)(*engine)->set_method(nullptr, 0);
}

TEST(DejaVu, ACorruptOrMissingCheckpointIsRefusedNamingIt) {
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const auto root = test::temp_path("dejavu-corrupt");
  Prepared first = prepare(**engine, settings(0.5, 0.5), root);
  ASSERT_TRUE(first.prepared.ok()) << first.prepared.message();
  const auto dir = first.prepared->artifact_dir;
  for (const char* name : {"mlp.00.head", "mlp.01.head", "attn.00.head", "attn.01.head", "metrics.tsv"})
    EXPECT_TRUE(std::filesystem::exists(dir / name)) << name;

  const auto mlp = dir / "mlp.01.head";
  {
    std::fstream f(mlp, std::ios::in | std::ios::out | std::ios::binary);
    f.seekp(100);
    f.put('\x5a');
  }
  Prepared second = prepare(**engine, settings(0.5, 0.5), root);
  ASSERT_FALSE(second.prepared.ok());
  EXPECT_NE(second.prepared.message().find(mlp.string()), std::string::npos) << second.prepared.message();
  EXPECT_NE(second.prepared.message().find("checksum mismatch"), std::string::npos) << second.prepared.message();

  std::filesystem::remove(dir / "attn.00.head");
  std::filesystem::copy_file(dir / "mlp.00.head", mlp, std::filesystem::copy_options::overwrite_existing);
  Prepared third = prepare(**engine, settings(0.5, 0.5), root);
  ASSERT_FALSE(third.prepared.ok());
  // mlp.01 now holds layer 0's predictor (same shape, loads); attn.00 is gone.
  EXPECT_NE(third.prepared.message().find((dir / "attn.00.head").string()), std::string::npos)
      << third.prepared.message();
}

// Oracle mode asks the engine for the layer's own top-k (the engine side may
// land later): the mask fields, straight from the method.
TEST(DejaVu, OracleModeAsksForTheTopKOfTheLayersOwnValues) {
  auto method = test::make_method("dejavu", test::params({{"mode", std::string("oracle")},
                                                          {"neuron_keep", 0.25},
                                                          {"head_keep", 0.5},
                                                          {"layer_neuron_keep", std::string("2=1")},
                                                          {"dense_layers", int64_t(1)}}));
  ASSERT_NE(method.get(), nullptr);
  const ModelShape shape = test::tiny_shape(3, 4, 4);  // 3 layers, 4 heads, n_embd 16, n_ff 32
  EXPECT_EQ(method->calibration(shape).samples, 0);    // nothing to train
  LoadContext ctx;
  ctx.shape = shape;
  ASSERT_TRUE(method->on_load(ctx).ok());
  method->begin_sequence(shape);
  const std::vector<float> hidden(size_t(shape.n_embd), 0.5f);
  StepInfo step{.step = 1, .first_position = 10, .n_tokens = 1};
  for (int32_t layer = 0; layer < 3; ++layer) {
    ComponentMask mask;
    mask.heads.assign(4, 1);
    const bool masked = method->mask_components(step, layer, hidden, mask);
    EXPECT_TRUE(mask.all_neurons) << layer;
    EXPECT_EQ(mask.heads, std::vector<uint8_t>(4, 1)) << layer;
    if (layer == 0) {  // dense
      EXPECT_FALSE(masked);
      EXPECT_EQ(mask.oracle_neurons, 0);
      EXPECT_EQ(mask.oracle_heads, 0);
    } else {
      EXPECT_TRUE(masked) << layer;
      EXPECT_EQ(mask.oracle_neurons, layer == 1 ? 8 : 0) << layer;  // ceil(0.25 * 32); layer 2 keeps all
      EXPECT_EQ(mask.oracle_heads, 2) << layer;                      // ceil(0.5 * 4)
    }
  }
}

// Predicted components are a choice per call, so a batch with Deja Vu runs
// its sequences one by one (batch_fallbacks), each with its own choice.
TEST(DejaVu, BatchInvariance) { EXPECT_BATCH_INVARIANT(model(), "dejavu", settings(0.5, 0.5)); }

}  // namespace test_dejavu
}  // namespace inferlab
