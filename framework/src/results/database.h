// The results database: one SQLite file (WAL mode) holding every run of every
// experiment, its metrics and its per-sample rows. Each run is written in one
// transaction, so a killed process loses at most the run in flight, and several
// processes (cluster shards, two terminals) may write to the same file at once.
#pragma once

#include <chrono>
#include <cstdint>
#include <filesystem>
#include <map>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <string_view>
#include <vector>

#include "inferlab/result.h"

struct sqlite3;

namespace inferlab {

struct MetricValue {
  std::string name;
  double value = 0;
  std::string unit;
};

struct SampleRow {
  int64_t index = 0;
  int64_t input_tokens = 0;
  std::string expected, produced;
  std::optional<bool> correct;  // nullopt: the task has no right answer (perplexity, fidelity)
  double latency_seconds = 0;
  std::string detail_json;
};

// How a run ended; stored as "finished" or "failed" (a failed run is pending:
// the next `inferlab run` does it again).
enum class RunStatus { Finished, Failed };
const char* run_status_name(RunStatus status);
std::optional<RunStatus> parse_run_status(std::string_view name);

// Everything the runner knows about one run of the grid.
struct RunRecord {
  std::string hash, experiment, experiment_description, config_path, label, plugin, plugin_version, task, config_json,
      model, model_checksum, backend, device, git_revision, error;
  RunStatus status = RunStatus::Failed;
  bool baseline = false;
  double started_at = 0, finished_at = 0;  // unix seconds
  std::vector<MetricValue> metrics;
  std::vector<SampleRow> samples;
};

// The answer to an ad-hoc SQL statement, every value as text (NULL: nullopt).
struct QueryResult {
  std::vector<std::string> columns;
  std::vector<std::vector<std::optional<std::string>>> rows;
};

struct ExperimentInfo {
  std::string name, description, config_path;
  double created_at = 0;  // unix seconds
  int64_t runs = 0;       // finished and failed
};

// A run as read back for reports, with its metrics and (from experiment_runs) its samples.
// What the report needs of a stored sample: whether it was solved, and the
// task's per-sample detail (JSON).
struct StoredSample {
  int64_t index = 0;
  int64_t input_tokens = 0;
  std::optional<bool> correct;
  std::string detail_json;
};

struct StoredRun {
  int64_t id = 0;
  std::string hash, label, plugin, plugin_version, task, config_json, model, model_checksum, backend, device,
      git_revision, error;
  RunStatus status = RunStatus::Failed;
  bool baseline = false;
  double started_at = 0, finished_at = 0;
  std::map<std::string, MetricValue> metrics;  // by name
  std::vector<StoredSample> samples;           // by index (experiment_runs only)
};

// A fine-tuning run (`inferlab finetune`), keyed by its config hash.
struct FinetuneRecord {
  std::string hash, name, config_json, model, model_checksum, output, git_revision;
};
// One optimizer step of a training curve.
struct FinetuneStep {
  int64_t step = 0;        // from 1
  double loss = 0;         // mean token cross-entropy of the step's batches
  double lr = 0;
  double grad_norm = 0;    // before clipping
  int64_t tokens = 0;      // tokens with a target in the step
  double seconds = 0;      // wall time of the step
  std::optional<double> eval_loss;  // held-out mean loss, when evaluated after this step
};

class ResultsDb {
 public:
  // The schema version this build writes and reads (PRAGMA user_version).
  static constexpr int kSchemaVersion = 2;

  // Opens the database, creating it (and its folder) when missing; refuses files
  // that are not inferlab results databases or come from a newer inferlab.
  // A connection must not be carried across fork(): open one in the child.
  static Result<ResultsDb> open(const std::filesystem::path& path);

  ResultsDb(ResultsDb&&) noexcept = default;
  ResultsDb& operator=(ResultsDb&&) noexcept = default;
  ResultsDb(const ResultsDb&) = delete;
  ResultsDb& operator=(const ResultsDb&) = delete;
  ~ResultsDb() = default;

  const std::filesystem::path& path() const { return path_; }

  Result<bool> has_finished_run(const std::string& hash);

  // Before a grid's work: that runs can be recorded here. Takes the write lock
  // once (waiting at most `wait` for another writer) and checks that the disk
  // holding the file has at least `min_free_bytes` free. Errors name the file
  // and the cause: locked by another program, read-only, disk (nearly) full.
  Status check_writable(std::chrono::milliseconds wait, std::uintmax_t min_free_bytes);

  // Writes the run, its metrics and samples in one transaction. A finished run
  // with the same hash is kept as it is; an unfinished one is replaced.
  Status record_run(const RunRecord& run);

  // Runs one SQL statement of any kind. A statement that changes rows and
  // returns none answers with one column, "changes".
  Result<QueryResult> query(const std::string& sql);

  // Copies the finished runs of another results database that this one lacks
  // (by hash), with their experiments, metrics and samples, in one transaction.
  // Returns the number of runs added.
  Result<int64_t> merge_from(const std::filesystem::path& other);

  // Fine-tuning: begin (or, for a hash already there, resume) a run and get
  // its id; record steps (a step already recorded is replaced); finish it.
  Result<int64_t> begin_finetune(const FinetuneRecord& run);
  Status record_finetune_steps(int64_t id, std::span<const FinetuneStep> steps);
  Status finish_finetune(int64_t id, bool finished, const std::string& error, const std::string& summary_json);

  // Most recently created first.
  Result<std::vector<ExperimentInfo>> experiments();
  // Every run of the experiment (finished and failed), in grid order (by id), with its metrics.
  Result<std::vector<StoredRun>> experiment_runs(const std::string& experiment);

 private:
  struct Closer {
    void operator()(sqlite3* db) const;
  };
  ResultsDb(std::filesystem::path path, sqlite3* db) : path_(std::move(path)), db_(db) {}
  Status configure();
  Status migrate();
  Error error(const std::string& what) const;  // "<path>: <what>: <SQLite's message>"

  std::filesystem::path path_;
  std::unique_ptr<sqlite3, Closer> db_;
};

// Query output for `inferlab query`.
std::string format_table(const QueryResult& result);  // aligned columns under a header rule; NULL is empty
std::string format_csv(const QueryResult& result);    // RFC 4180 quoting; NULL is an empty field, "" an empty string
std::string format_json(const QueryResult& result);   // array of objects; values that read as JSON numbers stay numbers

// A real number as short text: integral values without a fraction, others with
// six significant digits (more for large values, so timestamps stay exact to 1 ms).
std::string format_real(double value);

// Terminal columns taken by UTF-8 text (one per code point: no wide characters in our output).
size_t display_width(std::string_view text);

}  // namespace inferlab
