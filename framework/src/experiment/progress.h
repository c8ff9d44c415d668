// Progress of an experiment: on a terminal, one line redrawn in place (run i of
// N, samples done, elapsed, ETA); otherwise plain lines at run boundaries, so
// logs stay readable.
#pragma once

#include <chrono>
#include <cstdio>
#include <string>

namespace inferlab {

class Progress {
 public:
  Progress(std::FILE* out, int64_t total_runs, int64_t total_samples);

  void start_run(int64_t index, const std::string& title, int64_t samples);
  void sample_done(int64_t done);
  void end_run(const std::string& outcome);
  void note(const std::string& line);

 private:
  void redraw();
  std::string eta() const;

  std::FILE* out_;
  bool tty_;
  int64_t total_runs_, total_samples_;
  int64_t samples_before_ = 0;  // samples of runs already executed or skipped
  int64_t run_index_ = 0, run_samples_ = 0, run_done_ = 0;
  int64_t samples_timed_ = 0;   // samples executed in this process (for the rate)
  double seconds_timed_ = 0;
  std::string title_;
  std::chrono::steady_clock::time_point start_, run_start_;
};

std::string format_duration(double seconds);

}  // namespace inferlab
