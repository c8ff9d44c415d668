// `inferlab report`: per-task tables with the dense baseline first, deltas and
// ratios against it, only the columns some run has, counters per run, failed
// runs, and clear errors for unknown or empty experiments.
#include <gtest/gtest.h>

#include <sstream>

#include "results/database.h"
#include "results/report.h"
#include "test_support.h"

namespace inferlab {
namespace test_report {

RunRecord run(const std::string& hash, const std::string& label, const std::string& task,
              std::vector<MetricValue> metrics, bool baseline = false) {
  RunRecord r;
  r.hash = hash;
  r.experiment = "kv-sweep";
  r.experiment_description = "KV eviction at two budgets";
  r.label = label;
  r.plugin = label.substr(0, label.find(' '));
  r.task = task;
  r.model = "smollm2-135m";
  r.backend = "cpu";
  r.device = "test cpu";
  r.git_revision = "abc1234";
  r.status = RunStatus::Finished;
  r.baseline = baseline;
  r.metrics = std::move(metrics);
  return r;
}

constexpr double kMiB = 1024.0 * 1024.0;

// dense + two methods on two tasks, recorded out of grid order on purpose.
ResultsDb sweep_db() {
  auto db = ResultsDb::open(test::temp_path("report.db"));
  EXPECT_TRUE(db.ok()) << (db.ok() ? "" : db.message());
  if (!db) std::abort();
  RunRecord older = run("x1", "dense", "passkey", {{"accuracy", 1, ""}}, true);
  older.experiment = "older";
  const std::vector<RunRecord> runs = {
      older,
      run("p-h2o", "h2o heavy=32", "passkey",
          {{"accuracy", 0.5, ""}, {"decode_tokens_per_s", 150, "tok/s"}, {"kv_bytes_peak", 4 * kMiB, "bytes"},
           {"engine.tokens_evicted", 1234, ""}, {"plugin.heavy_hitters", 32, ""}}),
      run("p-dense", "dense", "passkey",
          {{"accuracy", 0.75, ""}, {"decode_tokens_per_s", 100, "tok/s"}, {"kv_bytes_peak", 8 * kMiB, "bytes"}},
          true),
      run("p-stream", "streaming sink=4", "passkey",
          {{"accuracy", 0.75, ""}, {"decode_tokens_per_s", 120, "tok/s"}, {"kv_bytes_peak", 2 * kMiB, "bytes"},
           {"engine.tokens_evicted", 2000, ""}}),
      run("t-dense", "dense", "perplexity", {{"perplexity", 10, ""}, {"peak_rss_bytes", 300 * kMiB, "bytes"}}, true),
      run("t-h2o", "h2o heavy=32", "perplexity", {{"perplexity", 12.5, ""}, {"peak_rss_bytes", 280 * kMiB, "bytes"}}),
      run("t-stream", "streaming sink=4", "perplexity", {{"perplexity", 11, ""}}),
  };
  for (const RunRecord& r : runs) EXPECT_TRUE(db->record_run(r).ok());
  RunRecord failed = run("t-quest", "quest pages=8", "perplexity", {});
  failed.status = RunStatus::Failed;
  failed.error = "plugin quest: page size 0";
  EXPECT_TRUE(db->record_run(failed).ok());
  return std::move(db).value();
}

// The text of the section that starts with `heading` (up to the next "## ").
std::string section(const std::string& report, const std::string& heading) {
  const size_t start = report.find(heading + "\n");
  if (start == std::string::npos) return "";
  const size_t end = report.find("\n## ", start + 1);
  return report.substr(start, end == std::string::npos ? std::string::npos : end - start);
}

std::vector<std::string> lines_of(const std::string& text) {
  std::vector<std::string> lines;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);) lines.push_back(line);
  return lines;
}

using test::table_rows;

using Cells = std::vector<std::string>;

TEST(Report, PasskeyTableHasDenseFirstWithDeltasAndRatios) {
  ResultsDb db = sweep_db();
  auto report = render_report(db, "");  // latest experiment: kv-sweep
  ASSERT_TRUE(report.ok()) << report.message();
  const auto rows = table_rows(section(*report, "## passkey"));
  ASSERT_EQ(rows.size(), 5u) << *report;  // header, rule, three runs
  EXPECT_EQ(rows[0], (Cells{"method", "accuracy %", "Δ pts", "decode tok/s", "speedup", "KV MiB", "KV ratio"}));
  EXPECT_EQ(rows[1][0].substr(0, 4), ":---");
  EXPECT_EQ(rows[2], (Cells{"dense", "75.0", "+0.0", "100.0", "1.00×", "8.0", "1.00×"}));
  EXPECT_EQ(rows[3], (Cells{"h2o heavy=32", "50.0", "-25.0", "150.0", "1.50×", "4.0", "0.50×"}));
  EXPECT_EQ(rows[4], (Cells{"streaming sink=4", "75.0", "+0.0", "120.0", "1.20×", "2.0", "0.25×"}));
}

