// Results database: schema creation and refusal of foreign or newer files,
// recording runs (replacement of failed runs, no duplicates), ad-hoc queries
// and their output formats, merging shard databases, two processes writing at
// once, and a writer killed mid-way leaving no partial run.
#include <fmt/format.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <functional>
#include <optional>
#include <thread>

#include "results/database.h"
#include "test_support.h"

namespace inferlab {
namespace test_database {

namespace fs = std::filesystem;

// ---- helpers -------------------------------------------------------------------

RunRecord make_run(const std::string& experiment, const std::string& hash, const std::string& label,
                   int n_metrics = 3, int n_samples = 2) {
  RunRecord r;
  r.hash = hash;
  r.experiment = experiment;
  r.experiment_description = fmt::format("{} description", experiment);
  r.config_path = fmt::format("experiments/{}.toml", experiment);
  r.label = label;
  r.plugin = label.substr(0, label.find(' '));
  r.plugin_version = "1.0";
  r.task = "passkey";
  r.config_json = R"({"seed":1})";
  r.model = "tiny";
  r.model_checksum = "abc";
  r.backend = "cpu";
  r.device = "test cpu";
  r.git_revision = "deadbeef";
  r.status = RunStatus::Finished;
  r.started_at = 1000;
  r.finished_at = 1002.5;
  for (int i = 0; i < n_metrics; ++i) r.metrics.push_back({fmt::format("m{}", i), 0.25 * i, "u"});
  for (int i = 0; i < n_samples; ++i)
    r.samples.push_back({i, 100 + i, fmt::format("expected {}", i), "produced", i % 2 == 0, 0.125, "{}"});
  return r;
}

ResultsDb open_db(const fs::path& path) {
  auto db = ResultsDb::open(path);
  EXPECT_TRUE(db.ok()) << (db.ok() ? "" : db.message());
  if (!db) std::abort();  // every later line would dereference it
  return std::move(db).value();
}

void record(ResultsDb& db, const RunRecord& run) {
  auto s = db.record_run(run);
  EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
}

// The single value a query returns ("" for NULL or no row).
std::string scalar(ResultsDb& db, const std::string& sql) {
  auto r = db.query(sql);
  EXPECT_TRUE(r.ok()) << (r.ok() ? "" : r.message());
  if (!r || r->rows.empty() || r->rows[0].empty() || !r->rows[0][0]) return "";
  return *r->rows[0][0];
}

// Writes a file with the raw C API, to build databases this code would refuse to.
void raw_sql(const fs::path& path, const char* sql) {
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(path.c_str(), &db), SQLITE_OK);
  EXPECT_EQ(sqlite3_exec(db, sql, nullptr, nullptr, nullptr), SQLITE_OK) << sqlite3_errmsg(db);
  sqlite3_close(db);
}

std::string read_file(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  return std::string(std::istreambuf_iterator<char>(in), {});
}

// Runs fn in a child process; the child never returns into the test.
pid_t spawn(const std::function<int()>& fn) {
  const pid_t pid = ::fork();
  if (pid == 0) ::_exit(fn());
  return pid;
}

int exit_code(pid_t pid) {
  int status = 0;
  ::waitpid(pid, &status, 0);
  return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
}

// Child body: opens its own connection (never one inherited across fork).
int write_runs(const fs::path& path, const std::string& prefix, int count, int n_metrics, int n_samples) {
  auto db = ResultsDb::open(path);
  if (!db) {
    std::fprintf(stderr, "%s\n", db.message().c_str());
    return 1;
  }
  for (int i = 0; i < count; ++i) {
    auto s = db->record_run(make_run("shared", fmt::format("{}{}", prefix, i), prefix, n_metrics, n_samples));
    if (!s) {
      std::fprintf(stderr, "%s\n", s.message().c_str());
      return 2;
    }
  }
  return 0;
}

// ---- opening -------------------------------------------------------------------

TEST(ResultsDb, CreatesFolderAndFileThenReopens) {
  const fs::path path = test::temp_path("nested") / "deeper" / "results.db";
  {
    ResultsDb db = open_db(path);
    EXPECT_TRUE(fs::exists(path));
    EXPECT_EQ(scalar(db, "PRAGMA user_version"), "2");
    EXPECT_EQ(scalar(db, "PRAGMA journal_mode"), "wal");
    EXPECT_EQ(scalar(db, "PRAGMA foreign_keys"), "1");
    EXPECT_EQ(scalar(db, "PRAGMA busy_timeout"), "60000");
    record(db, make_run("e", "h1", "dense"));
  }
  ResultsDb again = open_db(path);
  EXPECT_EQ(scalar(again, "SELECT count(*) FROM runs"), "1");
  ResultsDb moved = std::move(again);
  EXPECT_EQ(scalar(moved, "SELECT count(*) FROM experiments"), "1");
}

TEST(ResultsDb, UpgradesAVersion1DatabaseKeepingItsRuns) {
  const fs::path path = test::temp_path("v1.db");
  {
    ResultsDb db = open_db(path);
    record(db, make_run("e", "h1", "dense"));
  }
  // What version 1 held: no fine-tuning tables.
  raw_sql(path, "DROP TABLE finetune_steps; DROP TABLE finetunes; PRAGMA user_version = 1");
  ResultsDb db = open_db(path);
  EXPECT_EQ(scalar(db, "PRAGMA user_version"), "2");
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM runs"), "1");
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM finetunes"), "0");
  auto id = db.begin_finetune({"hash", "ft", "{}", "m", "c", "out", "rev"});
  ASSERT_TRUE(id.ok()) << id.message();
  const std::vector<FinetuneStep> steps = {{1, 2.5, 1e-3, 0.7, 100, 0.1, {}}, {2, 2.0, 1e-3, 0.6, 100, 0.1, 1.9}};
  ASSERT_TRUE(db.record_finetune_steps(*id, steps).ok());
  ASSERT_TRUE(db.record_finetune_steps(*id, steps).ok());  // replayed after a resume: replaced, not duplicated
  EXPECT_EQ(scalar(db, "SELECT count(*) || ' ' || count(eval_loss) FROM finetune_steps"), "2 1");
  EXPECT_EQ(*db.begin_finetune({"hash", "ft", "{}", "m", "c", "out", "rev"}), *id);  // the same run, resumed
  ASSERT_TRUE(db.finish_finetune(*id, true, "", "{}").ok());
  EXPECT_EQ(scalar(db, "SELECT status FROM finetunes"), "finished");
}

TEST(ResultsDb, RefusesNewerSchemaVersion) {
  const fs::path path = test::temp_path("newer.db");
  { ResultsDb db = open_db(path); }
  raw_sql(path, "PRAGMA user_version = 3");
  auto db = ResultsDb::open(path);
  ASSERT_FALSE(db.ok());
  EXPECT_EQ(db.message(), path.string() + ": results database schema version 3 is newer than this inferlab "
                                          "supports (2); use a newer inferlab");
}

TEST(ResultsDb, RefusesForeignSqliteFileWithoutChangingIt) {
  const fs::path path = test::temp_path("foreign.db");
  raw_sql(path, "CREATE TABLE notes(text TEXT); INSERT INTO notes VALUES ('mine')");
  const std::string before = read_file(path);
  auto db = ResultsDb::open(path);
  ASSERT_FALSE(db.ok());
  EXPECT_NE(db.message().find(path.string() + ": a SQLite database, but not an inferlab results database"),
            std::string::npos) << db.message();
  EXPECT_EQ(read_file(path), before);  // not switched to WAL, no schema added
}

TEST(ResultsDb, RefusesNonSqliteFile) {
  const fs::path path = test::temp_path("notes.txt");
  std::ofstream(path) << "these are not the tables you are looking for, and they are long enough to have a header\n";
  auto db = ResultsDb::open(path);
  ASSERT_FALSE(db.ok());
  EXPECT_NE(db.message().find(path.string() + ": not a SQLite database"), std::string::npos) << db.message();
}

TEST(ResultsDb, RefusesAFolder) {
  const fs::path path = test::temp_path("folder.db");
  fs::create_directories(path);
  auto db = ResultsDb::open(path);
  ASSERT_FALSE(db.ok());
  EXPECT_NE(db.message().find("is a folder"), std::string::npos) << db.message();
}

// ---- recording -------------------------------------------------------------------

TEST(ResultsDb, RecordsAndReadsBackRunWithMetricsAndSamples) {
  ResultsDb db = open_db(test::temp_path("record.db"));
  RunRecord run = make_run("sweep", "h1", "h2o heavy=32", 3, 4);
  run.baseline = false;
  run.samples[1].correct = std::nullopt;
  run.metrics.push_back({"kv_bytes_peak", 12582912, "bytes"});
  record(db, run);

  auto runs = db.experiment_runs("sweep");
  ASSERT_TRUE(runs.ok()) << runs.message();
  ASSERT_EQ(runs->size(), 1u);
  const StoredRun& got = (*runs)[0];
  EXPECT_EQ(got.hash, "h1");
  EXPECT_EQ(got.label, "h2o heavy=32");
  EXPECT_EQ(got.plugin, "h2o");
  EXPECT_EQ(got.config_json, R"({"seed":1})");
  EXPECT_EQ(got.git_revision, "deadbeef");
  EXPECT_EQ(got.status, RunStatus::Finished);
  EXPECT_DOUBLE_EQ(got.finished_at, 1002.5);
  ASSERT_EQ(got.metrics.size(), 4u);
  EXPECT_DOUBLE_EQ(got.metrics.at("m2").value, 0.5);
  EXPECT_EQ(got.metrics.at("kv_bytes_peak").unit, "bytes");

  EXPECT_EQ(scalar(db, "SELECT seconds FROM runs"), "2.5");
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM samples"), "4");
  EXPECT_EQ(scalar(db, "SELECT correct FROM samples WHERE idx = 0"), "1");
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM samples WHERE idx = 1 AND correct IS NULL"), "1");
  EXPECT_EQ(scalar(db, "SELECT expected FROM samples WHERE idx = 3"), "expected 3");
  EXPECT_EQ(scalar(db, "SELECT value FROM run_metrics WHERE metric = 'kv_bytes_peak'"), "12582912");

  auto experiments = db.experiments();
  ASSERT_TRUE(experiments.ok());
  ASSERT_EQ(experiments->size(), 1u);
  EXPECT_EQ((*experiments)[0].name, "sweep");
  EXPECT_EQ((*experiments)[0].description, "sweep description");
  EXPECT_EQ((*experiments)[0].runs, 1);
}

TEST(ResultsDb, HasFinishedRunOnlyForFinishedRuns) {
  ResultsDb db = open_db(test::temp_path("finished.db"));
  EXPECT_FALSE(*db.has_finished_run("h1"));
  RunRecord failed = make_run("e", "h1", "dense");
  failed.status = RunStatus::Failed;
  failed.error = "out of memory";
  record(db, failed);
  EXPECT_FALSE(*db.has_finished_run("h1"));
  record(db, make_run("e", "h1", "dense"));
  EXPECT_TRUE(*db.has_finished_run("h1"));
  EXPECT_FALSE(*db.has_finished_run("h2"));
}

TEST(ResultsDb, FailedRunIsReplacedByFinishedOne) {
  ResultsDb db = open_db(test::temp_path("replace.db"));
  RunRecord failed = make_run("e", "h1", "dense", 5, 7);
  failed.status = RunStatus::Failed;
  failed.error = "plugin crashed";
  record(db, failed);
  record(db, make_run("e", "h1", "dense", 2, 3));
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM runs"), "1");
  EXPECT_EQ(scalar(db, "SELECT status || '/' || error FROM runs"), "finished/");
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM metrics"), "2");  // the failed run's rows cascaded away
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM samples"), "3");
}

TEST(ResultsDb, FinishedRunIsNotDuplicatedNorOverwritten) {
  ResultsDb db = open_db(test::temp_path("dup.db"));
  record(db, make_run("e", "h1", "dense"));
  RunRecord again = make_run("e", "h1", "dense");
  again.metrics[1].value = 99;
  record(db, again);
  RunRecord failed = again;
  failed.status = RunStatus::Failed;
  record(db, failed);
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM runs"), "1");
  EXPECT_EQ(scalar(db, "SELECT value FROM metrics WHERE name = 'm1'"), "0.25");
  EXPECT_EQ(scalar(db, "SELECT status FROM runs"), "finished");
}

TEST(ResultsDb, StatusNamesRoundTrip) {
  for (RunStatus status : {RunStatus::Finished, RunStatus::Failed})
    EXPECT_EQ(parse_run_status(run_status_name(status)), status);
  EXPECT_EQ(parse_run_status("running"), std::nullopt);
}

TEST(ResultsDb, RejectsDuplicateMetricWithoutWriting) {
  ResultsDb db = open_db(test::temp_path("bad.db"));
  RunRecord run = make_run("e", "h1", "dense");
  run.metrics.push_back(run.metrics[0]);
  auto s = db.record_run(run);
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("recording metric m0 of run dense on passkey (h1)"), std::string::npos) << s.message();
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM runs"), "0");  // rolled back whole
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM experiments"), "0");
}

