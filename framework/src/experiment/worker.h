// Worker processes: `inferlab run` executes runs in a worker, so a plugin that
// crashes, aborts, hangs or exhausts memory fails only its own run
// (experiment/runner.cpp drives them). A worker is the inferlab executable
// started anew (posix_spawn, a fork+exec: a bare fork of a process whose
// OpenMP or CUDA runtime has started is not safe) as
// `inferlab run CONFIG --worker ...`, with two descriptors from its parent:
//   fd 3  a socket: the parent sends the hash of each run to execute, the
//         worker answers with progress and then the run's record. Messages
//         are maps, each a 4-byte length and CBOR (a sample's text may hold
//         any bytes, a metric may be NaN: both cross unchanged, which JSON
//         text would not): to the worker {"run": hash}; from it {"event":
//         "ready", "device"} once it has opened the experiment, {"event":
//         "sample", "done"}, {"event": "record", "record"}, or {"event":
//         "error", "message"} when it cannot go on.
//   fd 4  a shared page, WorkerState: which plugin hook is under way and
//         whether an allocation failed, read by the parent after the worker
//         died however it died (no signal handler runs on SIGKILL).
// Only the parent writes the results database.
#pragma once

#include <sys/types.h>

#include <atomic>
#include <chrono>
#include <cstdint>
#include <memory>
#include <nlohmann/json.hpp>
#include <optional>
#include <string>
#include <vector>

#include "inferlab/result.h"
#include "results/database.h"

namespace inferlab {

struct WorkerState {
  std::atomic<int32_t> hook{-1};              // HookCall under way (experiment/tracked_method.h); -1: none
  std::atomic<int32_t> allocation_failed{0};  // operator new found no memory since the parent cleared it
};
static_assert(std::atomic<int32_t>::is_always_lock_free, "WorkerState is shared between processes");

inline constexpr int kWorkerChannelFd = 3;
inline constexpr int kWorkerStateFd = 4;

// This process's state: in a worker (after attach_worker) the page it shares
// with its parent, elsewhere a page of its own.
WorkerState& worker_state();

// Length-prefixed CBOR messages over a stream socket, which it owns.
class Channel {
 public:
  explicit Channel(int fd) : fd_(fd) {}
  ~Channel();
  Channel(const Channel&) = delete;
  Channel& operator=(const Channel&) = delete;

  Status send(const nlohmann::json& message);

  enum class Received { Message, Closed, TimedOut };
  // The next message (a map) into `message`; Closed when the other end is gone.
  // Without a deadline it waits as long as it takes.
  Result<Received> receive(nlohmann::json& message,
                           std::optional<std::chrono::steady_clock::time_point> deadline = std::nullopt);

 private:
  int fd_;
  std::vector<uint8_t> buffer_;  // bytes received, not yet a whole message
};

// The parent's side of a worker.
class WorkerProcess {
 public:
  // Starts `argv` (argv[0]: the executable) with a channel at fd 3 and a
  // cleared state page at fd 4; stdout and stderr are shared with this process.
  static Result<std::unique_ptr<WorkerProcess>> start(const std::vector<std::string>& argv);
  // Kills the worker if it still runs: an idle worker holds nothing the parent needs.
  ~WorkerProcess();
  WorkerProcess(const WorkerProcess&) = delete;
  WorkerProcess& operator=(const WorkerProcess&) = delete;

  Channel& channel() { return *channel_; }
  WorkerState& state() { return *state_; }
  // Waits for the worker to end (its channel closed): the wait status.
  int wait();
  // Ends it with SIGKILL: the wait status.
  int kill();

 private:
  WorkerProcess(pid_t pid, std::unique_ptr<Channel> channel, WorkerState* state)
      : pid_(pid), channel_(std::move(channel)), state_(state) {}
  pid_t pid_;
  bool reaped_ = false;
  int status_ = 0;
  std::unique_ptr<Channel> channel_;
  WorkerState* state_;  // mapped shared with the worker
};

// How a process ended, from its wait status: "was killed by SIGSEGV
// (Segmentation fault)", "exited with status 3".
std::string describe_exit(int wait_status);

// In a worker: the channel and state page its parent passed, with the
// memory it may allocate limited to `memory_limit_mb` beyond what it holds
// at the start (RLIMIT_DATA: private writable memory, what a runaway
// allocation grows; RLIMIT_AS would also count the read-only mapping of the
// model file and the address space a CUDA driver reserves without using it)
// and operator new flagging, in the state, an allocation the limit refused.
Result<std::unique_ptr<Channel>> attach_worker(int64_t memory_limit_mb);

// Nine tenths of physical memory: a worker that passes it fails its run
// before the system's out-of-memory killer picks a process, perhaps another one.
int64_t default_memory_limit_mb();
// This machine's physical memory in bytes (0: unknown).
int64_t physical_memory_bytes();

// A run's record as a message and back.
nlohmann::json record_to_json(const RunRecord& record);
Result<RunRecord> record_from_json(const nlohmann::json& json);

}  // namespace inferlab