TEST(Report, RunsOnTwoBackendsAreComparedWithTheirOwnBaseline) {
  auto opened = ResultsDb::open(test::temp_path("report-backends.db"));
  ASSERT_TRUE(opened.ok()) << opened.message();
  ResultsDb db = std::move(opened).value();
  RunRecord cuda_dense = run("c-dense", "dense", "passkey", {{"decode_tokens_per_s", 1000, "tok/s"}}, true);
  RunRecord cuda_h2o = run("c-h2o", "h2o heavy=32", "passkey", {{"decode_tokens_per_s", 1500, "tok/s"}});
  cuda_dense.backend = cuda_h2o.backend = "cuda";
  for (const RunRecord& r : {run("p-dense", "dense", "passkey", {{"decode_tokens_per_s", 100, "tok/s"}}, true),
                             run("p-h2o", "h2o heavy=32", "passkey", {{"decode_tokens_per_s", 150, "tok/s"}}),
                             cuda_dense, cuda_h2o})
    ASSERT_TRUE(db.record_run(r).ok());
  auto report = render_report(db, "");
  ASSERT_TRUE(report.ok()) << report.message();
  const auto cpu = table_rows(section(*report, "## passkey (cpu)"));
  const auto cuda = table_rows(section(*report, "## passkey (cuda)"));
  ASSERT_EQ(cpu.size(), 4u) << *report;
  ASSERT_EQ(cuda.size(), 4u) << *report;
  EXPECT_EQ(cpu[3], (Cells{"h2o heavy=32", "150.0", "1.50×"}));
  EXPECT_EQ(cuda[3], (Cells{"h2o heavy=32", "1500.0", "1.50×"}));
}

TEST(Report, SparsePrefillShowsTheShareOfKeysItsSparseHeadsRead) {
  auto opened = ResultsDb::open(test::temp_path("report-sparse.db"));
  ASSERT_TRUE(opened.ok()) << opened.message();
  ResultsDb db = std::move(opened).value();
  for (const RunRecord& r : {run("f-dense", "dense", "fidelity", {{"fidelity_top1", 1.0, ""}}, true),
                             run("f-mi", "minference a-shape", "fidelity",
                                 {{"fidelity_top1", 0.875, ""}, {"sparse_prefill_keys_share", 0.1234, "fraction"}})})
    ASSERT_TRUE(db.record_run(r).ok());
  auto report = render_report(db, "");
  ASSERT_TRUE(report.ok()) << report.message();
  const auto rows = table_rows(section(*report, "## fidelity"));
  ASSERT_EQ(rows.size(), 4u) << *report;
  EXPECT_EQ(rows[0], (Cells{"method", "top-1 agree %", "sparse prefill keys %"}));
  EXPECT_EQ(rows[2], (Cells{"dense", "100.0", ""}));
  EXPECT_EQ(rows[3], (Cells{"minference a-shape", "87.5", "12.3"}));
}

TEST(Report, PerplexityTableShowsOnlyColumnsSomeRunHas) {
  ResultsDb db = sweep_db();
  auto report = render_report(db, "kv-sweep");
  ASSERT_TRUE(report.ok()) << report.message();
  const auto rows = table_rows(section(*report, "## perplexity"));
  ASSERT_EQ(rows.size(), 5u) << *report;
  EXPECT_EQ(rows[0], (Cells{"method", "perplexity", "ppl ratio", "RSS MiB"}));
  EXPECT_EQ(rows[2], (Cells{"dense", "10.00", "1.00×", "300.0"}));
  EXPECT_EQ(rows[3], (Cells{"h2o heavy=32", "12.50", "1.25×", "280.0"}));
  EXPECT_EQ(rows[4], (Cells{"streaming sink=4", "11.00", "1.10×", ""}));
}

TEST(Report, HeadingCountersAndFailedRuns) {
  ResultsDb db = sweep_db();
  auto report = render_report(db, "kv-sweep");
  ASSERT_TRUE(report.ok()) << report.message();
  const auto lines = lines_of(*report);
  ASSERT_GE(lines.size(), 5u);
  EXPECT_EQ(lines[0], "# kv-sweep");
  EXPECT_EQ(lines[2], "KV eviction at two budgets");
  EXPECT_EQ(lines[4], "model: smollm2-135m · backend: cpu · device: test cpu · git: abc1234");
  const std::string passkey = section(*report, "## passkey");
  EXPECT_NE(passkey.find("Plugin counters:\n- dense: none reported\n"), std::string::npos) << passkey;
  EXPECT_NE(passkey.find("- h2o heavy=32: engine.tokens_evicted=1234 plugin.heavy_hitters=32\n"), std::string::npos)
      << passkey;
  EXPECT_NE(passkey.find("- streaming sink=4: engine.tokens_evicted=2000\n"), std::string::npos) << passkey;
  EXPECT_NE(section(*report, "## perplexity").find("\nPlugin counters: none reported by any run.\n"), std::string::npos)
      << *report;
  EXPECT_NE(report->find("## Failed runs\n\n- quest pages=8 (perplexity): plugin quest: page size 0\n"),
            std::string::npos) << *report;
  EXPECT_EQ(report->find("older"), std::string::npos);  // the other experiment stays out
}

