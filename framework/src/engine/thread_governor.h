// How many threads a decode-sized call of the CPU backend uses. Decode runs a
// few hundred short parallel regions per token; when another process holds a
// core, every region waits for the thread that shares it, and two threads end
// up slower than one. While other processes keep the machine busy (or while
// the governor runs fewer threads than it may), it probes now and then: calls
// alternate between the thread counts and it keeps the faster. On an idle
// machine it never probes, so decode there is unchanged.
// Results do not depend on the count: every kernel splits its work the same
// way whatever the number of threads.
#pragma once

#include <cstdint>
#include <vector>

namespace inferlab {

class ThreadGovernor {
 public:
  explicit ThreadGovernor(int32_t max_threads);

  // The CPU time other processes used lately, in cores (see OtherLoad).
  void observe_load(double other_cores);
  // Threads for the next decode-sized call; record() its wall time after it.
  int32_t next_call();
  void record(double seconds);

  int32_t current() const { return current_; }
  int64_t switches() const { return switches_; }
  int64_t probes() const { return probes_; }

 private:
  int32_t max_threads_;
  int32_t current_;
  int64_t calls_ = 0;
  int64_t next_probe_at_ = 0;     // no probe before this call
  int64_t interval_;              // calls between probes (doubles while a choice holds)
  int32_t probe_step_ = -1;       // -1: not probing; else the probe call's index
  std::vector<double> probe_[2];  // times with the current count, with the other
  int64_t switches_ = 0, probes_ = 0;
};

// CPU time the machine spent outside this process since the last call, in
// cores (Linux /proc/stat and getrusage); 0 where it cannot tell.
class OtherLoad {
 public:
  double sample();

 private:
  uint64_t busy_ = 0, total_ = 0;  // machine jiffies
  double own_ = 0;                 // this process's CPU seconds
  bool primed_ = false;
};

}  // namespace inferlab
