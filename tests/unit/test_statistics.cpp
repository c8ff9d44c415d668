// The report's statistics: Wilson intervals, McNemar's exact test, bootstrap
// intervals of a perplexity, and how `inferlab report` shows them.
#include <gtest/gtest.h>

#include <fmt/format.h>

#include <cmath>

#include "results/database.h"
#include "results/report.h"
#include "results/statistics.h"
#include "test_support.h"

namespace inferlab {
namespace test_statistics {

TEST(Statistics, WilsonIntervalsOfKnownProportions) {
  const Interval a = wilson_interval(10, 40);  // the passkey study's "dense 25%"
  EXPECT_NEAR(a.lo, 0.14187, 1e-5);
  EXPECT_NEAR(a.hi, 0.40194, 1e-5);
  const Interval all = wilson_interval(20, 20), none = wilson_interval(0, 20);
  EXPECT_NEAR(all.lo, 0.83887, 1e-5);
  EXPECT_EQ(all.hi, 1.0);
  EXPECT_EQ(none.lo, 0.0);
  EXPECT_NEAR(none.hi, 0.16113, 1e-5);
  const Interval empty = wilson_interval(0, 0);
  EXPECT_EQ(empty.lo, 0.0);
  EXPECT_EQ(empty.hi, 1.0);
}

TEST(Statistics, McNemarExactPValues) {
  EXPECT_DOUBLE_EQ(mcnemar_exact_p(0, 0), 1.0);
  EXPECT_DOUBLE_EQ(mcnemar_exact_p(3, 3), 1.0);
  EXPECT_NEAR(mcnemar_exact_p(0, 5), 0.0625, 1e-12);
  EXPECT_NEAR(mcnemar_exact_p(9, 1), 0.021484375, 1e-12);  // symmetric in b and c
  EXPECT_NEAR(mcnemar_exact_p(1, 9), 0.021484375, 1e-12);
  EXPECT_LT(mcnemar_exact_p(0, 400), 1e-100);  // large counts stay finite
}

TEST(Statistics, BootstrapIntervalOfAPerplexity) {
  // Identical windows: nothing to resample, the interval is the value.
  const Interval same = bootstrap_perplexity({20.0, 20.0, 20.0}, {10, 10, 10});
  EXPECT_NEAR(same.lo, std::exp(2.0), 1e-9);
  EXPECT_NEAR(same.hi, std::exp(2.0), 1e-9);
  std::vector<double> nll;
  std::vector<int64_t> count;
  for (int i = 0; i < 40; ++i) nll.push_back(100.0 + 10.0 * (i % 7)), count.push_back(50);
  const Interval a = bootstrap_perplexity(nll, count), b = bootstrap_perplexity(nll, count);
  EXPECT_EQ(a.lo, b.lo);  // deterministic for a seed
  EXPECT_EQ(a.hi, b.hi);
  double total = 0;
  for (double x : nll) total += x;
  const double point = std::exp(total / (40.0 * 50.0));
  EXPECT_LT(a.lo, point);
  EXPECT_GT(a.hi, point);
  // A quarter of the windows: a wider interval.
  const Interval few = bootstrap_perplexity({nll.begin(), nll.begin() + 10}, {count.begin(), count.begin() + 10});
  EXPECT_GT(few.hi - few.lo, a.hi - a.lo);
}

RunRecord passkey_run(const std::string& hash, const std::string& label, int solved, bool baseline) {
  RunRecord r;
  r.hash = hash;
  r.experiment = "stats";
  r.label = label;
  r.plugin = label;
  r.task = "passkey";
  r.model = "m";
  r.backend = "cpu";
  r.status = RunStatus::Finished;
  r.baseline = baseline;
  r.metrics = {{"accuracy", solved / 20.0, ""}};
  for (int i = 0; i < 20; ++i) r.samples.push_back(SampleRow{i, 512, "7", "7", i < solved, 0.1, "{}"});
  return r;
}

TEST(Statistics, ReportShowsIntervalsAndThePairedComparison) {
  auto db = ResultsDb::open(test::temp_path("stats.db"));
  ASSERT_TRUE(db.ok()) << db.message();
  ASSERT_TRUE(db->record_run(passkey_run("d", "dense", 20, true)).ok());
  ASSERT_TRUE(db->record_run(passkey_run("q", "quest", 10, false)).ok());
  RunRecord ppl_dense, ppl_method;
  for (auto* r : {&ppl_dense, &ppl_method}) {
    const bool dense = r == &ppl_dense;
    r->hash = dense ? "pd" : "pm";
    r->experiment = "stats";
    r->label = dense ? "dense" : "quest";
    r->task = "perplexity";
    r->backend = "cpu";
    r->status = RunStatus::Finished;
    r->baseline = dense;
    r->metrics = {{"perplexity", dense ? 8.0 : 9.0, ""}};
    for (int i = 0; i < 8; ++i)  // older rows have no nll_sum: nll_mean over input_tokens - 1
      r->samples.push_back(SampleRow{i, 101, "", "", std::nullopt, 0.1,
                                     fmt::format("{{\"nll_mean\": {}}}", std::log(dense ? 8.0 : 9.0) + 0.05 * (i % 3))});
  }
  ASSERT_TRUE(db->record_run(ppl_dense).ok());
  ASSERT_TRUE(db->record_run(ppl_method).ok());
  auto report = render_report(*db, "stats");
  ASSERT_TRUE(report.ok()) << report.message();
  const auto rows = test::table_rows(*report);
  using Cells = std::vector<std::string>;
  ASSERT_EQ(rows.size(), 8u) << *report;  // two tables: header, rule, two runs each
  EXPECT_EQ(rows[0], (Cells{"method", "accuracy %", "Δ pts", "95% CI", "n", "lost/gained", "McNemar p"}));
  EXPECT_EQ(rows[2], (Cells{"dense", "100.0", "+0.0", "83.9–100.0", "20", "", ""}));
  EXPECT_EQ(rows[3], (Cells{"quest", "50.0", "-50.0", "29.9–70.1", "20", "10/0", "0.002"}));  // p = 2 * 0.5^10
  EXPECT_EQ(rows[4], (Cells{"method", "perplexity", "ppl ratio", "95% CI"}));
  // Windows of 100 scored tokens with mean NLLs ln 8 + {0, 0.05, 0.1}: the interval lies around exp(ln 8 + 0.05).
  const std::string ci = rows[6][3];
  const double lo = std::stod(ci.substr(0, ci.find("–"))), hi = std::stod(ci.substr(ci.find("–") + 3));
  EXPECT_LT(lo, 8.0 * std::exp(0.05));
  EXPECT_GT(hi, 8.0 * std::exp(0.05));
  EXPECT_GT(lo, 8.0);
}

TEST(Statistics, BootstrapIntervalOfAMean) {
  const Interval same = bootstrap_mean({-2.0, -2.0, -2.0});
  EXPECT_DOUBLE_EQ(same.lo, -2.0);
  EXPECT_DOUBLE_EQ(same.hi, -2.0);
  std::vector<double> v;
  for (int i = 0; i < 30; ++i) v.push_back(-1.0 - 0.1 * (i % 5));  // mean -1.2
  const Interval a = bootstrap_mean(v);
  EXPECT_LT(a.lo, -1.2);
  EXPECT_GT(a.hi, -1.2);
  EXPECT_GT(a.lo, -1.4);
  EXPECT_LT(a.hi, -1.0);
  EXPECT_EQ(bootstrap_mean(v).lo, a.lo);  // deterministic for a seed
}

// A passkey run whose samples sit at two depths of one length, with answer log-probabilities.
RunRecord answer_run(const std::string& hash, const std::string& label, double logprob_shift, bool baseline) {
  RunRecord r = passkey_run(hash, label, baseline ? 20 : 15, baseline);
  r.metrics.push_back({"answer_logprob", -1.0 + logprob_shift, "nats"});
  for (SampleRow& s : r.samples) {
    const double depth = s.index < 10 ? 0.1 : 0.9;
    const double lp = -1.0 + logprob_shift + 0.1 * double(s.index % 3 - 1);
    s.detail_json = fmt::format(R"({{"id": "len512-depth{}-s{}", "depth": {}, "length": 512, "answer_logprob": {}}})",
                                depth, s.index, depth, lp);
  }
  return r;
}

TEST(Statistics, ReportShowsAnswerLogprobIntervalsAndPerDepthTables) {
  auto db = ResultsDb::open(test::temp_path("answers.db"));
  ASSERT_TRUE(db.ok()) << db.message();
  ASSERT_TRUE(db->record_run(answer_run("d", "dense", 0.0, true)).ok());
  ASSERT_TRUE(db->record_run(answer_run("q", "quest", -0.5, false)).ok());
  auto report = render_report(*db, "stats");
  ASSERT_TRUE(report.ok()) << report.message();
  const auto rows = test::table_rows(*report);
  using Cells = std::vector<std::string>;
  ASSERT_EQ(rows.size(), 8u) << *report;  // the run table and one per-depth table
  EXPECT_EQ(rows[0], (Cells{"method", "accuracy %", "Δ pts", "95% CI", "n", "lost/gained", "McNemar p",
                            "answer logprob", "Δ nats", "95% CI", "n", "Δ 95% CI"}));
  EXPECT_EQ(rows[3][8], "-0.500");
  EXPECT_EQ(rows[3][10], "20");
  // Every sample is exactly 0.5 nats below dense: the paired interval is that point.
  EXPECT_EQ(rows[3][11], "-0.500–-0.500");
  EXPECT_EQ(rows[2][11], "");
  EXPECT_NE(report->find("By depth, 512 tokens: solved/n, mean answer logprob (nats)"), std::string::npos) << *report;
  EXPECT_EQ(rows[4], (Cells{"method", "depth 0.1", "depth 0.9"}));
  EXPECT_EQ(rows[6], (Cells{"dense", "10/10, -1.01", "10/10, -1.00"})) << *report;
  EXPECT_EQ(rows[7], (Cells{"quest", "10/10, -1.51", "5/10, -1.50"})) << *report;
  EXPECT_EQ(rows[3][7], "-1.500");
}

}  // namespace test_statistics
}  // namespace inferlab