TEST(Report, UnknownOrEmptyExperimentIsAClearError) {
  ResultsDb db = sweep_db();
  auto missing = render_report(db, "nope");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.message().find("no experiment named 'nope'"), std::string::npos) << missing.message();
  EXPECT_NE(missing.message().find("known experiments: kv-sweep (7 runs), older (1 run)"), std::string::npos)
      << missing.message();

  RunRecord failed = run("f1", "dense", "passkey", {}, true);
  failed.experiment = "broken";
  failed.status = RunStatus::Failed;
  ASSERT_TRUE(db.record_run(failed).ok());
  auto broken = render_report(db, "broken");
  ASSERT_FALSE(broken.ok());
  EXPECT_NE(broken.message().find("experiment 'broken' has no finished runs (1 failed"), std::string::npos)
      << broken.message();

  auto empty_db = ResultsDb::open(test::temp_path("empty-report.db"));
  ASSERT_TRUE(empty_db.ok());
  auto none = render_report(*empty_db, "");
  ASSERT_FALSE(none.ok());
  EXPECT_NE(none.message().find("no experiments recorded"), std::string::npos) << none.message();
}

TEST(Report, WithoutBaselineShowsNoComparisons) {
  auto db = ResultsDb::open(test::temp_path("no-baseline.db"));
  ASSERT_TRUE(db.ok());
  ASSERT_TRUE(db->record_run(run("q1", "quest pages=8", "passkey", {{"accuracy", 0.5, ""}})).ok());
  auto report = render_report(*db, "");
  ASSERT_TRUE(report.ok()) << report.message();
  const auto rows = table_rows(section(*report, "## passkey"));
  ASSERT_EQ(rows.size(), 3u);
  EXPECT_EQ(rows[0], (Cells{"method", "accuracy %"}));
  EXPECT_EQ(rows[2], (Cells{"quest pages=8", "50.0"}));
  EXPECT_NE(report->find("No dense baseline"), std::string::npos);
}


// One task type run with two configurations (two question protocols) gives two
// sections, each with its own baseline, titled by what differs; a method run
// again under a new configuration hash keeps one row, the latest run's.
TEST(Report, TaskConfigurationsGetTheirOwnSectionsAndRerunsKeepOneRow) {
  auto db = ResultsDb::open(test::temp_path("report-protocols.db"));
  ASSERT_TRUE(db.ok());
  auto with_params = [](RunRecord r, const char* question, double finished_at) {
    r.config_json = std::string(R"({"task": {"type": "passkey", "params": {"lengths": [512], "question": [")") +
                    question + R"("]}}})";
    r.finished_at = finished_at;
    return r;
  };
  const std::vector<RunRecord> runs = {
      with_params(run("a", "dense", "passkey", {{"accuracy", 0.9, ""}}, true), "prefill", 1),
      with_params(run("b", "h2o heavy=32", "passkey", {{"accuracy", 0.5, ""}}), "prefill", 2),
      with_params(run("c", "dense", "passkey", {{"accuracy", 0.8, ""}}, true), "decode", 3),
      with_params(run("d", "h2o heavy=32", "passkey", {{"accuracy", 0.4, ""}}), "decode", 4),
      with_params(run("e", "h2o heavy=32", "passkey", {{"accuracy", 0.6, ""}}), "prefill", 5),  // a rerun
  };
  for (const RunRecord& r : runs) ASSERT_TRUE(db->record_run(r).ok());
  auto report = render_report(*db, "");
  ASSERT_TRUE(report.ok()) << report.message();
  const std::string prefill = section(*report, "## passkey (question = prefill)");
  const std::string decode = section(*report, "## passkey (question = decode)");
  const auto p_rows = table_rows(prefill), d_rows = table_rows(decode);
  ASSERT_EQ(p_rows.size(), 4u) << *report;
  ASSERT_EQ(d_rows.size(), 4u) << *report;
  EXPECT_EQ(p_rows[2], (Cells{"dense", "90.0", "+0.0"}));
  EXPECT_EQ(p_rows[3], (Cells{"h2o heavy=32", "60.0", "-30.0"}));  // the rerun's row
  EXPECT_EQ(d_rows[2], (Cells{"dense", "80.0", "+0.0"}));
  EXPECT_EQ(d_rows[3], (Cells{"h2o heavy=32", "40.0", "-40.0"}));
  EXPECT_NE(prefill.find("1 earlier run of the same method and task"), std::string::npos) << prefill;
  EXPECT_EQ(decode.find("earlier run"), std::string::npos);
}

}  // namespace test_report
}  // namespace inferlab
