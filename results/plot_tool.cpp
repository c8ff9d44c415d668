#include "results/plot_tool.h"

#include <fcntl.h>
#include <spawn.h>
#include <sys/wait.h>
#include <unistd.h>

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cerrno>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <optional>
#include <sstream>

extern char** environ;

namespace inferlab {

namespace {

namespace fs = std::filesystem;

// A temporary folder, removed with everything in it when this goes.
class TempDir {
 public:
  static Result<TempDir> make() {
    std::error_code ec;
    const fs::path base = fs::temp_directory_path(ec);
    std::string tmpl = ((ec ? fs::path("/tmp") : base) / "inferlab-plot-XXXXXX").string();
    if (mkdtemp(tmpl.data()) == nullptr)
      return Error{fmt::format("{}: cannot make a temporary folder: {}", tmpl, std::strerror(errno))};
    return TempDir(tmpl);
  }
  TempDir(TempDir&& other) noexcept : path_(std::move(other.path_)) { other.path_.clear(); }
  TempDir& operator=(TempDir&&) = delete;
  TempDir(const TempDir&) = delete;
  TempDir& operator=(const TempDir&) = delete;
  ~TempDir() {
    std::error_code ec;
    if (!path_.empty()) fs::remove_all(path_, ec);
  }
  const fs::path& path() const { return path_; }

