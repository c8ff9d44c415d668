#include "experiment/worker.h"

#include <fcntl.h>
#include <fmt/format.h>
#include <poll.h>
#include <signal.h>
#include <spawn.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <climits>
#include <cstring>
#include <fstream>
#include <new>
#include <string>

extern char** environ;

namespace inferlab {

namespace {

WorkerState* g_shared_state = nullptr;  // set by attach_worker

Error system_error(const std::string& what) { return Error{fmt::format("{}: {}", what, std::strerror(errno))}; }

// Closes a descriptor on every way out.
struct Fd {
  int fd = -1;
  explicit Fd(int f) : fd(f) {}
  Fd(const Fd&) = delete;
  Fd& operator=(const Fd&) = delete;
  ~Fd() {
    if (fd >= 0) ::close(fd);
  }
};

// `fd` moved to a number of 10 or more, so dup2 onto 3 and 4 in the child
// cannot overwrite one source with the other.
int above_targets(int fd) {
  const int moved = ::fcntl(fd, F_DUPFD_CLOEXEC, 10);
  ::close(fd);
  return moved;
}

// A failed operator new under the memory limit: flagged for the run's error
// (the process may still die of it, e.g. an exception through a noexcept frame).
void flag_failed_allocation() {
  worker_state().allocation_failed.store(1);
  throw std::bad_alloc();
}

// Private writable memory the process holds now (VmData, as RLIMIT_DATA
// counts it): a few MB, or under AddressSanitizer terabytes of shadow
// reserved and never touched.
int64_t data_bytes_now() {
  std::ifstream status("/proc/self/status");
  for (std::string line; std::getline(status, line);)
    if (line.rfind("VmData:", 0) == 0) return std::stoll(line.substr(7)) * 1024;
  return 0;
}

const char* signal_name(int sig) {
  switch (sig) {
    case SIGSEGV: return "SIGSEGV";
    case SIGABRT: return "SIGABRT";
    case SIGBUS: return "SIGBUS";
    case SIGFPE: return "SIGFPE";
    case SIGILL: return "SIGILL";
    case SIGKILL: return "SIGKILL";
    case SIGTERM: return "SIGTERM";
    case SIGINT: return "SIGINT";
    case SIGHUP: return "SIGHUP";
    case SIGPIPE: return "SIGPIPE";
    case SIGQUIT: return "SIGQUIT";
    case SIGTRAP: return "SIGTRAP";
    case SIGSYS: return "SIGSYS";
    case SIGXCPU: return "SIGXCPU";
    case SIGXFSZ: return "SIGXFSZ";
    default: return nullptr;
  }
}

}  // namespace

WorkerState& worker_state() {
  static WorkerState own;
  return g_shared_state != nullptr ? *g_shared_state : own;
}

Channel::~Channel() {
  if (fd_ >= 0) ::close(fd_);
}

Status Channel::send(const nlohmann::json& message) {
  const std::vector<uint8_t> body = nlohmann::json::to_cbor(message);
  const auto length = uint32_t(body.size());
  const auto send_all = [&](const uint8_t* bytes, size_t n) -> Status {
    for (size_t done = 0; done < n;) {
      // MSG_NOSIGNAL: a peer that is gone is an error here, not a SIGPIPE.
      const ssize_t sent = ::send(fd_, bytes + done, n - done, MSG_NOSIGNAL);
      if (sent < 0 && errno == EINTR) continue;
      if (sent < 0) return system_error("worker channel: send");
      done += size_t(sent);
    }
    return ok_status();
  };
  if (auto s = send_all(reinterpret_cast<const uint8_t*>(&length), sizeof length); !s) return s;
  return send_all(body.data(), body.size());
}

Result<Channel::Received> Channel::receive(nlohmann::json& message,
                                           std::optional<std::chrono::steady_clock::time_point> deadline) {
  for (;;) {
    uint32_t length = 0;
    if (buffer_.size() >= sizeof length) {
      std::memcpy(&length, buffer_.data(), sizeof length);
      if (buffer_.size() - sizeof length >= length) {
        const auto begin = buffer_.begin() + sizeof length;
        message = nlohmann::json::from_cbor(begin, begin + length, /*strict=*/true, /*allow_exceptions=*/false);
        buffer_.erase(buffer_.begin(), begin + length);
        if (!message.is_object()) return Error{"worker channel: a message that is not a CBOR map"};
        return Received::Message;
      }
    }
    int wait_ms = -1;
    if (deadline) {
      const auto left = std::chrono::ceil<std::chrono::milliseconds>(*deadline - std::chrono::steady_clock::now());
      if (left.count() <= 0) return Received::TimedOut;
      wait_ms = int(std::min<int64_t>(left.count(), INT_MAX));
    }
    pollfd readable{fd_, POLLIN, 0};
    const int ready = ::poll(&readable, 1, wait_ms);
    if (ready < 0 && errno == EINTR) continue;
    if (ready < 0) return system_error("worker channel: poll");
    if (ready == 0) continue;  // the deadline is checked above
    uint8_t chunk[1 << 16];
    const ssize_t n = ::recv(fd_, chunk, sizeof chunk, 0);
    if (n < 0 && (errno == EINTR || errno == EAGAIN)) continue;
    if (n < 0 && errno == ECONNRESET) return Received::Closed;
    if (n < 0) return system_error("worker channel: recv");
    if (n == 0) return Received::Closed;  // a message cut short by the peer's end is lost with it
    buffer_.insert(buffer_.end(), chunk, chunk + n);
  }
}

Result<std::unique_ptr<WorkerProcess>> WorkerProcess::start(const std::vector<std::string>& argv) {
  int ends[2];
  if (::socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, ends) != 0) return system_error("worker: socketpair");
  auto channel = std::make_unique<Channel>(ends[0]);
  const Fd child_end(above_targets(ends[1]));
  const Fd state_fd(above_targets(::memfd_create("inferlab-worker-state", MFD_CLOEXEC)));
  if (child_end.fd < 0 || state_fd.fd < 0) return system_error("worker: descriptors");
  if (::ftruncate(state_fd.fd, sizeof(WorkerState)) != 0) return system_error("worker: state page");
  void* page = ::mmap(nullptr, sizeof(WorkerState), PROT_READ | PROT_WRITE, MAP_SHARED, state_fd.fd, 0);
  if (page == MAP_FAILED) return system_error("worker: state page");
  auto* state = new (page) WorkerState();

