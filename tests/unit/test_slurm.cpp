// `inferlab slurm` (experiment/slurm.h): the job array, merge and submit
// scripts byte for byte, shell quoting of odd paths (checked by running the
// scripts through bash against stand-ins for inferlab and sbatch), the plan's
// checks, and the command's errors. The real cluster: tests/scripts/slurm_e2e.sh.
#include <gtest/gtest.h>
#include <sys/stat.h>
#include <sys/wait.h>

#include <array>
#include <cstdio>
#include <fstream>
#include <sstream>

#include "experiment/slurm.h"
#include "test_support.h"

namespace inferlab {
namespace test_slurm {

namespace fs = std::filesystem;

SlurmPlan small_plan() {
  SlurmPlan p;
  p.inferlab = "/opt/inferlab/bin/inferlab";
  p.config = "/data/exp/grid.toml";
  p.experiment = "grid";
  p.job_name = "grid";
  p.db = "/data/results/grid.db";
  p.shard_dir = "/data/results/grid.shards";
  p.out = "/data/slurm/grid";
  p.shards = 2;
  p.partition = "cpu";
  p.time = "01:00:00";
  p.cpus_per_task = 4;
  p.mem = "8G";
  p.shard_dbs = {"/data/results/grid.shards/shard-1-of-2.db", "/data/results/grid.shards/shard-2-of-2.db"};
  return p;
}

const char* kArray = R"SH(#!/bin/bash
# Written by `inferlab slurm`: experiment grid, a job array of 2 tasks. Task i (0-based
# SLURM_ARRAY_TASK_ID) runs shard i+1 of 2 of the grid into its own database; merge.sbatch
# merges them. Submit both with submit.sh.
#SBATCH --job-name=inferlab-grid
#SBATCH --array=0-1
#SBATCH --partition=cpu
#SBATCH --time=01:00:00
#SBATCH --cpus-per-task=4
#SBATCH --mem=8G
set -euo pipefail
inferlab=/opt/inferlab/bin/inferlab
config=/data/exp/grid.toml
shard_dir=/data/results/grid.shards
shards=2
task="${SLURM_ARRAY_TASK_ID:?run this script as a task of a Slurm job array (see submit.sh)}"
if ! [[ "$task" =~ ^[0-9]+$ ]] || ((task >= shards)); then
    echo "inferlab slurm: array task '$task' is outside 0-$((shards - 1))" >&2
    exit 2
fi
shard=$((task + 1))
# The CPUs Slurm gave the task, unless OMP_NUM_THREADS says otherwise ([model] threads = 0: all).
if [[ -n "${SLURM_CPUS_PER_TASK:-}" && -z "${OMP_NUM_THREADS:-}" ]]; then
    export OMP_NUM_THREADS="$SLURM_CPUS_PER_TASK"
fi
mkdir -p "$shard_dir"
exec "$inferlab" run "$config" --shard "$shard/$shards" --db "$shard_dir/shard-$shard-of-$shards.db"
)SH";

const char* kMerge = R"SH(#!/bin/bash
# Written by `inferlab slurm`: merges the 2 shard databases of experiment grid into the final
# database once every array task has ended (afterany: also when some failed; their finished runs
# are merged, and submitting again runs only the runs still missing).
#SBATCH --job-name=inferlab-merge-grid
#SBATCH --partition=cpu
#SBATCH --time=01:00:00
set -uo pipefail
inferlab=/opt/inferlab/bin/inferlab
db=/data/results/grid.db
shards=(
    /data/results/grid.shards/shard-1-of-2.db
    /data/results/grid.shards/shard-2-of-2.db
)
present=()
for shard_db in "${shards[@]}"; do
    if [[ -f "$shard_db" ]]; then
        present+=("$shard_db")
    else
        echo "inferlab slurm: $shard_db: missing (its array task ended before it opened it)" >&2
    fi
done
status=0
if ((${#present[@]} > 0)); then
    "$inferlab" merge "$db" "${present[@]}" || status=$?
fi
if ((${#present[@]} < ${#shards[@]})); then
    echo "inferlab slurm: merged ${#present[@]} of ${#shards[@]} shard databases into $db" >&2
    ((status != 0)) || status=1
fi
exit "$status"
)SH";

const char* kSubmit = R"SH(#!/bin/bash
# Written by `inferlab slurm`: submits the shard array of experiment grid, then the merge job,
# which starts when every array task has ended.
set -euo pipefail
array_job=$(sbatch --parsable --output=/data/slurm/grid/logs/array-%A-task-%a.log /data/slurm/grid/array.sbatch)
array_job="${array_job%%;*}"
merge_job=$(sbatch --parsable --dependency=afterany:"$array_job" --output=/data/slurm/grid/logs/merge-%j.log /data/slurm/grid/merge.sbatch)
merge_job="${merge_job%%;*}"
printf 'array job %s (2 tasks), merge job %s into %s\n' "$array_job" "$merge_job" /data/results/grid.db
)SH";

TEST(Slurm, ScriptsOfASmallPlanByteForByte) {
  const SlurmScripts s = slurm_scripts(small_plan());
  EXPECT_EQ(s.array, kArray);
  EXPECT_EQ(s.merge, kMerge);
  EXPECT_EQ(s.submit, kSubmit);
  // Deterministic: the same plan, the same bytes.
  const SlurmScripts again = slurm_scripts(small_plan());
  EXPECT_EQ(again.array, s.array);
  EXPECT_EQ(again.merge, s.merge);
  EXPECT_EQ(again.submit, s.submit);
}

TEST(Slurm, ResourceLinesOnlyWhenAsked) {
  SlurmPlan p = small_plan();
  p.partition = p.time = p.mem = "";
  p.cpus_per_task = 0;
  const SlurmScripts s = slurm_scripts(p);
  EXPECT_EQ(s.array.find("#SBATCH --partition"), std::string::npos);
  EXPECT_EQ(s.array.find("#SBATCH --time"), std::string::npos);
  EXPECT_EQ(s.array.find("#SBATCH --cpus-per-task"), std::string::npos);
  EXPECT_EQ(s.array.find("#SBATCH --mem"), std::string::npos);
  EXPECT_NE(s.array.find("#SBATCH --array=0-1\nset -euo pipefail\n"), std::string::npos) << s.array;
  EXPECT_NE(s.merge.find("#SBATCH --job-name=inferlab-merge-grid\nset -uo pipefail\n"), std::string::npos) << s.merge;
}

TEST(Slurm, ShellQuote) {
  EXPECT_EQ(shell_quote("/plain/path-1_x.db"), "/plain/path-1_x.db");
  EXPECT_EQ(shell_quote("--output=/a/%A.log"), "--output=/a/%A.log");
  EXPECT_EQ(shell_quote(""), "''");
  EXPECT_EQ(shell_quote("a b"), "'a b'");
  EXPECT_EQ(shell_quote("it's"), "'it'\\''s'");
  EXPECT_EQ(shell_quote("$HOME"), "'$HOME'");
  EXPECT_EQ(shell_quote("a;b`c`\"d\""), "'a;b`c`\"d\"'");
}

TEST(Slurm, ParseSbatchJobId) {
  EXPECT_EQ(*parse_sbatch_job_id("1234\n"), "1234");
  EXPECT_EQ(*parse_sbatch_job_id("77;cluster-a\n"), "77");
  EXPECT_EQ(*parse_sbatch_job_id("9"), "9");
  for (const char* bad : {"", "\n", "Submitted batch job 12\n", "12 34\n", "abc;x", "12\n13\n", ";cluster"}) {
    auto r = parse_sbatch_job_id(bad);
    ASSERT_FALSE(r.ok()) << bad;
    EXPECT_NE(r.message().find("not a job id"), std::string::npos) << r.message();
  }
}

// ---- plans: paths resolved, bad input refused --------------------------------

struct Files {
  fs::path dir, config, exe;
};

// A folder with a space and a quote in its name, a config and an executable in it.
Files odd_files(const std::string& name) {
  Files f;
  f.dir = test::temp_path(name + " it's $dir");
  fs::create_directories(f.dir);
  f.config = f.dir / "my grid.toml";
  std::ofstream(f.config) << "# not read by the plan\n";
  f.exe = f.dir / "fake inferlab";
  std::ofstream(f.exe) << "#!/bin/bash\nfor a in \"$@\"; do printf '%s\\n' \"$a\"; done\n";
  fs::permissions(f.exe, fs::perms::owner_all);
  return f;
}

SlurmRequest request_for(const Files& f) {
  SlurmRequest r;
  r.inferlab = f.exe;
  r.config = f.config;
  r.experiment = "my exp/1";
  r.grid_runs = 5;
  r.shards = 3;
  r.db = (f.dir / "final db.db").string();
  r.out = (f.dir / "jobs 100%").string();
  return r;
}

TEST(Slurm, PlanResolvesPaths) {
  const Files f = odd_files("plan");
  SlurmRequest r = request_for(f);
  auto plan = plan_slurm_jobs(r, "/ignored");
  ASSERT_TRUE(plan.ok()) << plan.message();
  EXPECT_EQ(plan->job_name, "my-exp-1");
  EXPECT_EQ(plan->db, f.dir / "final db.db");
  EXPECT_EQ(plan->shard_dir, f.dir / "final db.shards");
  ASSERT_EQ(plan->shard_dbs.size(), 3u);
  EXPECT_EQ(plan->shard_dbs[2], f.dir / "final db.shards" / "shard-3-of-3.db");
  // '%' in a folder is doubled in Slurm's filename patterns.
  EXPECT_EQ(sbatch_array_argv(*plan, "sbatch")[2], "--output=" + (f.dir / "jobs 100%%").string() + "/logs/array-%A-task-%a.log");

  // Relative paths resolve against the working folder; a folder --db holds <experiment>.db.
  r.config = fs::relative(f.config, f.dir.parent_path());
  r.db = "results/";
  r.out = "";
  plan = plan_slurm_jobs(r, f.dir.parent_path());
  ASSERT_TRUE(plan.ok()) << plan.message();
  EXPECT_EQ(plan->config, f.config);
  EXPECT_EQ(plan->db, f.dir.parent_path() / "results" / "my-exp-1.db");
  EXPECT_EQ(plan->out, f.dir.parent_path() / "results" / "slurm" / "my-exp-1");
  fs::create_directories(f.dir / "existing");
  r.config = f.config;
  r.db = (f.dir / "existing").string();  // an existing folder, no trailing '/'
  plan = plan_slurm_jobs(r, "/");
  ASSERT_TRUE(plan.ok()) << plan.message();
  EXPECT_EQ(plan->db, f.dir / "existing" / "my-exp-1.db");
}

TEST(Slurm, PlanRefusesBadInput) {
  const Files f = odd_files("bad");
  const auto refused = [&](SlurmRequest r, const std::string& expected) {
    auto plan = plan_slurm_jobs(r, "/");
    ASSERT_FALSE(plan.ok()) << expected;
    EXPECT_NE(plan.message().find(expected), std::string::npos) << plan.message();
  };
  SlurmRequest r = request_for(f);
  r.shards = 0;
  refused(r, "--array 0: the number of shards must be at least 1");
  r.shards = -2;
  refused(r, "--array -2");
  r.shards = 6;
  refused(r, "only 5 runs, so at most 5 shards");
  r = request_for(f);
  r.config = f.dir / "missing.toml";
  refused(r, "missing.toml: no such config file");
  r = request_for(f);
  r.inferlab = f.dir / "no-such-inferlab";
  refused(r, "not an executable inferlab");
  r = request_for(f);
  r.time = "1 hour";
  refused(r, "--time '1 hour'");
  r = request_for(f);
  r.mem = "8GB";
  refused(r, "--mem '8GB'");
  r = request_for(f);
  r.partition = "gpu;rm -rf";
  refused(r, "--partition 'gpu;rm -rf'");
  r = request_for(f);
  r.cpus_per_task = -1;
  refused(r, "--cpus-per-task -1");
  r = request_for(f);
  r.db = (f.dir / "line\nbreak.db").string();
  refused(r, "--db holds a control character");
  r = request_for(f);
  r.db = "";
  refused(r, "--db: empty");
  // Accepted forms.
  r = request_for(f);
  for (const char* t : {"30", "30:00", "01:00:00", "2-00", "1-12:00:00", "UNLIMITED"}) {
    r.time = t;
    EXPECT_TRUE(plan_slurm_jobs(r, "/").ok()) << t;
  }
}

// ---- the scripts run through bash ------------------------------------------

struct Shell {
  int exit_code = -1;
  std::string output;
};

Shell sh(const std::string& command) {
  Shell result;
  FILE* pipe = popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return result;
  std::array<char, 4096> buffer{};
  for (size_t n; (n = fread(buffer.data(), 1, buffer.size(), pipe)) > 0;) result.output.append(buffer.data(), n);
  const int status = pclose(pipe);
  result.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  return result;
}

TEST(Slurm, ArrayTaskRunsItsShardWithOddPaths) {
  const Files f = odd_files("array");
  auto plan = plan_slurm_jobs(request_for(f), "/");
  ASSERT_TRUE(plan.ok()) << plan.message();
  ASSERT_TRUE(write_slurm_scripts(*plan, slurm_scripts(*plan)).ok());
  EXPECT_TRUE(fs::is_directory(plan->log_dir()));
  EXPECT_TRUE(fs::is_directory(plan->shard_dir));
  // The fake inferlab prints its arguments, one a line: bash passed each path as one word.
  auto task = sh("SLURM_ARRAY_TASK_ID=1 bash " + shell_quote(plan->array_script().string()));
  ASSERT_EQ(task.exit_code, 0) << task.output;
  EXPECT_EQ(task.output, "run\n" + f.config.string() + "\n--shard\n2/3\n--db\n" + plan->shard_dbs[1].string() + "\n");
  // OMP_NUM_THREADS: the task's CPUs, unless set already.
  auto threads = sh("env -u OMP_NUM_THREADS SLURM_ARRAY_TASK_ID=0 SLURM_CPUS_PER_TASK=3 bash -c " +
                    shell_quote("sed 's/^exec .*/echo threads=$OMP_NUM_THREADS/' " +
                                shell_quote(plan->array_script().string()) + " | bash"));
  EXPECT_EQ(threads.output, "threads=3\n");
  auto own = sh("OMP_NUM_THREADS=2 SLURM_ARRAY_TASK_ID=0 SLURM_CPUS_PER_TASK=3 bash -c " +
                shell_quote("sed 's/^exec .*/echo threads=$OMP_NUM_THREADS/' " +
                            shell_quote(plan->array_script().string()) + " | bash"));
  EXPECT_EQ(own.output, "threads=2\n");
  auto outside = sh("env -u SLURM_ARRAY_TASK_ID bash " + shell_quote(plan->array_script().string()));
  EXPECT_NE(outside.exit_code, 0);
  EXPECT_NE(outside.output.find("run this script as a task of a Slurm job array"), std::string::npos) << outside.output;
  auto beyond = sh("SLURM_ARRAY_TASK_ID=3 bash " + shell_quote(plan->array_script().string()));
  EXPECT_EQ(beyond.exit_code, 2);
  EXPECT_NE(beyond.output.find("outside 0-2"), std::string::npos) << beyond.output;
}

TEST(Slurm, MergeJobMergesThePresentShardsAndFailsWhenOneIsMissing) {
  const Files f = odd_files("merge");
  auto plan = plan_slurm_jobs(request_for(f), "/");
  ASSERT_TRUE(plan.ok()) << plan.message();
  ASSERT_TRUE(write_slurm_scripts(*plan, slurm_scripts(*plan)).ok());
  for (const fs::path& db : plan->shard_dbs) std::ofstream(db) << "";
  auto all = sh("bash " + shell_quote(plan->merge_script().string()));
  ASSERT_EQ(all.exit_code, 0) << all.output;
  EXPECT_EQ(all.output, "merge\n" + plan->db.string() + "\n" + plan->shard_dbs[0].string() + "\n" +
                            plan->shard_dbs[1].string() + "\n" + plan->shard_dbs[2].string() + "\n");
  fs::remove(plan->shard_dbs[1]);
  auto partial = sh("bash " + shell_quote(plan->merge_script().string()));
  EXPECT_EQ(partial.exit_code, 1);
  EXPECT_NE(partial.output.find(plan->shard_dbs[1].string() + ": missing"), std::string::npos) << partial.output;
  EXPECT_NE(partial.output.find("merge\n" + plan->db.string() + "\n" + plan->shard_dbs[0].string() + "\n" +
                                plan->shard_dbs[2].string() + "\n"),
            std::string::npos)
      << partial.output;
  EXPECT_NE(partial.output.find("merged 2 of 3 shard databases"), std::string::npos) << partial.output;
}

// A stand-in sbatch that logs its arguments (one a line, "--" after each call)
// and prints what `reply` holds.
fs::path fake_sbatch(const fs::path& dir, const std::string& reply_script) {
  fs::create_directories(dir);
  const fs::path path = dir / "sbatch";
  std::ofstream(path) << "#!/bin/bash\nlog=\"$(dirname \"$0\")/calls.log\"\n"
                      << "for a in \"$@\"; do printf '%s\\n' \"$a\" >>\"$log\"; done\necho -- >>\"$log\"\n"
                      << reply_script;
  fs::permissions(path, fs::perms::owner_all);
  return path;
}

std::string read_text(const fs::path& path) {
  std::ifstream in(path);
  std::stringstream s;
  s << in.rdbuf();
  return s.str();
}

TEST(Slurm, SubmitRunsSbatchTwiceWithTheDependency) {
  const Files f = odd_files("submit");
  auto plan = plan_slurm_jobs(request_for(f), "/");
  ASSERT_TRUE(plan.ok()) << plan.message();
  ASSERT_TRUE(write_slurm_scripts(*plan, slurm_scripts(*plan)).ok());
  const fs::path bin = f.dir / "bin dir";
  // First call: the array (with a cluster name), then the merge job.
  const fs::path sbatch = fake_sbatch(bin, "n=$(grep -c -- '^--$' \"$log\"); [[ $n == 1 ]] && echo '41;main' || echo 42\n");
  auto submitted = submit_slurm_jobs(*plan, sbatch);
  ASSERT_TRUE(submitted.ok()) << submitted.message();
  EXPECT_EQ(submitted->array_job, "41");
  EXPECT_EQ(submitted->merge_job, "42");
  // The log folder of request_for ends in "100%": '%' is doubled in Slurm's filename patterns, not elsewhere.
  const std::string logs = (f.dir / "jobs 100%%" / "logs").string();
  const std::string escaped = "--parsable\n--output=" + logs + "/array-%A-task-%a.log\n" +
                              plan->array_script().string() + "\n--\n--parsable\n--dependency=afterany:41\n--output=" +
                              logs + "/merge-%j.log\n" + plan->merge_script().string() + "\n--\n";
  EXPECT_EQ(read_text(bin / "calls.log"), escaped);

  // submit.sh makes the same two calls.
  fs::remove(bin / "calls.log");
  auto script = sh("PATH=" + shell_quote(bin.string()) + ":$PATH bash " + shell_quote(plan->submit_script().string()));
  ASSERT_EQ(script.exit_code, 0) << script.output;
  EXPECT_EQ(script.output, "array job 41 (3 tasks), merge job 42 into " + plan->db.string() + "\n");
  EXPECT_EQ(read_text(bin / "calls.log"), escaped);
}

TEST(Slurm, SubmitFailsClearly) {
  const Files f = odd_files("submit-errors");
  auto plan = plan_slurm_jobs(request_for(f), "/");
  ASSERT_TRUE(plan.ok()) << plan.message();
  auto garbage = submit_slurm_jobs(*plan, fake_sbatch(f.dir / "garbage", "echo 'Submitted batch job 7'\n"));
  ASSERT_FALSE(garbage.ok());
  EXPECT_NE(garbage.message().find("sbatch printed 'Submitted batch job 7', not a job id"), std::string::npos)
      << garbage.message();
  auto refused = submit_slurm_jobs(*plan, fake_sbatch(f.dir / "refused", "echo 'invalid partition' >&2; exit 1\n"));
  ASSERT_FALSE(refused.ok());
  EXPECT_NE(refused.message().find("failed (exit status 1)"), std::string::npos) << refused.message();
  // The array went in, the merge job did not: the message says how to finish by hand.
  auto half = submit_slurm_jobs(
      *plan, fake_sbatch(f.dir / "half", "n=$(grep -c -- '^--$' \"$log\"); [[ $n == 1 ]] && echo 5 || exit 3\n"));
  ASSERT_FALSE(half.ok());
  EXPECT_NE(half.message().find("the array is submitted as job 5, but not the merge job"), std::string::npos)
      << half.message();
  EXPECT_NE(half.message().find("--dependency=afterany:5"), std::string::npos) << half.message();

  auto missing = find_sbatch("no-such-sbatch-here");
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.message().find("no-such-sbatch-here: not found on PATH"), std::string::npos) << missing.message();
  EXPECT_FALSE(find_sbatch("/no/such/sbatch").ok());
  auto found = find_sbatch((f.dir / "half" / "sbatch").string());
  ASSERT_TRUE(found.ok()) << found.message();
  EXPECT_EQ(*found, f.dir / "half" / "sbatch");
}

// ---- the command ------------------------------------------------------------

Shell cli(const std::string& env, const std::string& args) {
  return sh(env + " " + shell_quote(INFERLAB_CLI_PATH) + " " + args);
}

TEST(SlurmCommand, ValidatesTheConfigWritesTheScriptsAndSubmits) {
  const fs::path dir = test::temp_path("slurm cli");
  fs::create_directories(dir);
  SyntheticModelSpec spec;
  spec.name = "slurm-cli";
  ASSERT_TRUE(write_synthetic_model(spec, dir / "tiny.gguf").ok());
  {
    std::ofstream corpus(dir / "corpus.txt");
    for (int i = 0; i < 100; ++i) corpus << "A quiet morning by the sea, wave " << i << ".\n";
  }
  const std::string grid =
      "[experiment]\nname = \"slurm-cli\"\n[model]\nname = \"tiny.gguf\"\n[task]\ntype = \"perplexity\"\n"
      "path = \"corpus.txt\"\nlength = 32\nsamples = 2\n";
  std::ofstream(dir / "grid.toml") << grid;                                       // one run: dense
  std::ofstream(dir / "bad.toml") << grid << "[[method]]\nplugin = \"no-such-plugin\"\n";
  const std::string in_dir = "cd " + shell_quote(dir.string()) + " &&";

  // Bad input: nothing written.
  auto zero = cli(in_dir, "slurm grid.toml --array 0 --out jobs");
  EXPECT_NE(zero.exit_code, 0);
  EXPECT_NE(zero.output.find("--array 0: the number of shards must be at least 1"), std::string::npos) << zero.output;
  auto missing = cli(in_dir, "slurm nowhere.toml --array 2 --out jobs");
  EXPECT_NE(missing.exit_code, 0);
  EXPECT_NE(missing.output.find("nowhere.toml: no such config file"), std::string::npos) << missing.output;
  auto bad = cli(in_dir, "slurm bad.toml --array 1 --out jobs");
  EXPECT_NE(bad.exit_code, 0);
  EXPECT_NE(bad.output.find("no-such-plugin"), std::string::npos) << bad.output;
  auto too_many = cli(in_dir, "slurm grid.toml --array 2 --out jobs");
  EXPECT_NE(too_many.exit_code, 0);
  EXPECT_NE(too_many.output.find("only 1 run, so at most 1 shard"), std::string::npos) << too_many.output;
  auto no_sbatch = cli(in_dir + " PATH=/nonexistent", "slurm grid.toml --array 1 --out jobs --submit");
  EXPECT_NE(no_sbatch.exit_code, 0);
  EXPECT_NE(no_sbatch.output.find("sbatch: not found on PATH"), std::string::npos) << no_sbatch.output;
  EXPECT_FALSE(fs::exists(dir / "jobs"));

  // Written: the paths absolute, the same bytes when written again.
  auto written = cli(in_dir, "slurm grid.toml --array 1 --db 'my results/' --out jobs");
  ASSERT_EQ(written.exit_code, 0) << written.output;
  EXPECT_NE(written.output.find("experiment slurm-cli: 1 run in 1 shard; final database " +
                                (dir / "my results" / "slurm-cli.db").string()),
            std::string::npos)
      << written.output;
  const std::string array = read_text(dir / "jobs" / "array.sbatch");
  EXPECT_NE(array.find("config=" + shell_quote((dir / "grid.toml").string()) + "\n"), std::string::npos) << array;
  EXPECT_NE(array.find("#SBATCH --array=0-0\n"), std::string::npos) << array;
  ASSERT_EQ(cli(in_dir, "slurm grid.toml --array 1 --db 'my results/' --out jobs").exit_code, 0);
  EXPECT_EQ(read_text(dir / "jobs" / "array.sbatch"), array);

  // --submit through a stand-in sbatch on PATH.
  const fs::path bin = dir / "bin";
  fake_sbatch(bin, "n=$(grep -c -- '^--$' \"$log\"); [[ $n == 1 ]] && echo 300 || echo 301\n");
  auto submitted = cli(in_dir + " PATH=" + shell_quote(bin.string()) + ":$PATH",
                       "slurm grid.toml --array 1 --db 'my results/' --out jobs --submit");
  ASSERT_EQ(submitted.exit_code, 0) << submitted.output;
  EXPECT_NE(submitted.output.find("submitted array job 300 (1 task), merge job 301 (afterany:300)"), std::string::npos)
      << submitted.output;
  EXPECT_NE(read_text(bin / "calls.log").find("--dependency=afterany:300\n"), std::string::npos);
}

}  // namespace test_slurm
}  // namespace inferlab
