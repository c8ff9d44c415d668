// `inferlab run`: validates an experiment config, expands its grid, skips runs
// already finished in the results database, and executes the rest in worker
// processes (experiment/worker.h), writing each run in one transaction. A run
// whose worker dies (a signal, an exit, the experiment's timeout or memory
// limit) is recorded failed with the reason; the next run gets a new worker.
#pragma once

#include <cstdio>
#include <filesystem>
#include <optional>
#include <string>
#include <vector>

#include "experiment/certify.h"
#include "inferlab/result.h"

namespace inferlab {

struct RunnerOptions {
  std::filesystem::path db_path = "results/inferlab.db";
  std::string shard;  // "i/N", empty: the whole grid
  bool dry_run = false;
  std::string backend;  // overrides experiment.backend when not empty ("cpu", "cuda", "auto")
  // Start the samples of methods whose prefill is dense from a saved dense
  // prefill (results are identical; a grid then costs little more than its decode steps).
  bool reuse_prefill = true;
  std::vector<std::filesystem::path> plugin_path;  // empty: PluginRegistry::default_search_path()
  std::filesystem::path artifact_root;  // methods' artifacts and calibrations; empty: $INFERLAB_ARTIFACT_DIR or ~/.cache/inferlab/artifacts
  // The inferlab executable the workers run (`inferlab run` names itself);
  // needed unless dry_run.
  std::filesystem::path worker_executable;
  std::FILE* out = stdout;   // the plan and the summary
  std::FILE* progress = stderr;
};

struct RunnerSummary {
  std::string experiment;
  int64_t runs = 0;      // in this shard of the grid
  int64_t skipped = 0;   // already finished in the database
  int64_t finished = 0;
  int64_t failed = 0;
};

Result<RunnerSummary> run_experiment(const std::filesystem::path& config_file, const RunnerOptions& options);

class Channel;

// `inferlab run --worker`: executes the runs its parent sends over `channel`
// until the parent closes it (experiment/worker.h). An error that stops it
// goes to the parent as well, which reports it.
Status serve_runs(const std::filesystem::path& config_file, const RunnerOptions& options, Channel& channel,
                  int64_t memory_limit_mb);

// `inferlab calibrate`: runs, for every point of the grid whose method
// calibrates (kHookCalibrate), the calibration its artifacts need when they
// are not there yet (experiment/calibration.h). `inferlab run` does the same
// before each such run; this does it ahead, on its own. With an [ltt] table
// it then runs the grid into options.db_path and certifies a threshold
// (experiment/certify.h).
struct CalibrationSummary {
  int64_t calibrated = 0;  // run now
  int64_t found = 0;       // already there
  std::optional<LttOutcome> ltt;  // with an [ltt] table: the grid was run and a value certified
};
Result<CalibrationSummary> calibrate_experiment(const std::filesystem::path& config_file, const RunnerOptions& options);

// The git revision of the source tree this binary was built from, read when
// it was built (cmake/WriteRevision.cmake), with "-dirty" when tracked files
// had uncommitted changes ("unknown" outside a checkout).
std::string build_revision();
std::string source_revision();

}  // namespace inferlab