// ---- queries and formats -----------------------------------------------------------

TEST(ResultsDbQuery, FormatsTableCsvAndJson) {
  ResultsDb db = open_db(test::temp_path("query.db"));
  auto r = db.query(
      "SELECT 'a,b' AS s, NULL AS n, 42 AS i, 0.5 AS r, 'say \"hi\"' AS q, '' AS e, '007' AS z "
      "UNION ALL SELECT 'line\nbreak', 7, -3, 1e-7, 'x', 'y', '1.5'");
  ASSERT_TRUE(r.ok()) << r.message();
  ASSERT_EQ(r->columns, (std::vector<std::string>{"s", "n", "i", "r", "q", "e", "z"}));
  EXPECT_FALSE(r->rows[0][1].has_value());

  EXPECT_EQ(format_table(*r),
            "s           n   i      r  q         e  z\n"
            "----------  -  --  -----  --------  -  ---\n"
            "a,b            42    0.5  say \"hi\"     007\n"
            "line break  7  -3  1e-07  x         y  1.5\n");
  EXPECT_EQ(format_csv(*r),
            "s,n,i,r,q,e,z\n"
            "\"a,b\",,42,0.5,\"say \"\"hi\"\"\",\"\",007\n"
            "\"line\nbreak\",7,-3,1e-07,x,y,1.5\n");
  EXPECT_EQ(format_json(*r),
            "[\n"
            "  {\n    \"s\": \"a,b\",\n    \"n\": null,\n    \"i\": 42,\n    \"r\": 0.5,\n"
            "    \"q\": \"say \\\"hi\\\"\",\n    \"e\": \"\",\n    \"z\": \"007\"\n  },\n"
            "  {\n    \"s\": \"line\\nbreak\",\n    \"n\": 7,\n    \"i\": -3,\n    \"r\": 1e-07,\n"
            "    \"q\": \"x\",\n    \"e\": \"y\",\n    \"z\": 1.5\n  }\n"
            "]\n");
}

