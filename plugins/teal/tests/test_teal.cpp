// TEAL: dense at sparsity 0; its calibrated thresholds zero the target
// fraction of each projection's inputs on the calibration windows; the
// projections it leaves alone stay dense; more sparsity, further from dense;
// a damaged threshold file is refused naming it. The mechanism itself:
// tests/unit/test_activation_sparsity.cpp.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "datasets/tasks.h"
#include "experiment/calibration.h"
#include "inferlab/testing.h"

namespace inferlab {
namespace {

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

}  // namespace
}  // namespace inferlab
