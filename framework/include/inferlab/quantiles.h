// Quantiles of magnitudes seen in a stream (calibration): a histogram of |x|
// on log-spaced bins, so memory is fixed however many values arrive. Used to
// turn a target sparsity into a threshold (TEAL, CATS): the threshold below
// which a fraction p of the calibration values fell.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <span>
#include <string>
#include <vector>

#include "inferlab/result.h"

namespace inferlab {

class MagnitudeHistogram {
 public:
  // Bins span [kLow, kHigh) with a relative width of (kHigh / kLow)^(1 / kBins)
  // - 1, about 0.3%; exact zeros and smaller magnitudes share bin 0, larger
  // ones the last bin.
  static constexpr double kLow = 1e-8, kHigh = 1e4;
  static constexpr int32_t kBins = 8192;

  MagnitudeHistogram() : counts_(size_t(kBins) + 1, 0) {}

  void add(std::span<const float> values) {
    for (const float v : values) ++counts_[size_t(bin(std::fabs(double(v))))];
    total_ += int64_t(values.size());
  }
  void add(const MagnitudeHistogram& other) {
    for (size_t i = 0; i < counts_.size(); ++i) counts_[i] += other.counts_[i];
    total_ += other.total_;
  }
  int64_t count() const { return total_; }

  // The magnitude t with a fraction p of the values at or below it,
  // interpolated log-linearly inside its bin; 0 when p <= the fraction in
  // bin 0 (exact zeros and below kLow). p in [0, 1].
  double quantile(double p) const {
    if (total_ == 0 || p <= 0) return 0.0;
    const double target = std::min(p, 1.0) * double(total_);
    double below = double(counts_[0]);
    if (target <= below) return 0.0;
    for (int32_t b = 1; b <= kBins; ++b) {
      const double here = double(counts_[size_t(b)]);
      if (below + here >= target) {
        const double f = here > 0 ? (target - below) / here : 1.0;
        return edge(b - 1) * std::pow(edge(b) / edge(b - 1), f);
      }
      below += here;
    }
    return kHigh;
  }
  // The fraction of values at or below t (the inverse, to the same resolution).
  double fraction_below(double t) const {
    if (total_ == 0) return 0.0;
    const int32_t last = bin(t);
    int64_t n = 0;
    for (int32_t b = 0; b <= last; ++b) n += counts_[size_t(b)];
    return double(n) / double(total_);
  }
  const std::vector<int64_t>& counts() const { return counts_; }

 private:
  // Bin 0: below kLow; bin b in 1..kBins: [edge(b - 1), edge(b)).
  static int32_t bin(double m) {
    if (!(m >= kLow)) return 0;
    const double f = std::log(m / kLow) / std::log(kHigh / kLow);
    return std::clamp(int32_t(f * kBins) + 1, 1, int32_t(kBins));
  }
  static double edge(int32_t b) { return kLow * std::pow(kHigh / kLow, double(b) / kBins); }

  std::vector<int64_t> counts_;
  int64_t total_ = 0;
};

// A per-layer table of numbers as a calibration artifact: a header line of
// column names, then one line per layer ("layer" then the values), tab-separated.
inline Status write_layer_table(const std::string& path, const std::vector<std::string>& columns,
                                const std::vector<std::vector<double>>& rows) {
  std::ofstream out(path);
  out << "layer";
  for (const auto& c : columns) out << '\t' << c;
  out << '\n';
  out.precision(9);
  for (size_t l = 0; l < rows.size(); ++l) {
    out << l;
    for (const double v : rows[l]) out << '\t' << v;
    out << '\n';
  }
  out.flush();
  if (!out) return Error{"cannot write " + path};
  return ok_status();
}

// Reads what write_layer_table wrote: exactly `n_layers` rows of the named
// columns; anything else is refused naming the file and line.
inline Result<std::vector<std::vector<double>>> read_layer_table(const std::string& path,
                                                                 const std::vector<std::string>& columns,
                                                                 int32_t n_layers) {
  std::ifstream in(path);
  if (!in) return Error{"cannot read " + path};
  std::string line;
  std::string header = "layer";
  for (const auto& c : columns) header += "\t" + c;
  if (!std::getline(in, line) || line != header)
    return Error{path + ":1: expected the header \"" + header + "\""};
  std::vector<std::vector<double>> rows;
  for (int32_t l = 0; l < n_layers; ++l) {
    const std::string where = path + ":" + std::to_string(l + 2) + ": ";
    if (!std::getline(in, line)) return Error{where + "missing the row of layer " + std::to_string(l)};
    std::istringstream cells(line);
    int64_t layer = -1;
    if (!(cells >> layer) || layer != l) return Error{where + "expected layer " + std::to_string(l)};
    std::vector<double> row(columns.size());
    for (double& v : row)
      if (!(cells >> v) || !std::isfinite(v)) return Error{where + "expected " + std::to_string(columns.size()) + " numbers"};
    std::string extra;
    if (cells >> extra) return Error{where + "unexpected \"" + extra + "\""};
    rows.push_back(std::move(row));
  }
  if (std::getline(in, line) && !line.empty())
    return Error{path + ":" + std::to_string(n_layers + 2) + ": more rows than the model's " + std::to_string(n_layers) +
                 " layers"};
  return rows;
}

}  // namespace inferlab