 private:
  explicit TempDir(fs::path p) : path_(std::move(p)) {}
  fs::path path_;
};

std::string read_text(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  std::ostringstream text;
  text << in.rdbuf();
  return text.str();
}

struct Finished {
  int exit_code = -1;  // -1: killed by a signal
  std::string out, err;
};

// Runs argv[0] (looked up on PATH when it has no '/'), its output kept in
// files of `scratch`. An error only when it cannot be started (ENOENT: not found).
Result<Finished> run_program(const std::vector<std::string>& argv, const fs::path& scratch, int& spawn_errno) {
  const fs::path out_path = scratch / "stdout.txt", err_path = scratch / "stderr.txt";
  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_addopen(&actions, STDIN_FILENO, "/dev/null", O_RDONLY, 0);
  posix_spawn_file_actions_addopen(&actions, STDOUT_FILENO, out_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  posix_spawn_file_actions_addopen(&actions, STDERR_FILENO, err_path.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0600);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  spawn_errno = posix_spawnp(&pid, args[0], &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (spawn_errno != 0) return Error{fmt::format("{}: cannot start it: {}", argv[0], std::strerror(spawn_errno))};
  int status = 0;
  while (waitpid(pid, &status, 0) < 0)
    if (errno != EINTR) return Error{fmt::format("{}: waitpid: {}", argv[0], std::strerror(errno))};
  Finished f;
  f.exit_code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  // posix_spawnp reports a missing program through the child on some libcs: exit 127.
  if (f.exit_code == 127) spawn_errno = ENOENT;
  f.out = read_text(out_path);
  f.err = read_text(err_path);
  return f;
}

// The last non-empty line of a program's error output.
std::string last_line(const std::string& text) {
  std::string last;
  std::istringstream in(text);
  for (std::string line; std::getline(in, line);)
    if (line.find_first_not_of(" \t\r") != std::string::npos) last = line;
  return last;
}

std::optional<fs::path> executable_folder() {
  std::error_code ec;
  const fs::path exe = fs::read_symlink("/proc/self/exe", ec);
  if (ec) return std::nullopt;
  return exe.parent_path();
}

}  // namespace

Result<PlotTool> find_plot_tool() {
  const auto bin = executable_folder();
  if (!bin) return Error{"cannot find the inferlab executable's folder (/proc/self/exe), where the figure script is"};
  PlotTool tool;
  tool.script = (*bin / ".." / "share" / "inferlab" / "plot_figures.py").lexically_normal();
  std::error_code ec;
  if (!fs::is_regular_file(tool.script, ec))
    return Error{fmt::format("{}: the figure script is missing (the build copies scripts/plot_figures.py there, "
                             "`cmake --install` to <prefix>/share/inferlab/)",
                             tool.script.string())};

  auto scratch = TempDir::make();
  if (!scratch) return scratch.error();
  std::vector<std::string> candidates;
  const char* chosen = std::getenv("INFERLAB_PYTHON");
  if (chosen != nullptr && *chosen != '\0') {
    candidates.push_back(chosen);
  } else {
    candidates = {"python3", "/usr/bin/python3"};
  }
  std::vector<std::string> missing, without;
  for (const std::string& python : candidates) {
    int spawn_errno = 0;
    auto probe = run_program({python, "-c", "import matplotlib"}, scratch->path(), spawn_errno);
    if (!probe || spawn_errno == ENOENT) {
      missing.push_back(probe ? fmt::format("{}: not found", python) : probe.message());
      continue;
    }
    if (probe->exit_code == 0) {
      tool.python = python;
      return tool;
    }
    const std::string why = last_line(probe->err);
    without.push_back(why.empty() ? python : fmt::format("{} ({})", python, why));
  }
  if (without.empty())
    return Error{fmt::format("python3 not found ({}{}); figures need Python 3 with matplotlib (Debian: apt-get "
                             "install python3 python3-matplotlib)",
                             chosen != nullptr && *chosen != '\0' ? "$INFERLAB_PYTHON: " : "",
                             fmt::join(missing, "; "))};
  return Error{fmt::format("matplotlib is not installed for {}; figures need it (Debian: apt-get install "
                           "python3-matplotlib, or set INFERLAB_PYTHON to a Python that has it)",
                           fmt::join(without, ", "))};
}

Result<std::vector<fs::path>> draw_figures(const PlotTool& tool, const nlohmann::json& spec, const fs::path& out_dir,
                                           const std::vector<std::string>& formats) {
  auto scratch = TempDir::make();
  if (!scratch) return scratch.error();
  const fs::path spec_path = scratch->path() / "figures.json";
  {
    std::ofstream out(spec_path, std::ios::binary);
    out << spec.dump();
    if (!out) return Error{fmt::format("{}: cannot write the figure data", spec_path.string())};
  }
  std::vector<std::string> argv = {tool.python, tool.script.string(), "--spec", spec_path.string(), "--out",
                                   out_dir.string()};
  for (const std::string& f : formats) argv.insert(argv.end(), {"--format", f});
  int spawn_errno = 0;
  auto ran = run_program(argv, scratch->path(), spawn_errno);
  if (!ran) return ran.error();
  if (ran->exit_code != 0) {
    std::string err = ran->err;
    while (!err.empty() && (err.back() == '\n' || err.back() == '\r')) err.pop_back();
    return Error{fmt::format("{} failed (exit {}){}{}", tool.script.string(), ran->exit_code, err.empty() ? "" : ": ",
                             err)};
  }
  std::vector<fs::path> files;
  std::istringstream lines(ran->out);
  for (std::string line; std::getline(lines, line);)
    if (!line.empty()) files.emplace_back(line);
  for (const fs::path& f : files) {
    std::error_code ec;
    if (!fs::is_regular_file(f, ec))
      return Error{fmt::format("{} reported {}, which is not there", tool.script.string(), f.string())};
  }
  return files;
}

Result<std::vector<std::string>> draw_svg_documents(const PlotTool& tool, const nlohmann::json& spec) {
  auto scratch = TempDir::make();
  if (!scratch) return scratch.error();
  const size_t count = spec.contains("figures") ? spec["figures"].size() : 0;
  auto files = draw_figures(tool, spec, scratch->path(), {"svg"});
  if (!files) return files.error();
  if (files->size() != count)
    return Error{fmt::format("{} drew {} files for {} figures", tool.script.string(), files->size(), count)};
  std::vector<std::string> out;
  for (const fs::path& f : *files) out.push_back(read_text(f));
  return out;
}

}  // namespace inferlab
