// Learn then Test: Hoeffding–Bentkus p-values against an independent
// computation (Python, exact binomial sums: see the numbers' comment), the
// smallest calibration split, fixed-sequence testing, the certificate that
// `inferlab calibrate` writes from a grid's stored samples, and the [ltt]
// table's errors.
#include <gtest/gtest.h>
#include <fmt/format.h>

#include <cmath>
#include <fstream>
#include <random>

#include "experiment/certify.h"
#include "experiment/config.h"
#include "experiment/risk_control.h"
#include "test_support.h"

namespace inferlab {
namespace test_risk_control {

// Reference values: p = min(1, exp(-n h(min(r, d), d)), e * sum_{i <= ceil(n r)} C(n, i) d^i (1 - d)^(n - i)),
// evaluated with Python's math.comb (exact integers).
TEST(RiskControl, HoeffdingBentkusPValuesMatchAnExactComputation) {
  struct Case {
    double risk;
    int64_t n;
    double delta, p;
  };
  for (const Case& c : {Case{0.05, 100, 0.1, 0.15651020427695356}, Case{0.0, 22, 0.1, 0.098477090218361},
                        Case{0.0, 21, 0.1, 0.10941898913151223}, Case{0.02, 200, 0.05, 0.07188985588568106},
                        Case{0.08, 100, 0.1, 0.7890615053595085}, Case{0.12, 100, 0.1, 1.0},
                        Case{0.1, 1000, 0.2, 2.3733879999953085e-17}})
    EXPECT_NEAR(ltt::hoeffding_bentkus_p(c.risk, c.n, c.delta), c.p, 1e-9 * std::max(1.0, c.p) + c.p * 1e-9)
        << c.risk << " " << c.n << " " << c.delta;
}

TEST(RiskControl, TheSmallestCalibrationSplitIsWhereAZeroRiskJustRejects) {
  EXPECT_EQ(ltt::min_calibration_size(0.1, 0.1), 22);  // 0.9^22 = 0.098 <= 0.1 < 0.9^21
  EXPECT_LE(ltt::hoeffding_bentkus_p(0.0, 22, 0.1), 0.1);
  EXPECT_GT(ltt::hoeffding_bentkus_p(0.0, 21, 0.1), 0.1);
  EXPECT_EQ(ltt::min_calibration_size(0.2, 0.1), 11);
}

TEST(RiskControl, FixedSequenceTestingStopsAtTheFirstFailure) {
  // Settings safest first; the third fails, so the fourth (risk 0 again) is never tested.
  const std::vector<std::vector<double>> losses = {std::vector<double>(100, 0.0), std::vector<double>(100, 0.02),
                                                   std::vector<double>(100, 0.5), std::vector<double>(100, 0.0)};
  std::vector<int64_t> all(100);
  for (int64_t i = 0; i < 100; ++i) all[size_t(i)] = i;
  const ltt::Certificate c = ltt::fixed_sequence(losses, all, 0.1, 0.1);
  EXPECT_EQ(c.chosen, 1);
  ASSERT_EQ(c.p_values.size(), 3u);
  EXPECT_DOUBLE_EQ(c.risks[1], 0.02);
  EXPECT_EQ(c.p_values[2], 1.0);
  EXPECT_EQ(ltt::fixed_sequence({std::vector<double>(100, 0.5)}, all, 0.1, 0.1).chosen, -1);
}

// A grid of three thresholds with known per-sample losses, stored as finished
// runs; the certificate takes the most aggressive value whose risk is certified.
TEST(RiskControl, ACertificateComesFromTheGridsStoredSamples) {
  const auto dir = test::temp_path("ltt");
  std::filesystem::create_directories(dir);
  auto db = ResultsDb::open(dir / "results.db");
  ASSERT_TRUE(db.ok());
  ExperimentConfig config;
  config.name = "ltt-test";
  MethodSection method{"calm", "calm", "1.0.0", {{"lambda", {1.0, 0.8, 0.6}}, {"measure", {std::string("softmax")}}}};
  config.methods.push_back(method);
  LttSection l;
  l.method = "calm";
  l.delta = 0.2;
  l.epsilon = 0.1;
  l.calibration_samples = 100;
  l.splits = 20;
  l.output = (dir / "certified.txt").string();
  config.ltt = l;
  std::vector<RunSpec> grid;
  std::mt19937_64 rng(4);
  std::uniform_real_distribution<double> u;
  for (const double lambda : {1.0, 0.8, 0.6}) {
    RunSpec run;
    run.plugin = "calm";
    run.label = fmt::format("calm lambda={}", lambda);
    run.params.set("lambda", lambda);
    run.params.set("measure", std::string("softmax"));
    run.hash = fmt::format("hash-{}", lambda);
    grid.push_back(run);
    RunRecord record;
    record.hash = run.hash;
    record.experiment = config.name;
    record.label = run.label;
    record.plugin = "calm";
    record.task = "fidelity";
    record.status = RunStatus::Finished;
    const double rate = lambda == 1.0 ? 0.0 : lambda == 0.8 ? 0.05 : 0.4;  // each sample's chance of a full loss
    for (int64_t i = 0; i < 200; ++i)
      record.samples.push_back({i, 10, "", "", std::nullopt, 0.1,
                                fmt::format("{{\"top1_agreement\": {}}}", u(rng) < rate ? 0.0 : 1.0)});
    ASSERT_TRUE(db->record_run(record).ok());
  }
  std::FILE* out = std::tmpfile();
  auto outcome = certify_by_ltt(config, grid, *db, out);
  ASSERT_TRUE(outcome.ok()) << outcome.message();
  EXPECT_TRUE(outcome->certified);
  EXPECT_DOUBLE_EQ(outcome->value, 0.8);
  EXPECT_LT(outcome->held_out_risk, 0.2);
  EXPECT_EQ(outcome->splits, 20);
  EXPECT_EQ(outcome->violations, 0);  // a true risk of 0.05 against delta 0.2
  std::fclose(out);
  std::ifstream written(l.output);
  std::string text((std::istreambuf_iterator<char>(written)), std::istreambuf_iterator<char>());
  EXPECT_NE(text.find("\nlambda 0.8\n"), std::string::npos) << text;
  EXPECT_NE(text.find("delta 0.2"), std::string::npos) << text;
  EXPECT_TRUE(std::filesystem::exists(l.output + ".splits.tsv"));

  // More calibration samples than the task has leaves nothing held out.
  config.ltt->calibration_samples = 200;
  std::FILE* sink = std::tmpfile();
  auto refused = certify_by_ltt(config, grid, *db, sink);
  std::fclose(sink);
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find("ltt.calibration_samples: 200 of the task's 200 samples"), std::string::npos);
}

Catalog ltt_catalog() {
  Catalog catalog;
  catalog.tasks.push_back({"fidelity", "teacher-forced agreement", {}});
  catalog.plugins.push_back({"dense", "1.0.0", "full attention", 0, {}, "/plugins/libdense.so"});
  catalog.plugins.push_back({"calm", "1.0.0", "early exit", 0,
                             {ParamSpec::real("lambda", 0.9, 0.0, 1.0, ""),
                              ParamSpec::string("measure", "softmax", {"softmax", "state"}, "")},
                             "/plugins/libcalm.so"});
  return catalog;
}

std::string ltt_errors(const std::string& ltt_table, const std::string& methods) {
  const std::string text = "[experiment]\nname = \"x\"\n[model]\nname = \"smollm2-135m\"\n[task]\ntype = \"fidelity\"\n" +
                           methods + ltt_table;
  auto config = parse_experiment(text, "ltt.toml", ltt_catalog());
  return config.ok() ? std::string() : config.message();
}

TEST(RiskControl, AnLttTableThatCannotCertifyIsRefusedNamingTheKey) {
  const std::string calm = "[[method]]\nplugin = \"calm\"\nname = \"calm\"\nlambda = [1.0, 0.8]\n";
  const std::string ok = "[ltt]\nmethod = \"calm\"\ncalibration_samples = 100\noutput = \"out/lambda.txt\"\n";
  EXPECT_EQ(ltt_errors(ok, calm), "");
  EXPECT_NE(ltt_errors("[ltt]\nmethod = \"calm\"\ncalibration_samples = 10\noutput = \"o.txt\"\n", calm)
                .find("ltt.calibration_samples: 10 calibration samples cannot certify a risk of 0.1 at epsilon 0.1: "
                      "even a risk of 0 needs at least 22"),
            std::string::npos);
  EXPECT_NE(ltt_errors("[ltt]\nmethod = \"calmx\"\ncalibration_samples = 100\noutput = \"o.txt\"\n", calm)
                .find("ltt.method: no [[method]] named \"calmx\" (the config's: calm)"),
            std::string::npos);
  EXPECT_NE(ltt_errors("[ltt]\nmethod = \"calm\"\nparameter = \"measure\"\ncalibration_samples = 100\noutput = "
                       "\"o.txt\"\n", calm).find("\"measure\" is not a number"),
            std::string::npos);
  EXPECT_NE(ltt_errors(ok, "[[method]]\nplugin = \"calm\"\nname = \"calm\"\nlambda = [1.0, 0.8]\nmeasure = "
                           "[\"softmax\", \"state\"]\n").find("varies \"measure\" too"),
            std::string::npos);
  EXPECT_NE(ltt_errors("[ltt]\nmethod = \"calm\"\n", calm).find("ltt.output: missing"), std::string::npos);
  EXPECT_NE(ltt_errors("[ltt]\nmethod = \"calm\"\ndelta = 1.5\ncalibration_samples = 100\noutput = \"o.txt\"\n", calm)
                .find("ltt.delta"),
            std::string::npos);
}

}  // namespace test_risk_control
}  // namespace inferlab
