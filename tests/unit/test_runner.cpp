// The experiment runner end to end on a tiny synthetic model: a grid with the
// dense baseline and a plugin axis over generation, perplexity and fidelity
// tasks; results in SQLite; resume, shards and merge, dry runs, and configs
// refused before anything runs.
#include <gtest/gtest.h>

#include <regex>

#include <cmath>
#include <fstream>

#include "experiment/runner.h"
#include "plugin_test_support.h"
#include "results/database.h"

namespace inferlab {
namespace test_runner {

struct RunnerFixture {
  std::filesystem::path dir, model, corpus, config;
};

const RunnerFixture& fixture() {
  static const RunnerFixture f = [] {
    RunnerFixture r;
    r.dir = test::temp_path("runner");
    std::filesystem::create_directories(r.dir);
    SyntheticModelSpec spec;
    spec.name = "runner";
    r.model = r.dir / "runner.gguf";
    EXPECT_TRUE(write_synthetic_model(spec, r.model).ok());
    r.corpus = r.dir / "corpus.txt";
    std::ofstream out(r.corpus);
    for (int i = 0; i < 400; ++i) out << "The river runs past the old mill and the green hills, day " << i << ".\n";
    return r;
  }();
  return f;
}

std::filesystem::path write_config(const std::string& name, const std::string& extra = "") {
  const auto& f = fixture();
  const auto path = test::temp_path(name + ".toml");
  std::ofstream out(path);
  out << "[experiment]\nname = \"" << name << "\"\nseed = 3\n\n"
      << "[model]\nname = \"" << f.model.string() << "\"\npage_size = 8\n\n"
      << "[[task]]\ntype = \"passkey\"\nlengths = [192, 256]\ndepths = [0.5]\nsamples = 1\n\n"
      << "[[task]]\ntype = \"perplexity\"\npath = \"" << f.corpus.string() << "\"\nlength = 48\nsamples = 2\n\n"
      << "[[task]]\ntype = \"fidelity\"\npath = \"" << f.corpus.string()
      << "\"\nprompt_tokens = 32\nnew_tokens = 6\nsamples = 2\n\n"
      << "[[method]]\nplugin = \"probe\"\nname = \"sparse-ffn\"\nneuron_stride = [1, 2]\n"
      << extra;
  return path;
}

RunnerOptions options(const std::filesystem::path& db, const std::string& shard = "") {
  RunnerOptions o;
  o.db_path = db;
  o.shard = shard;
  o.plugin_path = {INFERLAB_HOST_PLUGIN_DIR, std::string(INFERLAB_TEST_PLUGIN_DIR) + "/inferlab-plugin-probe.so"};
  o.worker_executable = INFERLAB_CLI_PATH;  // runs execute in inferlab worker processes
  o.out = std::tmpfile();
  o.progress = std::tmpfile();
  return o;
}

std::string read_all(std::FILE* f) {
  std::rewind(f);
  std::string s;
  char buf[4096];
  for (size_t n; (n = std::fread(buf, 1, sizeof buf, f)) > 0;) s.append(buf, n);
  return s;
}

std::string scalar(ResultsDb& db, const std::string& sql) {
  auto r = db.query(sql);
  EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.message());
  if (!r.ok() || r->rows.empty() || !r->rows[0][0]) return "";
  return *r->rows[0][0];
}

double metric(ResultsDb& db, const std::string& task, const std::string& label, const std::string& name) {
  const std::string v = scalar(db, "SELECT value FROM run_metrics WHERE task='" + task + "' AND label='" + label +
                                       "' AND metric='" + name + "'");
  return v.empty() ? std::nan("") : std::stod(v);
}

TEST(ExperimentRunner, RunsTheGridAndRecordsMetricsAndSamples) {
  const auto db_path = test::temp_path("grid.db");
  auto o = options(db_path);
  auto summary = run_experiment(write_config("grid"), o);
  ASSERT_TRUE(summary.ok()) << summary.message();
  EXPECT_EQ(summary->runs, 9);  // 3 tasks x (dense + 2 points)
  EXPECT_EQ(summary->finished, 9);
  EXPECT_EQ(summary->failed, 0);
  auto db = ResultsDb::open(db_path);
  ASSERT_TRUE(db.ok());
  EXPECT_EQ(scalar(*db, "SELECT COUNT(*) FROM runs WHERE status='finished'"), "9");
  EXPECT_EQ(scalar(*db, "SELECT COUNT(*) FROM samples s JOIN runs r ON r.id=s.run_id WHERE r.task='passkey'"), "6");
  const double acc = metric(*db, "passkey", "dense", "accuracy");
  EXPECT_GE(acc, 0.0);
  EXPECT_LE(acc, 1.0);
  const double ppl = metric(*db, "perplexity", "dense", "perplexity");
  EXPECT_GT(ppl, 1.0);
  // Each window keeps its summed NLL and scored tokens (the report's bootstrap interval): they add up to the metric.
  const double nll = std::stod(scalar(*db, "SELECT SUM(json_extract(s.detail_json, '$.nll_sum')) FROM samples s "
                                           "JOIN runs r ON r.id = s.run_id WHERE r.task='perplexity' AND r.label='dense'"));
  const double scored = std::stod(scalar(*db, "SELECT SUM(json_extract(s.detail_json, '$.scored')) FROM samples s "
                                              "JOIN runs r ON r.id = s.run_id WHERE r.task='perplexity' AND r.label='dense'"));
  EXPECT_EQ(scored, 2 * 47.0);  // 2 windows of 48 tokens, each scoring all but its first
  EXPECT_NEAR(nll / scored, std::log(ppl), 1e-4);  // values read back as text, with limited digits
  // Keeping every neuron is dense; computing half of them is not.
  EXPECT_NEAR(metric(*db, "perplexity", "sparse-ffn neuron_stride=1", "perplexity"), ppl, 1e-6 * ppl);
  EXPECT_EQ(metric(*db, "fidelity", "sparse-ffn neuron_stride=1", "fidelity_top1"), 1.0);
  EXPECT_NEAR(metric(*db, "fidelity", "sparse-ffn neuron_stride=1", "fidelity_kl"), 0.0, 1e-9);
  EXPECT_GT(metric(*db, "fidelity", "sparse-ffn neuron_stride=2", "fidelity_kl"), 1e-6);
  EXPECT_GT(metric(*db, "fidelity", "sparse-ffn neuron_stride=2", "engine.neurons_skipped"), 0.0);
  EXPECT_GT(metric(*db, "fidelity", "sparse-ffn neuron_stride=2", "plugin.mask_calls"), 0.0);
  for (const char* name : {"ttft_ms", "tpot_mean_ms", "tpot_p50_ms", "tpot_p99_ms", "decode_tokens_per_s",
                           "prefill_tokens_per_s", "kv_bytes_peak", "kv_bytes_final", "peak_rss_bytes"})
    EXPECT_GT(metric(*db, "passkey", "dense", name), 0.0) << name;
  // The revision the binary was built from, recorded at build time.
  EXPECT_EQ(scalar(*db, "SELECT git_revision FROM runs LIMIT 1"), build_revision());
  EXPECT_TRUE(std::regex_match(build_revision(), std::regex("[0-9a-f]{12}(-dirty)?|unknown"))) << build_revision();
  // Plain progress lines when the output is not a terminal.
  const std::string progress = read_all(o.progress);
  EXPECT_NE(progress.find("[run 9/9]"), std::string::npos) << progress;
  EXPECT_EQ(progress.find('\r'), std::string::npos);
}

TEST(ExperimentRunner, ResumesAnInterruptedGrid) {
  const auto db_path = test::temp_path("resume.db");
  const auto config = write_config("resume");
  ASSERT_TRUE(run_experiment(config, options(db_path)).ok());
  auto again = run_experiment(config, options(db_path));
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(again->skipped, 9);
  EXPECT_EQ(again->finished, 0);
  {
    // As if the process died before committing two runs.
    auto db = ResultsDb::open(db_path);
    ASSERT_TRUE(db.ok());
    ASSERT_TRUE(db->query("DELETE FROM runs WHERE id IN (SELECT id FROM runs ORDER BY id DESC LIMIT 2)").ok());
  }
  auto resumed = run_experiment(config, options(db_path));
  ASSERT_TRUE(resumed.ok());
  EXPECT_EQ(resumed->finished, 2);
  EXPECT_EQ(resumed->skipped, 7);
}

TEST(ExperimentRunner, ShardsPartitionTheGridAndMergeBack) {
  const auto config = write_config("shards");
  const auto a = test::temp_path("shard1.db"), b = test::temp_path("shard2.db"), merged = test::temp_path("m.db");
  auto s1 = run_experiment(config, options(a, "1/2"));
  auto s2 = run_experiment(config, options(b, "2/2"));
  ASSERT_TRUE(s1.ok() && s2.ok());
  EXPECT_EQ(s1->runs + s2->runs, 9);
  auto db = ResultsDb::open(merged);
  ASSERT_TRUE(db.ok());
  ASSERT_TRUE(db->merge_from(a).ok());
  ASSERT_TRUE(db->merge_from(b).ok());
  auto again = db->merge_from(b);
  ASSERT_TRUE(again.ok());
  EXPECT_EQ(*again, 0);
  EXPECT_EQ(scalar(*db, "SELECT COUNT(DISTINCT hash) FROM runs"), "9");
  // The merged database is complete: running the whole grid against it skips everything.
  auto full = run_experiment(config, options(merged));
  ASSERT_TRUE(full.ok());
  EXPECT_EQ(full->skipped, 9);
  EXPECT_FALSE(run_experiment(config, options(a, "3/2")).ok());
}

TEST(ExperimentRunner, PrefillReuseGivesIdenticalResults) {
  // A method whose prefill is dense (decode-only page selection) starts from the
  // saved dense prefill; everything it produces must equal a full recomputation.
  const std::string method =
      "\n[[method]]\nplugin = \"probe\"\nname = \"pages\"\ndense_prefill = true\nselect_pages = \"0,2,5\"\n";
  const auto config = write_config("reuse", method);
  const auto with = test::temp_path("reuse-on.db"), without = test::temp_path("reuse-off.db");
  auto on = options(with), off = options(without);
  off.reuse_prefill = false;
  ASSERT_TRUE(run_experiment(config, on).ok());
  ASSERT_TRUE(run_experiment(config, off).ok());
  auto a = ResultsDb::open(with), b = ResultsDb::open(without);
  ASSERT_TRUE(a.ok() && b.ok());
  const std::string samples =
      "SELECT r.task, s.idx, s.produced, s.correct FROM samples s JOIN runs r ON r.id = s.run_id "
      "WHERE r.label = 'pages' ORDER BY r.task, s.idx";
  auto sa = a->query(samples), sb = b->query(samples);
  ASSERT_TRUE(sa.ok() && sb.ok());
  EXPECT_EQ(sa->rows.size(), 6u);  // 2 samples each of passkey, fidelity and perplexity (never reused)
  EXPECT_EQ(sa->rows, sb->rows);
  for (const char* m : {"accuracy", "fidelity_top1", "fidelity_kl", "engine.decode_keys_read", "engine.decode_pages_read"})
    for (const char* task : {"passkey", "fidelity"}) {
      const double x = metric(*a, task, "pages", m), y = metric(*b, task, "pages", m);
      if (std::isnan(x) && std::isnan(y)) continue;
      EXPECT_DOUBLE_EQ(x, y) << task << " " << m;
    }
  // The reuse really happened: fewer forward calls (the prefill was not recomputed).
  EXPECT_LT(metric(*a, "passkey", "pages", "engine.forward_calls"), metric(*b, "passkey", "pages", "engine.forward_calls"));
}

TEST(ExperimentRunner, CalibratesOnceAheadOrBeforeItsRun) {
  // A calibrating method: `inferlab calibrate` runs its calibration once and
  // then finds it; `inferlab run` loads the artifact and counts none of the
  // calibration's forward calls in the run's metrics.
  const std::string method = "\n[[method]]\nplugin = \"probe\"\nname = \"calibrated\"\ncalibrate_samples = 2\n"
                             "calibrate_tokens = 24\ncalibrate_corpus = \"" + fixture().corpus.string() + "\"\n";
  const auto config = write_config("calibrate", method);
  auto o = options(test::temp_path("calibrate.db"));
  o.artifact_root = test::temp_path("calibrate-artifacts");
  auto first = calibrate_experiment(config, o);
  ASSERT_TRUE(first.ok()) << first.message();
  EXPECT_EQ(first->calibrated, 1);  // one method point calibrates, over three tasks
  EXPECT_EQ(first->found, 0);
  const std::string printed = read_all(o.out);
  EXPECT_NE(printed.find("calibrated: calibrated on 2 samples of 24 tokens"), std::string::npos) << printed;
  auto second = calibrate_experiment(config, o);
  ASSERT_TRUE(second.ok());
  EXPECT_EQ(second->calibrated, 0);
  EXPECT_EQ(second->found, 1);

  auto summary = run_experiment(config, o);
  ASSERT_TRUE(summary.ok()) << summary.message();
  EXPECT_EQ(summary->failed, 0);
  auto db = ResultsDb::open(o.db_path);
  ASSERT_TRUE(db.ok());
  for (const char* task : {"passkey", "fidelity"}) {
    EXPECT_EQ(metric(*db, task, "calibrated", "plugin.calibration_read_samples"), 2.0) << task;
    EXPECT_TRUE(std::isnan(metric(*db, task, "calibrated", "plugin.calibration_layers"))) << "calibrated again";
    EXPECT_EQ(metric(*db, task, "calibrated", "engine.forward_calls"),
              metric(*db, task, "sparse-ffn neuron_stride=1", "engine.forward_calls"))
        << task;
  }
}

TEST(ExperimentRunner, PromptLogitsAreComputedOnlyWhereTheyAreUsed) {
  // Generation needs the prompt's last row (its first token) and one row per
  // decode step; perplexity every row of its window. TTFT then times no output
  // projection of rows nobody reads.
  const auto config = write_config("logits-rows");
  auto o = options(test::temp_path("logits-rows.db"));
  ASSERT_TRUE(run_experiment(config, o).ok());
  auto db = ResultsDb::open(o.db_path);
  ASSERT_TRUE(db.ok());
  for (const char* label : {"dense", "sparse-ffn neuron_stride=1"}) {
    const double decode_steps = metric(*db, "passkey", label, "engine.decode_steps");
    EXPECT_EQ(metric(*db, "passkey", label, "engine.logits_rows"), 2 + decode_steps) << label;  // 2 samples
    EXPECT_EQ(metric(*db, "perplexity", label, "engine.logits_rows"), 2 * 48) << label;          // 2 windows of 48
  }
}

TEST(ExperimentRunner, DryRunListsRunsAndWritesNothing) {
  const auto db_path = test::temp_path("dry.db");
  auto o = options(db_path);
  o.dry_run = true;
  auto summary = run_experiment(write_config("dry"), o);
  ASSERT_TRUE(summary.ok()) << summary.message();
  EXPECT_EQ(summary->runs, 9);
  EXPECT_FALSE(std::filesystem::exists(db_path));
  const std::string plan = read_all(o.out);
  EXPECT_NE(plan.find("sparse-ffn neuron_stride=2"), std::string::npos) << plan;
  EXPECT_NE(plan.find("pending"), std::string::npos);
}

TEST(ExperimentRunner, InvalidConfigRunsNothing) {
  const auto db_path = test::temp_path("invalid.db");
  const auto config = write_config("invalid", "bogus_key = 1\n\n[[method]]\nplugin = \"no-such-plugin\"\n");
  auto summary = run_experiment(config, options(db_path));
  ASSERT_FALSE(summary.ok());
  EXPECT_NE(summary.message().find(config.string() + ":"), std::string::npos) << summary.message();
  EXPECT_NE(summary.message().find("bogus_key"), std::string::npos) << summary.message();
  EXPECT_NE(summary.message().find("no-such-plugin"), std::string::npos) << summary.message();
  EXPECT_FALSE(std::filesystem::exists(db_path));
}

}  // namespace test_runner
}  // namespace inferlab
