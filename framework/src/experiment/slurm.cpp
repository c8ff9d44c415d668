#include "experiment/slurm.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <regex>

extern char** environ;

namespace inferlab {

namespace fs = std::filesystem;

namespace {

bool has_control_character(const std::string& text) {
  for (const char c : text)
    if (static_cast<unsigned char>(c) < 0x20 || c == 0x7f) return true;
  return false;
}

std::string job_name_of(const std::string& experiment) {
  std::string name;
  for (const char c : experiment) {
    const bool plain = (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') || c == '.' ||
                       c == '_' || c == '-';
    name += plain ? c : '-';
  }
  return name.empty() ? "experiment" : name;
}

fs::path absolute_normal(const fs::path& path, const fs::path& cwd) {
  return (path.is_absolute() ? path : cwd / path).lexically_normal();
}

// A path in an sbatch filename pattern: '%' is Slurm's escape character.
std::string slurm_pattern_path(const fs::path& path) {
  std::string out;
  for (const char c : path.string()) {
    out += c;
    if (c == '%') out += '%';
  }
  return out;
}

std::string sbatch_resource_lines(const SlurmPlan& plan, bool with_task_resources) {
  std::string lines;
  if (!plan.partition.empty()) lines += fmt::format("#SBATCH --partition={}\n", plan.partition);
  if (!plan.time.empty()) lines += fmt::format("#SBATCH --time={}\n", plan.time);
  if (with_task_resources) {
    if (plan.cpus_per_task > 0) lines += fmt::format("#SBATCH --cpus-per-task={}\n", plan.cpus_per_task);
    if (!plan.mem.empty()) lines += fmt::format("#SBATCH --mem={}\n", plan.mem);
  }
  return lines;
}

std::string shell_line(const std::vector<std::string>& argv) {
  std::string line;
  for (const std::string& a : argv) line += (line.empty() ? "" : " ") + shell_quote(a);
  return line;
}

}  // namespace

std::string shell_quote(std::string_view text) {
  static const std::string_view kPlain =
      "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_@%+=:,./-";
  if (!text.empty() && text.find_first_not_of(kPlain) == std::string_view::npos) return std::string(text);
  std::string out = "'";
  for (const char c : text) out += c == '\'' ? std::string("'\\''") : std::string(1, c);
  return out + "'";
}

Result<SlurmPlan> plan_slurm_jobs(const SlurmRequest& request, const fs::path& cwd) {
  if (request.shards < 1) return Error{fmt::format("--array {}: the number of shards must be at least 1", request.shards)};
  if (request.grid_runs >= 0 && request.shards > request.grid_runs)
    return Error{fmt::format("--array {}: the grid of {} has only {} run{}, so at most {} shard{} (a shard without "
                             "runs would be a job that does nothing)",
                             request.shards, request.config.string(), request.grid_runs,
                             request.grid_runs == 1 ? "" : "s", request.grid_runs, request.grid_runs == 1 ? "" : "s")};
  static const std::regex kPartition(R"([A-Za-z0-9_.,-]+)");
  static const std::regex kTime(R"((\d+-)?\d+(:\d+){0,2}|UNLIMITED|INFINITE)");
  static const std::regex kMem(R"(\d+[KMGT]?)");
  if (!request.partition.empty() && !std::regex_match(request.partition, kPartition))
    return Error{fmt::format("--partition '{}': not a partition name (letters, digits, '_', '.', '-'; ',' between several)",
                             request.partition)};
  if (!request.time.empty() && !std::regex_match(request.time, kTime))
    return Error{fmt::format("--time '{}': not a Slurm time limit (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM or D-HH:MM:SS)",
                             request.time)};
  if (!request.mem.empty() && !std::regex_match(request.mem, kMem))
    return Error{fmt::format("--mem '{}': not a Slurm memory size (a number of MB, or with a K, M, G or T suffix)",
                             request.mem)};
  if (request.cpus_per_task < 0)
    return Error{fmt::format("--cpus-per-task {}: must be at least 1", request.cpus_per_task)};
  for (const auto& [what, text] : {std::pair<const char*, std::string>{"the config path", request.config.string()},
                                   {"the inferlab path", request.inferlab.string()},
                                   {"--db", request.db},
                                   {"--out", request.out},
                                   {"the working folder", cwd.string()}})
    if (has_control_character(text))
      return Error{fmt::format("{} holds a control character (a newline?); Slurm scripts cannot carry it", what)};

  SlurmPlan plan;
  plan.inferlab = absolute_normal(request.inferlab, cwd);
  plan.config = absolute_normal(request.config, cwd);
  std::error_code ec;
  if (!fs::is_regular_file(plan.config, ec)) return Error{fmt::format("{}: no such config file", plan.config.string())};
  if (access(plan.inferlab.c_str(), X_OK) != 0)
    return Error{fmt::format("{}: not an executable inferlab", plan.inferlab.string())};
  plan.experiment = request.experiment;
  plan.job_name = job_name_of(request.experiment);
  plan.shards = request.shards;
  plan.partition = request.partition;
  plan.time = request.time;
  plan.mem = request.mem;
  plan.cpus_per_task = request.cpus_per_task;

  if (request.db.empty()) return Error{"--db: empty (a database file, or a folder for <experiment>.db)"};
  const fs::path db = absolute_normal(request.db, cwd);
  const bool folder = request.db.back() == '/' || fs::is_directory(db, ec);
  plan.db = folder ? (db / (plan.job_name + ".db")).lexically_normal() : db;
  if (plan.db.filename().empty()) return Error{fmt::format("--db {}: names no file", request.db)};
  plan.shard_dir = plan.db.parent_path() / (plan.db.stem().string() + ".shards");
  plan.out = request.out.empty() ? absolute_normal(fs::path("results") / "slurm" / plan.job_name, cwd)
                                 : absolute_normal(request.out, cwd);
  if (plan.out.filename().empty()) plan.out = plan.out.parent_path();
  for (int64_t i = 1; i <= plan.shards; ++i)
    plan.shard_dbs.push_back(plan.shard_dir / fmt::format("shard-{}-of-{}.db", i, plan.shards));
  return plan;
}

SlurmScripts slurm_scripts(const SlurmPlan& plan) {
  SlurmScripts s;
  const int64_t n = plan.shards;
  s.array = fmt::format(
      "#!/bin/bash\n"
      "# Written by `inferlab slurm`: experiment {name}, a job array of {n} task{s}. Task i (0-based\n"
      "# SLURM_ARRAY_TASK_ID) runs shard i+1 of {n} of the grid into its own database; merge.sbatch\n"
      "# merges them. Submit both with submit.sh.\n"
      "#SBATCH --job-name=inferlab-{name}\n"
      "#SBATCH --array=0-{last}\n"
      "{resources}"
      "set -euo pipefail\n"
      "inferlab={inferlab}\n"
      "config={config}\n"
      "shard_dir={shard_dir}\n"
      "shards={n}\n"
      "task=\"${{SLURM_ARRAY_TASK_ID:?run this script as a task of a Slurm job array (see submit.sh)}}\"\n"
      "if ! [[ \"$task\" =~ ^[0-9]+$ ]] || ((task >= shards)); then\n"
      "    echo \"inferlab slurm: array task '$task' is outside 0-$((shards - 1))\" >&2\n"
      "    exit 2\n"
      "fi\n"
      "shard=$((task + 1))\n"
      "# The CPUs Slurm gave the task, unless OMP_NUM_THREADS says otherwise ([model] threads = 0: all).\n"
      "if [[ -n \"${{SLURM_CPUS_PER_TASK:-}}\" && -z \"${{OMP_NUM_THREADS:-}}\" ]]; then\n"
      "    export OMP_NUM_THREADS=\"$SLURM_CPUS_PER_TASK\"\n"
      "fi\n"
      "mkdir -p \"$shard_dir\"\n"
      "exec \"$inferlab\" run \"$config\" --shard \"$shard/$shards\" --db \"$shard_dir/shard-$shard-of-$shards.db\"\n",
      fmt::arg("name", plan.job_name), fmt::arg("n", n), fmt::arg("s", n == 1 ? "" : "s"), fmt::arg("last", n - 1),
      fmt::arg("resources", sbatch_resource_lines(plan, true)), fmt::arg("inferlab", shell_quote(plan.inferlab.string())),
      fmt::arg("config", shell_quote(plan.config.string())), fmt::arg("shard_dir", shell_quote(plan.shard_dir.string())));

  std::string shard_list;
  for (const fs::path& p : plan.shard_dbs) shard_list += "    " + shell_quote(p.string()) + "\n";
  s.merge = fmt::format(
      "#!/bin/bash\n"
      "# Written by `inferlab slurm`: merges the {n} shard database{s} of experiment {name} into the final\n"
      "# database once every array task has ended (afterany: also when some failed; their finished runs\n"
      "# are merged, and submitting again runs only the runs still missing).\n"
      "#SBATCH --job-name=inferlab-merge-{name}\n"
      "{resources}"
      "set -uo pipefail\n"
      "inferlab={inferlab}\n"
      "db={db}\n"
      "shards=(\n"
      "{shard_list}"
      ")\n"
      "present=()\n"
      "for shard_db in \"${{shards[@]}}\"; do\n"
      "    if [[ -f \"$shard_db\" ]]; then\n"
      "        present+=(\"$shard_db\")\n"
      "    else\n"
      "        echo \"inferlab slurm: $shard_db: missing (its array task ended before it opened it)\" >&2\n"
      "    fi\n"
      "done\n"
      "status=0\n"
      "if ((${{#present[@]}} > 0)); then\n"
      "    \"$inferlab\" merge \"$db\" \"${{present[@]}}\" || status=$?\n"
      "fi\n"
      "if ((${{#present[@]}} < ${{#shards[@]}})); then\n"
      "    echo \"inferlab slurm: merged ${{#present[@]}} of ${{#shards[@]}} shard databases into $db\" >&2\n"
      "    ((status != 0)) || status=1\n"
      "fi\n"
      "exit \"$status\"\n",
      fmt::arg("name", plan.job_name), fmt::arg("n", n), fmt::arg("s", n == 1 ? "" : "s"),
      fmt::arg("resources", sbatch_resource_lines(plan, false)), fmt::arg("inferlab", shell_quote(plan.inferlab.string())),
      fmt::arg("db", shell_quote(plan.db.string())), fmt::arg("shard_list", shard_list));

  std::vector<std::string> merge = sbatch_merge_argv(plan, "sbatch", "ARRAY_JOB");
  std::string merge_line;
  for (const std::string& a : merge)
    merge_line += (merge_line.empty() ? "" : " ") +
                  (a == "--dependency=afterany:ARRAY_JOB" ? std::string("--dependency=afterany:\"$array_job\"")
                                                          : shell_quote(a));
  s.submit = fmt::format(
      "#!/bin/bash\n"
      "# Written by `inferlab slurm`: submits the shard array of experiment {name}, then the merge job,\n"
      "# which starts when every array task has ended.\n"
      "set -euo pipefail\n"
      "array_job=$({array_line})\n"
      "array_job=\"${{array_job%%;*}}\"\n"
      "merge_job=$({merge_line})\n"
      "merge_job=\"${{merge_job%%;*}}\"\n"
      "printf 'array job %s ({n} task{s}), merge job %s into %s\\n' \"$array_job\" \"$merge_job\" {db}\n",
      fmt::arg("name", plan.job_name), fmt::arg("array_line", shell_line(sbatch_array_argv(plan, "sbatch"))),
      fmt::arg("merge_line", merge_line), fmt::arg("n", n), fmt::arg("s", n == 1 ? "" : "s"),
      fmt::arg("db", shell_quote(plan.db.string())));
  return s;
}

Status write_slurm_scripts(const SlurmPlan& plan, const SlurmScripts& scripts) {
  for (const fs::path& dir : {plan.out, plan.log_dir(), plan.shard_dir, plan.db.parent_path()}) {
    std::error_code ec;
    fs::create_directories(dir, ec);
    if (ec) return Error{fmt::format("{}: cannot make the folder: {}", dir.string(), ec.message())};
  }
  const std::pair<fs::path, const std::string*> files[] = {
      {plan.array_script(), &scripts.array}, {plan.merge_script(), &scripts.merge}, {plan.submit_script(), &scripts.submit}};
  for (const auto& [path, text] : files) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out << *text;
    out.close();
    if (!out) return Error{fmt::format("{}: cannot write it", path.string())};
    std::error_code ec;
    fs::permissions(path, fs::perms::owner_all | fs::perms::group_read | fs::perms::group_exec |
                              fs::perms::others_read | fs::perms::others_exec, ec);
    if (ec) return Error{fmt::format("{}: cannot make it executable: {}", path.string(), ec.message())};
  }
  return ok_status();
}

std::vector<std::string> sbatch_array_argv(const SlurmPlan& plan, const std::string& sbatch) {
  return {sbatch, "--parsable", "--output=" + slurm_pattern_path(plan.log_dir()) + "/array-%A-task-%a.log",
          plan.array_script().string()};
}

std::vector<std::string> sbatch_merge_argv(const SlurmPlan& plan, const std::string& sbatch,
                                           const std::string& array_job_id) {
  return {sbatch, "--parsable", "--dependency=afterany:" + array_job_id,
          "--output=" + slurm_pattern_path(plan.log_dir()) + "/merge-%j.log", plan.merge_script().string()};
}

Result<std::string> parse_sbatch_job_id(std::string_view output) {
  std::string_view text = output;
  while (!text.empty() && (text.back() == '\n' || text.back() == '\r' || text.back() == ' ')) text.remove_suffix(1);
  std::string_view id = text.substr(0, text.find(';'));
  const bool digits = !id.empty() && id.find_first_not_of("0123456789") == std::string_view::npos;
  if (!digits || text.find('\n') != std::string_view::npos)
    return Error{fmt::format("sbatch printed '{}', not a job id (`sbatch --parsable` prints one, as 1234 or 1234;cluster)",
                             std::string(text.substr(0, 200)))};
  return std::string(id);
}

Result<fs::path> find_sbatch(const std::string& sbatch) {
  const auto executable = [](const fs::path& p) {
    std::error_code ec;
    return fs::is_regular_file(p, ec) && access(p.c_str(), X_OK) == 0;
  };
  if (sbatch.find('/') != std::string::npos) {
    if (executable(sbatch)) return fs::absolute(sbatch);
    return Error{fmt::format("{}: no such executable (--submit needs Slurm's sbatch)", sbatch)};
  }
  const char* path = std::getenv("PATH");
  const std::string dirs = path != nullptr ? path : "";
  for (size_t start = 0; start <= dirs.size();) {
    const size_t end = std::min(dirs.find(':', start), dirs.size());
    const fs::path dir = end > start ? fs::path(dirs.substr(start, end - start)) : fs::path(".");
    if (executable(dir / sbatch)) return fs::absolute(dir / sbatch);
    start = end + 1;
  }
  return Error{fmt::format("{}: not found on PATH (--submit needs Slurm's sbatch; without --submit the scripts are "
                           "only written, to submit on a machine that has Slurm)",
                           sbatch)};
}

namespace {

// Runs argv (argv[0] a path), its standard output returned; standard error passes through.
Result<std::string> run_sbatch(const std::vector<std::string>& argv) {
  int fds[2];
  if (pipe(fds) != 0) return Error{fmt::format("cannot make a pipe for sbatch: {}", std::strerror(errno))};
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_adddup2(&actions, fds[1], STDOUT_FILENO);
  posix_spawn_file_actions_addclose(&actions, fds[0]);
  posix_spawn_file_actions_addclose(&actions, fds[1]);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  const int spawned = posix_spawn(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  close(fds[1]);
  if (spawned != 0) {
    close(fds[0]);
    return Error{fmt::format("{}: cannot start it: {}", argv[0], std::strerror(spawned))};
  }
  std::string out;
  char buffer[4096];
  for (;;) {
    const ssize_t n = read(fds[0], buffer, sizeof buffer);
    if (n > 0) {
      out.append(buffer, size_t(n));
    } else if (n == 0 || errno != EINTR) {
      break;
    }
  }
  close(fds[0]);
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return Error{fmt::format("{}: waitpid: {}", argv[0], std::strerror(errno))};
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0)
    return Error{fmt::format("{} failed ({}){}", shell_line(argv),
                             WIFEXITED(status) ? fmt::format("exit status {}", WEXITSTATUS(status))
                                               : fmt::format("signal {}", WTERMSIG(status)),
                             out.empty() ? "" : ": " + out.substr(0, out.find('\n')))};
  return out;
}

}  // namespace

Result<SlurmSubmission> submit_slurm_jobs(const SlurmPlan& plan, const fs::path& sbatch) {
  SlurmSubmission submission;
  auto array_out = run_sbatch(sbatch_array_argv(plan, sbatch.string()));
  if (!array_out) return array_out.error();
  auto array_job = parse_sbatch_job_id(*array_out);
  if (!array_job) return Error{fmt::format("submitting {}: {}", plan.array_script().string(), array_job.message())};
  submission.array_job = *array_job;
  auto merge_out = run_sbatch(sbatch_merge_argv(plan, sbatch.string(), submission.array_job));
  auto merge_job = merge_out ? parse_sbatch_job_id(*merge_out) : Result<std::string>(merge_out.error());
  if (!merge_job)
    return Error{fmt::format("the array is submitted as job {}, but not the merge job: {}; submit it with `sbatch "
                             "--dependency=afterany:{} {}`, or merge by hand afterwards with `inferlab merge`",
                             submission.array_job, merge_job.message(), submission.array_job,
                             shell_quote(plan.merge_script().string()))};
  submission.merge_job = *merge_job;
  return submission;
}

}  // namespace inferlab
