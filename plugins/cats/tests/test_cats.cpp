// CATS: dense at sparsity 0; its calibrated gate thresholds zero the target
// fraction of each layer's FFN neurons on the calibration windows (up and down
// skip them); more sparsity, further from dense; a damaged threshold file is
// refused naming it. The mechanism: tests/unit/test_activation_sparsity.cpp.
#include <gtest/gtest.h>

#include <filesystem>
#include <fstream>
#include <string>

#include "datasets/tasks.h"
#include "experiment/calibration.h"
#include "inferlab/testing.h"

namespace inferlab {
namespace test_cats {

std::shared_ptr<Model> model() { return test::gqa_test_model("cats", 6); }

ParamValues calibrated(double sparsity) {
  return test::params({{"sparsity", sparsity},
                       {"corpus", std::string("kv_retrieval")},
                       {"calibration_samples", int64_t(4)},
                       {"calibration_tokens", int64_t(64)}});
}

TEST(Cats, SparsityZeroIsDense) { EXPECT_DENSE_EQUIVALENT(model(), "cats", calibrated(0.0)); }

TEST(Cats, TheGateThresholdZeroesTheTargetFractionOfNeurons) {
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  auto windows = corpus_windows((*engine)->model().tokenizer(), "kv_retrieval", 4, 64, 0);
  ASSERT_TRUE(windows.ok());
  for (const double target : {0.4, 0.7}) {
    test::ActiveMethod cats = test::activate_method(**engine, "cats", calibrated(target));
    ASSERT_NE(cats.handle.get(), nullptr);
    (*engine)->reset_counters();
    for (const auto& w : *windows) {
      auto seq = (*engine)->new_sequence();
      ASSERT_TRUE((*engine)->forward(*seq, w, int64_t(w.size()), {}).ok());
    }
    const auto counted = (*engine)->counters().as_map();
    (void)(*engine)->set_method(nullptr, 0);
    EXPECT_NEAR(counted.at("activation_sparsity.up"), target, 0.01) << target;
    // Down reads the activation, zero where a neuron was: at least as sparse.
    EXPECT_GE(counted.at("activation_sparsity.down"), counted.at("activation_sparsity.up"));
    EXPECT_EQ(counted.count("activation_sparsity.q"), 0u);
  }
}

TEST(Cats, MoreSparsityIsFurtherFromDense) {
  double previous = 0;
  for (const double s : {0.2, 0.5, 0.8}) {
    const auto eq = test::compare_with_dense(model(), "cats", calibrated(s));
    EXPECT_GT(eq.max_error, previous) << "sparsity " << s;
    previous = eq.max_error;
  }
}

TEST(Cats, ADamagedThresholdFileIsRefusedNamingIt) {
  auto engine = Engine::create(model(), EngineOptions{.page_size = 4});
  ASSERT_TRUE(engine.ok());
  const PluginEntry* entry = test::plugin_registry().find("cats");
  ASSERT_NE(entry, nullptr);
  const ParamValues resolved = test::resolved_params(*entry, calibrated(0.5));
  const auto root = test::temp_path("cats-artifacts");
  auto first = test::make_method("cats", calibrated(0.5));
  auto prepared = prepare_method(*first.get(), *entry, resolved, **engine, root);
  ASSERT_TRUE(prepared.ok()) << prepared.message();
  const auto file = prepared->artifact_dir / "thresholds.tsv";
  std::ofstream(file, std::ios::trunc) << "layer\tgate_threshold\n0\tnan\n";
  auto second = test::make_method("cats", calibrated(0.5));
  auto reloaded = prepare_method(*second.get(), *entry, resolved, **engine, root);
  ASSERT_FALSE(reloaded.ok());
  EXPECT_NE(reloaded.message().find(file.string() + ":2: expected 1 numbers"), std::string::npos)
      << reloaded.message();
}

TEST(Cats, BatchInvariance) { EXPECT_BATCH_INVARIANT(model(), "cats", calibrated(0.5)); }

}  // namespace test_cats
}  // namespace inferlab
