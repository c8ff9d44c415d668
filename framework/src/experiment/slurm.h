// `inferlab slurm`: an experiment's grid as a Slurm job array. Array task i
// (0-based SLURM_ARRAY_TASK_ID) runs `inferlab run CONFIG --shard (i+1)/N`
// into its own shard database; a second job, dependent on the whole array
// (afterany), merges the shard databases into the final one with `inferlab
// merge`. The scripts are generated from a plan of absolute paths, byte for
// byte the same for the same plan, and every path in them is shell-quoted.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <string_view>
#include <vector>

#include "inferlab/result.h"

namespace inferlab {

// What the command line asked for.
struct SlurmRequest {
  std::filesystem::path inferlab;  // the inferlab executable (made absolute)
  std::filesystem::path config;    // the experiment config (made absolute)
  std::string experiment;          // the config's experiment name
  int64_t grid_runs = -1;          // runs in the config's grid; -1: not checked against shards
  int64_t shards = 0;              // --array N
  std::string partition, time, mem;
  int64_t cpus_per_task = 0;       // 0: not asked
  // The final database: a file, or a folder (one that exists, or a path
  // ending in '/') that then holds <experiment>.db.
  std::string db = "results/inferlab.db";
  std::string out;                 // scripts and logs; empty: results/slurm/<experiment>
};

// Everything the scripts hold, resolved: paths absolute and normal.
struct SlurmPlan {
  std::filesystem::path inferlab, config, db, shard_dir, out;
  std::string experiment;
  std::string job_name;  // the experiment name with characters other than [A-Za-z0-9._-] as '-'
  int64_t shards = 0;
  std::string partition, time, mem;
  int64_t cpus_per_task = 0;
  std::vector<std::filesystem::path> shard_dbs;  // shard_dir/shard-<i>-of-<N>.db, i = 1..N

  std::filesystem::path array_script() const { return out / "array.sbatch"; }
  std::filesystem::path merge_script() const { return out / "merge.sbatch"; }
  std::filesystem::path submit_script() const { return out / "submit.sh"; }
  std::filesystem::path log_dir() const { return out / "logs"; }
};

// Checks the request (N >= 1 and not above the grid's runs, option values
// Slurm accepts, the config and executable present, no control characters in
// paths) and resolves relative paths against `cwd`.
Result<SlurmPlan> plan_slurm_jobs(const SlurmRequest& request, const std::filesystem::path& cwd);

struct SlurmScripts {
  std::string array;   // the job array: one shard per task
  std::string merge;   // merges the shard databases into plan.db
  std::string submit;  // submits both, the merge after the array (afterany)
};

SlurmScripts slurm_scripts(const SlurmPlan& plan);

// Makes out/, out/logs/ and the shard folder and writes the three scripts
// (submit.sh executable).
Status write_slurm_scripts(const SlurmPlan& plan, const SlurmScripts& scripts);

// The sbatch command lines, as submit.sh runs them (`sbatch` is argv[0]).
std::vector<std::string> sbatch_array_argv(const SlurmPlan& plan, const std::string& sbatch);
std::vector<std::string> sbatch_merge_argv(const SlurmPlan& plan, const std::string& sbatch,
                                           const std::string& array_job_id);

// The job id in `sbatch --parsable` output ("123" or "123;cluster", a newline after).
Result<std::string> parse_sbatch_job_id(std::string_view output);

// `sbatch` on PATH (or the path given, when it has a '/'), as an absolute path.
Result<std::filesystem::path> find_sbatch(const std::string& sbatch = "sbatch");

struct SlurmSubmission {
  std::string array_job, merge_job;
};

// Submits the array, then the merge job with --dependency=afterany:<array job>.
Result<SlurmSubmission> submit_slurm_jobs(const SlurmPlan& plan, const std::filesystem::path& sbatch);

// `text` as one bash word: bare when it holds only [A-Za-z0-9_@%+=:,./-],
// else single-quoted ('\'' for a quote).
std::string shell_quote(std::string_view text);

}  // namespace inferlab