TEST(ResultsDbQuery, EmptyResultAndRepeatedColumns) {
  ResultsDb db = open_db(test::temp_path("empty.db"));
  auto r = db.query("SELECT hash, label FROM runs");
  ASSERT_TRUE(r.ok()) << r.message();
  EXPECT_EQ(format_table(*r), "hash  label\n----  -----\n");
  EXPECT_EQ(format_csv(*r), "hash,label\n");
  EXPECT_EQ(format_json(*r), "[]\n");
  auto twice = db.query("SELECT 1 AS x, 2 AS x");
  ASSERT_TRUE(twice.ok());
  EXPECT_EQ(format_json(*twice), "[\n  {\n    \"x\": 1,\n    \"x_2\": 2\n  }\n]\n");
}

TEST(ResultsDbQuery, BadSqlCarriesSqliteMessageAndTheSql) {
  ResultsDb db = open_db(test::temp_path("badsql.db"));
  auto r = db.query("SELECT nope FROM nowhere");
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("no such table: nowhere"), std::string::npos) << r.message();
  EXPECT_NE(r.message().find("SELECT nope FROM nowhere"), std::string::npos) << r.message();
  EXPECT_NE(r.message().find(db.path().string()), std::string::npos) << r.message();

  auto two = db.query("SELECT 1; SELECT 2");
  ASSERT_FALSE(two.ok());
  EXPECT_NE(two.message().find("one SQL statement at a time"), std::string::npos) << two.message();
  EXPECT_TRUE(db.query("SELECT 1; -- trailing comment").ok());
  EXPECT_FALSE(db.query("  ").ok());
}

