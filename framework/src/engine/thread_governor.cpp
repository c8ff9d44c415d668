#include "engine/thread_governor.h"

#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <fstream>
#include <string>

namespace inferlab {

namespace {

constexpr double kBusyCores = 0.25;     // other processes above this: worth a probe
constexpr double kIdleCores = 0.10;     // below this while running fewer threads: try all again
constexpr int64_t kMinInterval = 16;    // calls between probes
constexpr int64_t kMaxInterval = 512;   // ... growing to this while the choice holds
constexpr int32_t kBlockCalls = 4;      // a probe: this many calls at the current count, then at the other;
                                        // each block's first call is not counted (threads settling)
constexpr double kSwitchGain = 0.85;    // the other count must be 15% faster

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

ThreadGovernor::ThreadGovernor(int32_t max_threads)
    : max_threads_(std::max(1, max_threads)), current_(max_threads_), interval_(kMinInterval) {}

void ThreadGovernor::observe_load(double other_cores) {
  if (max_threads_ == 1 || probe_step_ >= 0 || calls_ < next_probe_at_) return;
  const bool worth = current_ == max_threads_ ? other_cores >= kBusyCores : other_cores < kIdleCores;
  if (!worth) return;
  probe_step_ = 0;
  probe_[0].clear();
  probe_[1].clear();
  ++probes_;
}

int32_t ThreadGovernor::next_call() {
  ++calls_;
  if (probe_step_ < kBlockCalls) return current_;  // also when not probing (-1)
  return current_ == max_threads_ ? 1 : max_threads_;
}

void ThreadGovernor::record(double seconds) {
  if (probe_step_ < 0) return;
  if (probe_step_ % kBlockCalls != 0) probe_[size_t(probe_step_ / kBlockCalls)].push_back(seconds);
  if (++probe_step_ < 2 * kBlockCalls) return;
  probe_step_ = -1;
  if (median(probe_[1]) < kSwitchGain * median(probe_[0])) {
    current_ = current_ == max_threads_ ? 1 : max_threads_;
    ++switches_;
    interval_ = kMinInterval;
  } else {
    interval_ = std::min(kMaxInterval, interval_ * 2);
  }
  next_probe_at_ = calls_ + interval_;
}

double OtherLoad::sample() {
  std::ifstream stat("/proc/stat");
  std::string cpu;
  uint64_t v[8] = {};
  if (!(stat >> cpu) || cpu != "cpu") return 0;
  for (auto& x : v) stat >> x;  // user nice system idle iowait irq softirq steal
  const uint64_t busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7], total = busy + v[3] + v[4];
  rusage self{};
  getrusage(RUSAGE_SELF, &self);
  const double own = double(self.ru_utime.tv_sec + self.ru_stime.tv_sec) +
                     1e-6 * double(self.ru_utime.tv_usec + self.ru_stime.tv_usec);
  const bool primed = primed_;
  const uint64_t d_busy = busy - busy_, d_total = total - total_;
  const double d_own = own - own_;
  busy_ = busy, total_ = total, own_ = own, primed_ = true;
  if (!primed || d_total == 0) return 0;
  const double hz = double(sysconf(_SC_CLK_TCK)), cores = double(std::max(1L, sysconf(_SC_NPROCESSORS_ONLN)));
  const double wall = double(d_total) / hz / cores;  // seconds that passed
  return wall > 0 ? std::max(0.0, double(d_busy) / hz - d_own) / wall : 0;
}

}  // namespace inferlab
