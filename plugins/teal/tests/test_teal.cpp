// TEAL: dense at sparsity 0; its calibrated thresholds zero the target
// fraction of each projection's inputs on the calibration windows; the
// projections it leaves alone stay dense; more sparsity, further from dense;
// a damaged threshold file is refused naming it; the greedy allocation
// reaches each layer's weighted target with less output error than the
// uniform one and gives the projections different sparsities. The mechanism
// itself: tests/unit/test_activation_sparsity.cpp (the layer probe the greedy
// search runs layers with: tests/unit/test_layer_probe.cpp).
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "datasets/tasks.h"
#include "experiment/calibration.h"
#include "inferlab/quantiles.h"
#include "inferlab/testing.h"

namespace inferlab {
namespace test_teal {

std::shared_ptr<Model> model() { return test::gqa_test_model("teal", 5); }

ParamValues calibrated(double sparsity, const std::string& projections = "all") {
  return test::params({{"sparsity", sparsity},
                       {"projections", projections},
                       {"corpus", std::string("kv_retrieval")},
                       {"calibration_samples", int64_t(4)},
                       {"calibration_tokens", int64_t(64)}});
}

// The engine's counters over the calibration windows themselves.
std::map<std::string, double> run_calibration_windows(Engine& engine) {
  auto windows = corpus_windows(engine.model().tokenizer(), "kv_retrieval", 4, 64, 0);
  EXPECT_TRUE(windows.ok());
  engine.reset_counters();
  for (const auto& w : *windows) {
    auto seq = engine.new_sequence();
    EXPECT_TRUE(engine.forward(*seq, w, int64_t(w.size()), {}).ok());
  }
  return engine.counters().as_map();
}

TEST(Teal, SparsityZeroIsDense) { EXPECT_DENSE_EQUIVALENT(model(), "teal", calibrated(0.0)); }

TEST(Teal, ThresholdsZeroTheTargetFractionOfEachProjectionsInputs) {
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  for (const double target : {0.3, 0.6}) {
    // Layer 0 alone: its Q, K and V read what calibration saw (nothing upstream
    // is sparse), so the fraction is the target up to the histogram's resolution.
    ParamValues first_layer = calibrated(0.0);
    first_layer.set("layer_sparsity", std::string("0=") + std::to_string(target));
    test::ActiveMethod teal = test::activate_method(**engine, "teal", first_layer);
    ASSERT_NE(teal.handle.get(), nullptr);
    auto counted = run_calibration_windows(**engine);
    for (const char* p : {"q", "k", "v"})
      EXPECT_NEAR(counted.at(std::string("activation_sparsity.") + p), target, 0.005) << p << " at " << target;
    // Every layer: the sparse run's activations drift from the dense ones the
    // thresholds were calibrated on, most for O and down (their inputs pass
    // through sparse projections first).
    teal = test::activate_method(**engine, "teal", calibrated(target));
    counted = run_calibration_windows(**engine);
    for (const char* p : {"q", "k", "v", "o", "gate", "up", "down"})
      EXPECT_NEAR(counted.at(std::string("activation_sparsity.") + p), target, 0.06) << p << " at " << target;
    (void)(*engine)->set_method(nullptr, 0);
  }
}

TEST(Teal, OnlyTheChosenProjectionsAreSparse) {
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  test::ActiveMethod teal = test::activate_method(**engine, "teal", calibrated(0.5, "mlp"));
  const auto counted = run_calibration_windows(**engine);
  for (const char* p : {"q", "k", "v", "o"}) EXPECT_EQ(counted.count(std::string("activation_sparsity.") + p), 0u) << p;
  for (const char* p : {"gate", "up", "down"})
    EXPECT_NEAR(counted.at(std::string("activation_sparsity.") + p), 0.5, 0.06) << p;
}

TEST(Teal, MoreSparsityIsFurtherFromDense) {
  double previous = 0;
  for (const double s : {0.2, 0.5, 0.8}) {
    const auto eq = test::compare_with_dense(model(), "teal", calibrated(s));
    EXPECT_GT(eq.max_error, previous) << "sparsity " << s;
    previous = eq.max_error;
  }
}

TEST(Teal, ADamagedThresholdFileIsRefusedNamingIt) {
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const PluginEntry* entry = test::plugin_registry().find("teal");
  ASSERT_NE(entry, nullptr);
  const ParamValues resolved = test::resolved_params(*entry, calibrated(0.5));
  const auto root = test::temp_path("teal-artifacts");
  auto first = test::make_method("teal", calibrated(0.5));
  auto prepared = prepare_method(*first.get(), *entry, resolved, **engine, root);
  ASSERT_TRUE(prepared.ok()) << prepared.message();
  const auto file = prepared->artifact_dir / "thresholds.tsv";
  ASSERT_TRUE(std::filesystem::exists(file));
  std::ofstream(file, std::ios::trunc) << "layer\tq\tk\tv\to\tgate\tup\tdown\n0\t0.1\t0.1\n";
  auto second = test::make_method("teal", calibrated(0.5));
  auto reloaded = prepare_method(*second.get(), *entry, resolved, **engine, root);
  ASSERT_FALSE(reloaded.ok());
  EXPECT_NE(reloaded.message().find(file.string() + ":2: expected 7 numbers"), std::string::npos)
      << reloaded.message();
}

const std::vector<std::string> kGreedyColumns = {"q", "k", "v", "o", "gate", "up", "down",
                                                 "effective", "error", "uniform_error"};

TEST(Teal, TheGreedyAllocationBeatsUniformOnItsLayersOutputs) {
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const PluginEntry* entry = test::plugin_registry().find("teal");
  ASSERT_NE(entry, nullptr);
  ParamValues given = calibrated(0.5);
  given.set("allocation", std::string("greedy"));
  const ParamValues resolved = test::resolved_params(*entry, given);
  auto method = test::make_method("teal", given);
  auto prepared = prepare_method(*method.get(), *entry, resolved, **engine, test::temp_path("teal-greedy"));
  ASSERT_TRUE(prepared.ok()) << prepared.message();
  const ModelConfig& c = (*engine)->config();
  auto table = read_layer_table((prepared->artifact_dir / "greedy.tsv").string(), kGreedyColumns, c.n_layers);
  ASSERT_TRUE(table.ok()) << table.message();
  // One step is worth 0.05 of q's weights: 0.05 * 64 * 64 / (64*64 + 2*32*64 + 64*64 + 3*160*64) = 0.0050.
  const double step = 0.05 * 64 * 64 / double(64 * 64 + 2 * 32 * 64 + 64 * 64 + 3 * 160 * 64);
  double greedy = 0, uniform = 0;
  for (int32_t l = 0; l < c.n_layers; ++l) {
    const auto& row = (*table)[size_t(l)];
    EXPECT_GE(row[7], 0.5 - 1e-9) << "layer " << l;
    EXPECT_LT(row[7], 0.5 + 3 * step) << "layer " << l;  // a step of gate/up/down is worth more than one of q
    EXPECT_GT(row[8], 0.0);
    EXPECT_LE(row[8], row[9]) << "layer " << l << ": greedy error " << row[8] << ", uniform " << row[9];
    greedy += row[8], uniform += row[9];
    EXPECT_NE(*std::min_element(row.begin(), row.begin() + 7), *std::max_element(row.begin(), row.begin() + 7))
        << "layer " << l << ": every projection at the same sparsity";
  }
  std::printf("[ teal ] greedy allocation, output error summed over layers: %.4f (uniform %.4f)\n", greedy, uniform);
  // The run zeroes about the weighted target over the calibration windows.
  WeightOverrides overrides;
  ASSERT_TRUE((*engine)->set_method(method.get(), entry->hooks, &overrides, "teal").ok());
  const auto counted = run_calibration_windows(**engine);
  (void)(*engine)->set_method(nullptr, 0);
  const double sizes[] = {64 * 64, 32 * 64, 32 * 64, 64 * 64, 160 * 64, 160 * 64, 160 * 64};
  const char* names[] = {"q", "k", "v", "o", "gate", "up", "down"};
  double zeroed = 0, total = 0;
  for (int p = 0; p < 7; ++p) {
    const auto it = counted.find(std::string("activation_sparsity.") + names[p]);
    zeroed += (it == counted.end() ? 0.0 : it->second) * sizes[p];
    total += sizes[p];
  }
  EXPECT_NEAR(zeroed / total, 0.5, 0.06);
}

TEST(Teal, BatchInvariance) { EXPECT_BATCH_INVARIANT(model(), "teal", calibrated(0.5)); }

}  // namespace test_teal
}  // namespace inferlab
