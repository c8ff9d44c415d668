// `inferlab slurm CONFIG --array N`: writes (and with --submit, submits) a
// Slurm job array running the config's grid in N shards, and the job that
// merges their databases afterwards (experiment/slurm.h).
#include <fmt/format.h>

#include <cstdio>
#include <filesystem>
#include <string>

#include "cli/commands.h"
#include "experiment/runner.h"
#include "experiment/slurm.h"

namespace inferlab::cli {

namespace {

struct SlurmArgs {
  std::string config;
  int64_t array = 0;
  std::string partition, time, mem, db = "results/inferlab.db", out;
  int64_t cpus_per_task = 0;
  bool submit = false;
};

int fail(const std::string& message) {
  std::fprintf(stderr, "inferlab: %s\n", message.c_str());
  return 1;
}

int run_slurm(const SlurmArgs& args) {
  std::error_code ec;
  const std::filesystem::path cwd = std::filesystem::current_path(ec);
  if (ec) return fail(fmt::format("cannot read the working folder: {}", ec.message()));
  if (args.array < 1) return fail(fmt::format("--array {}: the number of shards must be at least 1", args.array));
  if (!std::filesystem::is_regular_file(args.config, ec)) return fail(fmt::format("{}: no such config file", args.config));
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  if (ec) return fail("cannot find the inferlab executable (/proc/self/exe) that the jobs are to run");

  // The config is checked as `inferlab run --dry-run` checks it (schemas,
  // plugins, model, grid), before anything is written.
  std::FILE* plan_out = std::tmpfile();
  if (plan_out == nullptr) return fail("cannot make a temporary file");
  RunnerOptions dry;
  dry.dry_run = true;
  dry.db_path.clear();  // no database: every run shows as pending
  dry.out = plan_out;
  auto grid = run_experiment(args.config, dry);
  std::fclose(plan_out);
  if (!grid) return fail(grid.message());

  SlurmRequest request;
  request.inferlab = exe;
  request.config = args.config;
  request.experiment = grid->experiment;
  request.grid_runs = grid->runs;
  request.shards = args.array;
  request.partition = args.partition;
  request.time = args.time;
  request.mem = args.mem;
  request.cpus_per_task = args.cpus_per_task;
  request.db = args.db;
  request.out = args.out;
  auto plan = plan_slurm_jobs(request, cwd);
  if (!plan) return fail(plan.message());
  std::filesystem::path sbatch;
  if (args.submit) {
    auto found = find_sbatch();
    if (!found) return fail(found.message());
    sbatch = *found;
  }
  if (auto s = write_slurm_scripts(*plan, slurm_scripts(*plan)); !s) return fail(s.message());
  fmt::print("experiment {}: {} run{} in {} shard{}; final database {}\n", plan->experiment, grid->runs,
             grid->runs == 1 ? "" : "s", plan->shards, plan->shards == 1 ? "" : "s", plan->db.string());
  fmt::print("  {}\n  {}\n  {}\n", plan->array_script().string(), plan->merge_script().string(),
             plan->submit_script().string());
  if (!args.submit) {
    fmt::print("submit with: bash {}\n", shell_quote(plan->submit_script().string()));
    return 0;
  }
  auto submitted = submit_slurm_jobs(*plan, sbatch);
  if (!submitted) return fail(submitted.message());
  fmt::print("submitted array job {} ({} task{}), merge job {} (afterany:{}); logs in {}\n", submitted->array_job,
             plan->shards, plan->shards == 1 ? "" : "s", submitted->merge_job, submitted->array_job,
             plan->log_dir().string());
  return 0;
}

}  // namespace

void register_slurm_command(CLI::App& app) {
  static SlurmArgs args;
  auto* s = app.add_subcommand("slurm",
                               "write (and with --submit, submit) a Slurm job array running a config's grid in N "
                               "shards, and a job that merges their databases");
  s->add_option("config", args.config, "experiment .toml file")->required();
  s->add_option("--array", args.array, "number of shards (array tasks), at least 1")->required();
  s->add_option("--partition", args.partition, "Slurm partition");
  s->add_option("--time", args.time, "time limit of each task (HH:MM:SS)");
  s->add_option("--cpus-per-task", args.cpus_per_task, "CPUs of each task (OMP_NUM_THREADS in the task)");
  s->add_option("--mem", args.mem, "memory of each task (Slurm's --mem, e.g. 16G)");
  s->add_option("--db", args.db, "final database file, or a folder for <experiment>.db; the shard databases go "
                                 "beside it in <name>.shards/")
      ->capture_default_str();
  s->add_option("--out", args.out, "folder for the scripts and logs (default: results/slurm/<experiment>)");
  s->add_flag("--submit", args.submit, "submit with sbatch (the array, then the merge job)");
  s->callback([] { set_exit_code(run_slurm(args)); });
}

}  // namespace inferlab::cli