  posix_spawn_file_actions_t actions;
  posix_spawn_file_actions_init(&actions);
  posix_spawn_file_actions_adddup2(&actions, child_end.fd, kWorkerChannelFd);
  posix_spawn_file_actions_adddup2(&actions, state_fd.fd, kWorkerStateFd);
  std::vector<char*> args;
  for (const std::string& a : argv) args.push_back(const_cast<char*>(a.c_str()));
  args.push_back(nullptr);
  pid_t pid = 0;
  const int rc = ::posix_spawn(&pid, argv.at(0).c_str(), &actions, nullptr, args.data(), environ);
  posix_spawn_file_actions_destroy(&actions);
  if (rc != 0) {
    ::munmap(page, sizeof(WorkerState));
    return Error{fmt::format("cannot start a worker process ({}): {}", argv[0], std::strerror(rc))};
  }
  return std::unique_ptr<WorkerProcess>(new WorkerProcess(pid, std::move(channel), state));
}

WorkerProcess::~WorkerProcess() {
  if (!reaped_) kill();
  ::munmap(state_, sizeof(WorkerState));
}

int WorkerProcess::wait() {
  while (!reaped_) {
    if (::waitpid(pid_, &status_, 0) == pid_) reaped_ = true;
    else if (errno != EINTR) break;
  }
  return status_;
}

int WorkerProcess::kill() {
  if (!reaped_) ::kill(pid_, SIGKILL);
  return wait();
}

std::string describe_exit(int status) {
  if (WIFEXITED(status)) return fmt::format("exited with status {}", WEXITSTATUS(status));
  if (!WIFSIGNALED(status)) return fmt::format("ended with wait status {}", status);
  const int sig = WTERMSIG(status);
  const char* name = signal_name(sig);
  std::string text = fmt::format("was killed by {} ({})", name ? std::string(name) : fmt::format("signal {}", sig),
                                 ::strsignal(sig));
  // The parent sends SIGKILL only past a timeout, and says so instead.
  if (sig == SIGKILL) text += ", by hand or by the system's out-of-memory killer";
  return text;
}

Result<std::unique_ptr<Channel>> attach_worker(int64_t memory_limit_mb) {
  if (memory_limit_mb <= 0) return Error{"--worker: --memory-limit-mb must be a positive number of MB"};
  struct stat st {};
  if (::fstat(kWorkerChannelFd, &st) != 0 || !S_ISSOCK(st.st_mode) || ::fstat(kWorkerStateFd, &st) != 0)
    return Error{"--worker: this process has no parent `inferlab run` (--worker is how it starts its workers)"};
  // Processes a plugin starts must not hold the channel open after this one dies.
  ::fcntl(kWorkerChannelFd, F_SETFD, FD_CLOEXEC);
  // Nor does a worker outlive its parent: one stuck in a plugin would run on.
  ::prctl(PR_SET_PDEATHSIG, SIGKILL);
  void* page = ::mmap(nullptr, sizeof(WorkerState), PROT_READ | PROT_WRITE, MAP_SHARED, kWorkerStateFd, 0);
  ::close(kWorkerStateFd);
  if (page == MAP_FAILED) return system_error("--worker: state page");
  g_shared_state = static_cast<WorkerState*>(page);
  // Counted from what the worker holds before it loads anything, so the limit
  // is what the model, engine and runs may take.
  rlimit limit{};
  if (::getrlimit(RLIMIT_DATA, &limit) != 0) return system_error("--worker: getrlimit");
  limit.rlim_cur = std::min<rlim_t>(rlim_t(data_bytes_now()) + (rlim_t(memory_limit_mb) << 20), limit.rlim_max);
  if (::setrlimit(RLIMIT_DATA, &limit) != 0) return system_error("--worker: memory limit");
  std::set_new_handler(flag_failed_allocation);
  return std::make_unique<Channel>(kWorkerChannelFd);
}

