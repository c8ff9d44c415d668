// CALM: a threshold of 1 keeps the dense model for every measure (with exit
// heads and a trained classifier too); a low one exits at the first checked
// layer; the threshold decays with the generated position as the formula
// says; calibration fits exit heads that agree with the last layer more often
// than the raw intermediate states do; a certified lambda file replaces
// lambda; bad parameters are refused naming the key.
#include <gtest/gtest.h>

#include <cmath>
#include <filesystem>
#include <fstream>
#include <string>

#include "experiment/calibration.h"
#include "inferlab/testing.h"

namespace inferlab {
namespace test_calm {

constexpr int32_t kLayers = 4;

std::shared_ptr<Model> model() { return test::shared_synthetic({.name = "calm-4", .n_layers = kLayers, .seed = 11}); }

ParamValues settings(const std::string& measure, double lambda, bool heads = false, int64_t first_exit = 1,
                     int64_t interval = 1, const std::string& lambda_file = "", double tau = 4.0) {
  return test::params({{"measure", measure},
                       {"lambda", lambda},
                       {"tau", tau},
                       {"exit_heads", heads},
                       {"first_exit", first_exit},
                       {"interval", interval},
                       {"lambda_file", lambda_file},
                       {"corpus", std::string("kv_retrieval")},
                       {"calibration_samples", int64_t(16)},
                       {"calibration_tokens", int64_t(64)}});
}

// lambda = 1 without decay (tau = 0) is a threshold of 1, which no confidence
// exceeds; with decay the threshold falls below 1 after the first token.
TEST(Calm, AThresholdOfOneKeepsTheDenseModelForEveryMeasure) {
  EXPECT_DENSE_EQUIVALENT(model(), "calm", settings("softmax", 1.0, false, 1, 1, "", 0.0));
  EXPECT_DENSE_EQUIVALENT(model(), "calm", settings("state", 1.0, false, 1, 1, "", 0.0));
  EXPECT_DENSE_EQUIVALENT(model(), "calm", settings("classifier", 1.0, false, 1, 1, "", 0.0));
  EXPECT_DENSE_EQUIVALENT(model(), "calm", settings("softmax", 1.0, true, 1, 1, "", 0.0));
}

TEST(Calm, ALowThresholdExitsAtTheFirstCheckedLayer) {
  for (const int64_t first_exit : {1, 2}) {
    auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
    ASSERT_TRUE(engine.ok());
    test::ActiveMethod active = test::activate_method(**engine, "calm", settings("softmax", 1e-9, false, first_exit));
    ASSERT_NE(active.handle.get(), nullptr);
    (*engine)->reset_counters();
    test::run_trace(**engine, active.handle.get(), test::random_tokens(model()->config().n_vocab, 12, 3), 6);
    const auto c = (*engine)->counters().as_map();
    EXPECT_DOUBLE_EQ(c.at("early_exits"), 6.0);
    EXPECT_DOUBLE_EQ(c.at("layers_per_decode_token"), double(first_exit));
    EXPECT_DOUBLE_EQ(c.at("kv_fills_propagated"), 6.0 * double(kLayers - first_exit));
    EXPECT_DOUBLE_EQ(c.at("exit_checks_per_decode_token"), 1.0);
  }
}

TEST(Calm, TheIntervalSetsWhichLayersAreChecked) {
  auto method = test::make_method("calm", test::resolved_params(*test::plugin_registry().find("calm"),
                                                                settings("state", 0.5, false, 1, 2)));
  ASSERT_NE(method.get(), nullptr);
  LoadContext ctx;
  ctx.shape = test::tiny_shape(7);
  ASSERT_TRUE(method->on_load(ctx).ok());
  EXPECT_EQ(method->exit_policy().check, (std::vector<uint8_t>{1, 0, 1, 0, 1, 0, 0}));
}

TEST(Calm, TheThresholdDecaysWithTheGeneratedPosition) {
  auto method = test::make_method("calm", test::resolved_params(*test::plugin_registry().find("calm"),
                                                                settings("softmax", 0.8)));
  ASSERT_NE(method.get(), nullptr);
  LoadContext ctx;
  ctx.shape = test::tiny_shape(4);
  ASSERT_TRUE(method->on_load(ctx).ok());
  auto state = method->new_sequence_state(ctx.shape);
  StepInfo prompt{0, 0, 20, 1, state.get()};
  EXPECT_GT(method->exit_threshold(prompt), 1.0);  // prompts never exit
  const double n = 64, tau = 4;                    // the defaults
  for (const int32_t t : {0, 1, 10, 64, 500}) {
    StepInfo step{1 + t, 20 + t, 1, 1, state.get()};
    EXPECT_NEAR(method->exit_threshold(step), 0.9 * 0.8 + 0.1 * 0.8 * std::exp(-tau * t / n), 1e-12) << t;
  }
}

TEST(Calm, ExitHeadsAgreeWithTheLastLayerMoreOftenThanTheRawStates) {
  auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  test::ActiveMethod active = test::activate_method(**engine, "calm", settings("classifier", 0.9, true));
  ASSERT_NE(active.handle.get(), nullptr);
  const ExitPolicy policy = active.handle->exit_policy();
  ASSERT_EQ(policy.heads.size(), size_t(kLayers));
  ASSERT_EQ(policy.classifiers.size(), size_t(kLayers));
  const auto c = active.handle->counters();
  for (int32_t l = 0; l + 1 < kLayers; ++l) {
    const std::string at = fmt::format("layer{:02d}", l);
    ASSERT_TRUE(policy.heads[size_t(l)].present()) << at;
    EXPECT_EQ(policy.heads[size_t(l)].weight.size(), size_t(64 * 64));
    EXPECT_EQ(policy.classifiers[size_t(l)].weight.size(), size_t(2 * 64));
    const double plain = c.at("calibration_agreement." + at), mapped = c.at("calibration_agreement_head." + at);
    EXPECT_GT(mapped, plain) << at;
    EXPECT_GE(c.at("classifier_accuracy." + at), 0.0);
    EXPECT_LE(c.at("classifier_accuracy." + at), 1.0);
  }
  EXPECT_FALSE(policy.heads[size_t(kLayers - 1)].present());
  // Such a method runs: every decode step checks each layer below the last.
  (*engine)->reset_counters();
  test::run_trace(**engine, active.handle.get(), test::random_tokens(model()->config().n_vocab, 12, 5), 4);
  EXPECT_GT((*engine)->counters().exit_checks, 0);
}

// The threshold only steers the runs: a grid over it shares one calibration.
TEST(Calm, ThresholdsShareOneCalibrationAndTheMeasureDoesNot) {
  const PluginEntry* entry = test::plugin_registry().find("calm");
  ASSERT_NE(entry, nullptr);
  auto dir = [&](const ParamValues& p) {
    const ParamValues resolved = test::resolved_params(*entry, p);
    auto d = calibration_dir(*entry, resolved, calibration_request(resolved, kTapHiddenOut), "checksum", "cpu-f32",
                             test::temp_path("calm-key"));
    EXPECT_TRUE(d.ok());
    return d.ok() ? d->filename().string() : std::string();
  };
  EXPECT_EQ(dir(settings("softmax", 0.9, true)), dir(settings("softmax", 0.5, true, 1, 1, "", 2.0)));
  EXPECT_NE(dir(settings("softmax", 0.9, true)), dir(settings("classifier", 0.9, true)));
  EXPECT_NE(dir(settings("softmax", 0.9, true)), dir(settings("softmax", 0.9, true, 2)));
}

TEST(Calm, ACertifiedLambdaFileReplacesLambda) {
  const auto file = test::temp_path("certified.txt");
  std::ofstream(file) << "# Learn then Test\ndelta 0.1\nlambda 0.625\n";
  auto engine = Engine::create(model(), EngineOptions{4, 0, 0});
  ASSERT_TRUE(engine.ok());
  test::ActiveMethod active = test::activate_method(**engine, "calm", settings("state", 0.9, false, 1, 1, file));
  ASSERT_NE(active.handle.get(), nullptr);
  EXPECT_DOUBLE_EQ(active.handle->counters().at("lambda"), 0.625);
}

TEST(Calm, BadParametersAreRefusedNamingTheKey) {
  const PluginEntry* entry = test::plugin_registry().find("calm");
  ASSERT_NE(entry, nullptr);
  auto created = test::plugin_registry().create("calm", test::resolved_params(*entry, settings("softmax", 0.0)));
  ASSERT_FALSE(created.ok());
  EXPECT_NE(created.message().find("lambda"), std::string::npos);
  auto load_error = [&](const ParamValues& p) {
    auto method = test::make_method("calm", test::resolved_params(*entry, p));
    if (method.get() == nullptr) return std::string("not created");
    LoadContext ctx;
    ctx.shape = test::tiny_shape(4);
    const Status s = method->on_load(ctx);
    return s.ok() ? std::string() : s.message();
  };
  EXPECT_NE(load_error(settings("softmax", 0.5, false, 4)).find("first_exit = 4"), std::string::npos);
  EXPECT_EQ(load_error(settings("softmax", 0.5, false, 3)), "");
  EXPECT_NE(load_error(settings("softmax", 0.5, false, 1, 1, "/nonexistent/lambda.txt")).find("lambda_file"),
            std::string::npos);
  const auto bad = test::temp_path("bad-lambda.txt");
  std::ofstream(bad) << "lambda 1.5\n";
  EXPECT_NE(load_error(settings("softmax", 0.5, false, 1, 1, bad)).find(":1: lambda must be"), std::string::npos);
}

// Inside a batch a sequence gives the logits it gives alone (CALM's exit
// checks make a batch run its sequences one by one: counter batch_fallbacks).
TEST(Calm, BatchInvariance) {
  EXPECT_BATCH_INVARIANT(model(), "calm", settings("state", 0.9));
  EXPECT_BATCH_INVARIANT(model(), "calm", settings("softmax", 0.3, true));
}

}  // namespace test_calm
}  // namespace inferlab