TEST(ResultsDbQuery, WritesReportTheirChanges) {
  ResultsDb db = open_db(test::temp_path("write.db"));
  record(db, make_run("e", "h1", "dense"));
  record(db, make_run("e", "h2", "quest"));
  EXPECT_EQ(format_table(*db.query("DELETE FROM runs WHERE label = 'quest'")), "changes\n-------\n      1\n");
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM metrics"), "3");  // cascaded
}

TEST(ResultsDbQuery, RealsPrintCompactly) {
  EXPECT_EQ(format_real(3), "3");
  EXPECT_EQ(format_real(-0.0), "0");
  EXPECT_EQ(format_real(0.833333333), "0.833333");
  EXPECT_EQ(format_real(12582912), "12582912");
  EXPECT_EQ(format_real(1718000000.1234567), "1718000000.123");
  EXPECT_EQ(format_real(2.5e-9), "2.5e-09");
  EXPECT_EQ(format_real(1e300), "1e+300");
}

// ---- merging -------------------------------------------------------------------

TEST(ResultsDbMerge, MergesShardsWithoutDuplicates) {
  const fs::path a_path = test::temp_path("shard-a.db"), b_path = test::temp_path("shard-b.db");
  {
    ResultsDb a = open_db(a_path);
    record(a, make_run("sweep", "h1", "dense", 3, 2));
    record(a, make_run("sweep", "h2", "h2o", 3, 2));
  }
  {
    ResultsDb b = open_db(b_path);
    record(b, make_run("other", "h4", "quest", 2, 5));  // B's ids differ from A's for the same experiment
    record(b, make_run("sweep", "h2", "h2o", 3, 2));    // also in A
    record(b, make_run("sweep", "h3", "streaming", 4, 1));
    RunRecord failed = make_run("sweep", "h5", "calm");
    failed.status = RunStatus::Failed;
    record(b, failed);
  }
  ResultsDb merged = open_db(test::temp_path("merged.db"));
  RunRecord failed_here = make_run("sweep", "h3", "streaming");
  failed_here.status = RunStatus::Failed;
  record(merged, failed_here);           // a finished h3 from B replaces it
  record(merged, make_run("mine", "h0", "dense"));

  auto added = merged.merge_from(a_path);
  ASSERT_TRUE(added.ok()) << added.message();
  EXPECT_EQ(*added, 2);
  added = merged.merge_from(b_path);
  ASSERT_TRUE(added.ok()) << added.message();
  EXPECT_EQ(*added, 2);  // h3 and h4; h2 is already there, h5 failed
  added = merged.merge_from(a_path);
  ASSERT_TRUE(added.ok());
  EXPECT_EQ(*added, 0);

  EXPECT_EQ(scalar(merged, "SELECT count(*) FROM runs"), "5");
  EXPECT_EQ(scalar(merged, "SELECT group_concat(hash, ',') FROM (SELECT hash FROM runs ORDER BY hash)"),
            "h0,h1,h2,h3,h4");
  EXPECT_EQ(scalar(merged, "SELECT count(*) FROM runs WHERE status != 'finished'"), "0");
  EXPECT_EQ(scalar(merged, "SELECT count(*) FROM metrics"), "15");  // 3 (h0) + 3 + 3 + 4 + 2
  EXPECT_EQ(scalar(merged, "SELECT count(*) FROM samples"), "12");  // 2 + 2 + 2 + 1 + 5
  EXPECT_EQ(scalar(merged, "SELECT e.name FROM runs r JOIN experiments e ON e.id = r.experiment_id "
                           "WHERE r.hash = 'h4'"), "other");
  EXPECT_EQ(scalar(merged, "SELECT group_concat(name, ',') FROM (SELECT name FROM experiments ORDER BY name)"),
            "mine,other,sweep");
  EXPECT_EQ(scalar(merged, "SELECT count(*) FROM metrics m JOIN runs r ON r.id = m.run_id WHERE r.hash = 'h3'"),
            "4");
  EXPECT_EQ(scalar(merged, "SELECT sum(s.input_tokens) FROM samples s JOIN runs r ON r.id = s.run_id "
                           "WHERE r.hash = 'h4'"), "510");
  EXPECT_EQ(scalar(merged, "PRAGMA foreign_key_check"), "");
  EXPECT_EQ(scalar(merged, "SELECT count(*) FROM pragma_database_list WHERE name = 'merge_src'"), "0");  // detached
}

