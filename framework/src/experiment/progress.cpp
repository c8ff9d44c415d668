#include "experiment/progress.h"

#include <fmt/format.h>
#include <unistd.h>

namespace inferlab {

namespace {
double since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}
}  // namespace

std::string format_duration(double seconds) {
  const int64_t s = int64_t(seconds + 0.5);
  if (s >= 3600) return fmt::format("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60);
  return fmt::format("{:02}:{:02}", s / 60, s % 60);
}

Progress::Progress(std::FILE* out, int64_t total_runs, int64_t total_samples)
    : out_(out),
      tty_(out != nullptr && ::isatty(::fileno(out)) != 0),
      total_runs_(total_runs),
      total_samples_(total_samples),
      start_(std::chrono::steady_clock::now()) {}

void Progress::start_run(int64_t index, const std::string& title, int64_t samples) {
  run_index_ = index;
  run_samples_ = samples;
  run_done_ = 0;
  title_ = title;
  run_start_ = std::chrono::steady_clock::now();
  if (out_ == nullptr) return;
  if (tty_) {
    redraw();
  } else {
    fmt::print(out_, "[run {}/{}] {} ({} samples)\n", index, total_runs_, title, samples);
    std::fflush(out_);
  }
}

void Progress::sample_done(int64_t done) {
  run_done_ = done;
  if (tty_) redraw();
}

void Progress::end_run(const std::string& outcome) {
  const double seconds = since(run_start_);
  if (run_done_ > 0) {
    samples_timed_ += run_done_;
    seconds_timed_ += seconds;
  }
  samples_before_ += run_samples_;
  if (out_ == nullptr) return;
  if (tty_) std::fputs("\r\033[K", out_);
  fmt::print(out_, "[run {}/{}] {}: {} in {}\n", run_index_, total_runs_, title_, outcome, format_duration(seconds));
  std::fflush(out_);
}

void Progress::note(const std::string& line) {
  if (out_ == nullptr) return;
  if (tty_) std::fputs("\r\033[K", out_);
  fmt::print(out_, "{}\n", line);
  std::fflush(out_);
}

std::string Progress::eta() const {
  const int64_t done = samples_timed_ + run_done_;
  const double seconds = seconds_timed_ + since(run_start_);
  if (done == 0) return "--:--";
  const int64_t remaining = total_samples_ - samples_before_ - run_done_;
  return format_duration(seconds / double(done) * double(std::max<int64_t>(0, remaining)));
}

void Progress::redraw() {
  fmt::print(out_, "\r\033[K[run {}/{}] {} · sample {}/{} · {} elapsed · ETA {}", run_index_, total_runs_, title_,
             run_done_, run_samples_, format_duration(since(start_)), eta());
  std::fflush(out_);
}

}  // namespace inferlab
