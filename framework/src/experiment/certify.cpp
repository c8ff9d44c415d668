#include "experiment/certify.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <numeric>
#include <random>

#include "experiment/risk_control.h"
#include "inferlab/train.h"

namespace inferlab {

namespace {

// One grid point: the parameter's value and each sample's loss, by sample index.
struct Point {
  double value = 0;
  std::string label;
  std::vector<double> losses;
};

double as_number(const ParamValue& v) {
  return std::holds_alternative<double>(v) ? std::get<double>(v) : double(std::get<int64_t>(v));
}

// The runs of the method's grid: its plugin, and its single-valued axes' values.
std::vector<const RunSpec*> method_runs(const ExperimentConfig& config, const std::vector<RunSpec>& grid) {
  const LttSection& l = *config.ltt;
  const auto m = std::find_if(config.methods.begin(), config.methods.end(),
                              [&](const MethodSection& s) { return s.label == l.method; });
  std::vector<const RunSpec*> out;
  if (m == config.methods.end()) return out;
  for (const RunSpec& run : grid) {
    if (run.baseline || run.plugin != m->plugin) continue;
    bool same = true;
    for (const auto& [name, values] : m->axes)
      if (name != l.parameter && !(run.params.all().at(name) == values.front())) same = false;
    if (same) out.push_back(&run);
  }
  return out;
}

std::string quoted(const std::string& s) {
  std::string out = "'";
  for (const char c : s) out += c == '\'' ? std::string("''") : std::string(1, c);
  return out + "'";
}

Result<std::vector<double>> sample_losses(ResultsDb& db, const RunSpec& run, const std::string& metric) {
  auto rows = db.query("SELECT s.idx, s.detail_json, r.status FROM samples s JOIN runs r ON r.id = s.run_id "
                       "WHERE r.hash = " + quoted(run.hash) + " ORDER BY s.idx");
  if (!rows) return rows.error();
  if (rows->rows.empty())
    return Error{fmt::format("ltt: run \"{}\" has no samples in {}: run `inferlab run` on the config first", run.label,
                             db.path().string())};
  std::vector<double> losses;
  for (const auto& row : rows->rows) {
    if (row[2].value_or("") != "finished")
      return Error{fmt::format("ltt: run \"{}\" is {}, not finished", run.label, row[2].value_or("?"))};
    const auto detail = nlohmann::json::parse(row[1].value_or(""), nullptr, false);
    const auto it = detail.is_object() ? detail.find(metric) : detail.end();
    if (it == detail.end() || !it->is_number())
      return Error{fmt::format("ltt.metric: sample {} of run \"{}\" has no number \"{}\" (the task's samples hold: {})",
                               row[0].value_or("?"), run.label, metric, row[1].value_or(""))};
    const double v = it->get<double>();
    if (!(v >= 0.0 && v <= 1.0))
      return Error{fmt::format("ltt.metric: \"{}\" = {} in sample {} of run \"{}\" is outside [0, 1]", metric, v,
                               row[0].value_or("?"), run.label)};
    losses.push_back(1.0 - v);
  }
  return losses;
}

std::vector<int64_t> split_order(int64_t n, uint64_t seed) {
  std::vector<int64_t> order(static_cast<size_t>(n));
  std::iota(order.begin(), order.end(), 0);
  std::mt19937_64 rng(seed);
  train::shuffle(order, rng);
  return order;
}

}  // namespace

Result<LttOutcome> certify_by_ltt(const ExperimentConfig& config, const std::vector<RunSpec>& grid, ResultsDb& db,
                                  std::FILE* out) {
  if (!config.ltt) return Error{"ltt: the config has no [ltt] table"};
  const LttSection& l = *config.ltt;
  std::vector<Point> points;
  for (const RunSpec* run : method_runs(config, grid)) {
    auto losses = sample_losses(db, *run, l.metric);
    if (!losses) return losses.error();
    points.push_back({as_number(run->params.all().at(l.parameter)), run->label, std::move(*losses)});
  }
  if (points.empty()) return Error{fmt::format("ltt.method: no run of method \"{}\" in the grid", l.method)};
  std::sort(points.begin(), points.end(), [&](const Point& a, const Point& b) {
    return l.order == "descending" ? a.value > b.value : a.value < b.value;
  });
  const auto n = int64_t(points.front().losses.size());
  for (const Point& p : points)
    if (int64_t(p.losses.size()) != n)
      return Error{fmt::format("ltt: run \"{}\" has {} samples, \"{}\" {}", p.label, p.losses.size(),
                               points.front().label, n)};
  if (l.calibration_samples >= n)
    return Error{fmt::format("ltt.calibration_samples: {} of the task's {} samples leaves none held out",
                             l.calibration_samples, n)};
  std::vector<std::vector<double>> losses;
  for (const Point& p : points) losses.push_back(p.losses);

  // One split: its certificate and the held-out risk of the value it certified.
  struct Split {
    ltt::Certificate certificate;
    double held_out = 0;
  };
  auto run_split = [&](uint64_t seed) {
    const std::vector<int64_t> order = split_order(n, seed);
    const std::span<const int64_t> calibration(order.data(), size_t(l.calibration_samples));
    const std::span<const int64_t> held_out(order.data() + l.calibration_samples, size_t(n - l.calibration_samples));
    Split s;
    s.certificate = ltt::fixed_sequence(losses, calibration, l.delta, l.epsilon);
    if (s.certificate.chosen >= 0) s.held_out = ltt::mean_loss(losses[size_t(s.certificate.chosen)], held_out);
    return s;
  };

  LttOutcome outcome;
  const Split first = run_split(uint64_t(l.seed));
  fmt::print(out, "ltt: {} \"{}\" over {} samples ({} calibration, {} held out), delta {}, epsilon {}, loss 1 - {}\n",
             l.parameter, l.method, n, l.calibration_samples, n - l.calibration_samples, l.delta, l.epsilon, l.metric);
  fmt::print(out, "  {:>10}  {:>16}  {:>10}\n", l.parameter, "calibration risk", "p-value");
  for (size_t j = 0; j < first.certificate.p_values.size(); ++j)
    fmt::print(out, "  {:>10.4g}  {:>16.4f}  {:>10.3g}{}\n", points[j].value, first.certificate.risks[j],
               first.certificate.p_values[j], int64_t(j) == first.certificate.chosen ? "  <- certified" : "");
  std::error_code ec;
  std::filesystem::create_directories(std::filesystem::path(l.output).parent_path(), ec);
  std::ofstream table(l.output + ".splits.tsv.tmp");
  table << "split\tseed\tcertified\tcalibration_risk\theld_out_risk\tviolation\n";
  for (int64_t k = 0; k < l.splits; ++k) {
    const Split s = k == 0 ? first : run_split(uint64_t(l.seed) + uint64_t(k));
    const int64_t c = s.certificate.chosen;
    ++outcome.splits;
    if (c < 0) {
      ++outcome.abstentions;
      table << k << '\t' << l.seed + k << "\tnone\t\t\t0\n";
      continue;
    }
    const bool violated = s.held_out > l.delta;
    outcome.violations += violated;
    table << k << '\t' << l.seed + k << '\t' << points[size_t(c)].value << '\t' << s.certificate.risks[size_t(c)]
          << '\t' << s.held_out << '\t' << int(violated) << '\n';
  }
  table.close();
  if (!table) return Error{fmt::format("ltt: cannot write {}.splits.tsv", l.output)};
  std::filesystem::rename(l.output + ".splits.tsv.tmp", l.output + ".splits.tsv", ec);
  if (ec) return Error{fmt::format("ltt: cannot write {}.splits.tsv: {}", l.output, ec.message())};
  fmt::print(out, "  {} of {} splits: held-out risk above delta {} (epsilon {}); {} certified nothing\n",
             outcome.violations, outcome.splits, l.delta, l.epsilon, outcome.abstentions);
  if (first.certificate.chosen < 0)
    return Error{fmt::format("ltt: no value of {} is certified at delta {} (the safest, {}, has calibration risk {:.4f}, "
                             "p-value {:.3g} > epsilon {}); {} is left as it was",
                             l.parameter, l.delta, points.front().value, first.certificate.risks.front(),
                             first.certificate.p_values.front(), l.epsilon, l.output)};
  const Point& chosen = points[size_t(first.certificate.chosen)];
  outcome.certified = true;
  outcome.value = chosen.value;
  outcome.held_out_risk = first.held_out;
  // The certificate, written beside and renamed over the file the method reads.
  const std::string tmp = l.output + ".tmp";
  {
    std::ofstream f(tmp);
    f << "# inferlab calibrate: Learn then Test (Hoeffding-Bentkus p-values, fixed-sequence testing)\n"
      << "# experiment " << config.name << ", method " << l.method << ", loss 1 - " << l.metric << "\n"
      << l.parameter << ' ' << fmt::format("{}", chosen.value) << '\n'
      << "delta " << l.delta << "\nepsilon " << l.epsilon << "\ncalibration_samples " << l.calibration_samples
      << "\nheld_out_samples " << n - l.calibration_samples << "\ncalibration_risk "
      << first.certificate.risks[size_t(first.certificate.chosen)] << "\nheld_out_risk " << first.held_out
      << "\nseed " << l.seed << '\n';
    if (!f) return Error{fmt::format("ltt: cannot write {}", tmp)};
  }
  std::filesystem::rename(tmp, l.output, ec);
  if (ec) return Error{fmt::format("ltt: cannot write {}: {}", l.output, ec.message())};
  fmt::print(out, "  certified {} = {} (held-out risk {:.4f}) -> {}\n", l.parameter, chosen.value, first.held_out,
             l.output);
  return outcome;
}

}  // namespace inferlab