TEST(ResultsDbMerge, RefusesMissingForeignNewerAndSelf) {
  ResultsDb db = open_db(test::temp_path("into.db"));
  const fs::path missing = test::temp_path("missing.db");
  auto r = db.merge_from(missing);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.message(), missing.string() + ": no such results database");
  EXPECT_FALSE(fs::exists(missing));

  const fs::path text = test::temp_path("text.db");
  std::ofstream(text) << "plain text, not a database at all, but long enough to hold a header of 100 bytes......\n";
  r = db.merge_from(text);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find(text.string() + ": not a SQLite database"), std::string::npos) << r.message();

  const fs::path newer = test::temp_path("newer-shard.db");
  { ResultsDb n = open_db(newer); }
  raw_sql(newer, "PRAGMA user_version = 4");
  r = db.merge_from(newer);
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find(newer.string() + ": results database schema version 4 is newer"), std::string::npos)
      << r.message();

  r = db.merge_from(db.path());
  ASSERT_FALSE(r.ok());
  EXPECT_NE(r.message().find("into itself"), std::string::npos);
  EXPECT_TRUE(db.query("SELECT 1").ok());  // still usable after the refusals
}

// ---- several processes -------------------------------------------------------------

TEST(ResultsDbConcurrency, TwoProcessesWriteAtOnce) {
  const fs::path path = test::temp_path("two-writers.db");  // created by the children, racing
  const pid_t a = spawn([&] { return write_runs(path, "a", 30, 10, 20); });
  const pid_t b = spawn([&] { return write_runs(path, "b", 30, 10, 20); });
  EXPECT_EQ(exit_code(a), 0);
  EXPECT_EQ(exit_code(b), 0);
  ResultsDb db = open_db(path);
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM runs"), "60");
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM metrics"), "600");
  EXPECT_EQ(scalar(db, "SELECT count(*) FROM experiments"), "1");
}