int64_t physical_memory_bytes() {
  const long pages = ::sysconf(_SC_PHYS_PAGES), page = ::sysconf(_SC_PAGESIZE);
  return pages > 0 && page > 0 ? int64_t(pages) * int64_t(page) : 0;
}

int64_t default_memory_limit_mb() { return physical_memory_bytes() / 10 * 9 >> 20; }

nlohmann::json record_to_json(const RunRecord& r) {
  nlohmann::json metrics = nlohmann::json::array();
  for (const MetricValue& m : r.metrics) metrics.push_back({{"name", m.name}, {"value", m.value}, {"unit", m.unit}});
  nlohmann::json samples = nlohmann::json::array();
  for (const SampleRow& s : r.samples)
    samples.push_back({{"index", s.index},
                       {"input_tokens", s.input_tokens},
                       {"expected", s.expected},
                       {"produced", s.produced},
                       {"correct", s.correct ? nlohmann::json(*s.correct) : nlohmann::json()},
                       {"latency_seconds", s.latency_seconds},
                       {"detail_json", s.detail_json}});
  return {{"hash", r.hash},
          {"experiment", r.experiment},
          {"experiment_description", r.experiment_description},
          {"config_path", r.config_path},
          {"label", r.label},
          {"plugin", r.plugin},
          {"plugin_version", r.plugin_version},
          {"task", r.task},
          {"config_json", r.config_json},
          {"model", r.model},
          {"model_checksum", r.model_checksum},
          {"backend", r.backend},
          {"device", r.device},
          {"git_revision", r.git_revision},
          {"error", r.error},
          {"status", run_status_name(r.status)},
          {"baseline", r.baseline},
          {"started_at", r.started_at},
          {"finished_at", r.finished_at},
          {"metrics", std::move(metrics)},
          {"samples", std::move(samples)}};
}

Result<RunRecord> record_from_json(const nlohmann::json& j) {
  RunRecord r;
  try {
    const std::pair<std::string*, const char*> texts[] = {{&r.hash, "hash"},
                                                          {&r.experiment, "experiment"},
                                                          {&r.experiment_description, "experiment_description"},
                                                          {&r.config_path, "config_path"},
                                                          {&r.label, "label"},
                                                          {&r.plugin, "plugin"},
                                                          {&r.plugin_version, "plugin_version"},
                                                          {&r.task, "task"},
                                                          {&r.config_json, "config_json"},
                                                          {&r.model, "model"},
                                                          {&r.model_checksum, "model_checksum"},
                                                          {&r.backend, "backend"},
                                                          {&r.device, "device"},
                                                          {&r.git_revision, "git_revision"},
                                                          {&r.error, "error"}};
    for (const auto& [field, key] : texts) *field = j.at(key).get<std::string>();
    const auto status = parse_run_status(j.at("status").get<std::string>());
    if (!status) return Error{"worker record: unknown status " + j.at("status").get<std::string>()};
    r.status = *status;
    r.baseline = j.at("baseline").get<bool>();
    r.started_at = j.at("started_at").get<double>();
    r.finished_at = j.at("finished_at").get<double>();
    for (const auto& m : j.at("metrics"))
      r.metrics.push_back({m.at("name").get<std::string>(), m.at("value").get<double>(), m.at("unit").get<std::string>()});
    for (const auto& s : j.at("samples")) {
      SampleRow row;
      row.index = s.at("index").get<int64_t>();
      row.input_tokens = s.at("input_tokens").get<int64_t>();
      row.expected = s.at("expected").get<std::string>();
      row.produced = s.at("produced").get<std::string>();
      if (!s.at("correct").is_null()) row.correct = s.at("correct").get<bool>();
      row.latency_seconds = s.at("latency_seconds").get<double>();
      row.detail_json = s.at("detail_json").get<std::string>();
      r.samples.push_back(std::move(row));
    }
  } catch (const nlohmann::json::exception& e) {
    return Error{fmt::format("worker record: {}", e.what())};
  }
  return r;
}

}  // namespace inferlab