// Waits until the database holds at least `runs` runs (or a minute passes).
void wait_for_runs(const fs::path& path, int runs) {
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  std::optional<ResultsDb> watcher;
  while (std::chrono::steady_clock::now() < deadline) {
    std::this_thread::sleep_for(std::chrono::milliseconds(5));
    if (!watcher) {
      auto opened = ResultsDb::open(path);  // the child may still be creating it
      if (opened) watcher.emplace(std::move(opened).value());
    }
    if (!watcher) continue;
    const std::string count = scalar(*watcher, "SELECT count(*) FROM runs");  // empty while the schema is being made
    if (!count.empty() && std::stoi(count) >= runs) return;
  }
}

TEST(ResultsDbConcurrency, KilledWriterLeavesNoPartialRun) {
  const fs::path path = test::temp_path("killed.db");
  constexpr int kMetrics = 12, kSamples = 40;
  // Three writers in turn, each killed at whatever point of a run it has reached.
  for (int round = 0; round < 3; ++round) {
    const std::string prefix = fmt::format("round{}-", round);
    const pid_t child = spawn([&] { return write_runs(path, prefix, 1'000'000, kMetrics, kSamples); });
    wait_for_runs(path, 25 * (round + 1));
    ASSERT_EQ(::kill(child, SIGKILL), 0);
    EXPECT_EQ(exit_code(child), -1);  // killed, not finished
  }
  ResultsDb db = open_db(path);
  EXPECT_EQ(scalar(db, "PRAGMA integrity_check"), "ok");
  EXPECT_GE(std::stoi(scalar(db, "SELECT count(*) FROM runs")), 75);
  const std::string partial = fmt::format(
      "SELECT count(*) FROM runs r WHERE (SELECT count(*) FROM metrics m WHERE m.run_id = r.id) != {} "
      "OR (SELECT count(*) FROM samples s WHERE s.run_id = r.id) != {}", kMetrics, kSamples);
  EXPECT_EQ(scalar(db, partial), "0");
  record(db, make_run("shared", "after", "dense"));  // and it still takes writes
}

}  // namespace test_database
}  // namespace inferlab
