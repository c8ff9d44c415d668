#include "results/report.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <nlohmann/json.hpp>

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <map>
#include <optional>
#include <vector>

#include "results/statistics.h"

namespace inferlab {

namespace {

// Rounds first so that a value that prints as zero has no sign ("0.0", not "-0.0").
std::string fixed(double v, int digits, bool sign = false) {
  const double scale = std::pow(10.0, digits);
  double rounded = std::round(v * scale) / scale;
  if (rounded == 0) rounded = 0;
  return sign ? fmt::format("{:+.{}f}", rounded, digits) : fmt::format("{:.{}f}", rounded, digits);
}

std::string percent(double v) { return fixed(100 * v, 1); }
std::string mib(double v) { return fixed(v / (1024.0 * 1024.0), 1); }
std::string delta_points(double v, double base) { return fixed(100 * (v - base), 1, true); }
std::string ratio(double v, double base) { return base != 0 ? fixed(v / base, 2) + "×" : ""; }

using Table = ReportTable;

// One metric's column, and optionally a second one comparing it with dense.
struct MetricColumn {
  const char* metric;
  const char* header;
  std::string (*format)(double);
  const char* compare_header = nullptr;
  std::string (*compare)(double value, double baseline) = nullptr;
  // Columns of statistics from the stored samples, after the metric's own.
  void (*statistics)(Table& t, const std::vector<const StoredRun*>& runs, const StoredRun* baseline) = nullptr;
};

void accuracy_statistics(Table& t, const std::vector<const StoredRun*>& runs, const StoredRun* baseline);
void perplexity_statistics(Table& t, const std::vector<const StoredRun*>& runs, const StoredRun* baseline);
void answer_statistics(Table& t, const std::vector<const StoredRun*>& runs, const StoredRun* baseline);

const MetricColumn kColumns[] = {
    {"accuracy", "accuracy %", percent, "Δ pts", delta_points, accuracy_statistics},
    {"perplexity", "perplexity", [](double v) { return fixed(v, 2); }, "ppl ratio", ratio, perplexity_statistics},
    {"answer_logprob", "answer logprob", [](double v) { return fixed(v, 3); }, "Δ nats",
     [](double v, double base) { return fixed(v - base, 3, true); }, answer_statistics},
    {"answer_digit_accuracy", "digit acc %", percent, "Δ pts", delta_points},
    {"fidelity_top1", "top-1 agree %", percent},
    {"fidelity_kl", "KL nats", [](double v) { return fixed(v, 4); }},
    {"ttft_ms", "TTFT ms", [](double v) { return fixed(v, 1); }},
    {"tpot_mean_ms", "TPOT ms", [](double v) { return fixed(v, 2); }},
    {"keys_read_per_step", "keys read/step", [](double v) { return fixed(v, 1); }},
    {"sparse_prefill_keys_share", "sparse prefill keys %", percent},
    {"decode_tokens_per_s", "decode tok/s", [](double v) { return fixed(v, 1); }, "speedup", ratio},
    {"kv_bytes_peak", "KV MiB", mib, "KV ratio", ratio},
    {"peak_rss_bytes", "RSS MiB", mib},
};

std::string one_line(std::string s) {
  for (char& ch : s)
    if (ch == '\n' || ch == '\r') ch = ' ';
  return s;
}

// A label as a markdown table cell: one line, '|' escaped so it does not split the cell.
std::string cell_text(const std::string& s) {
  std::string out;
  for (char ch : one_line(s)) out += ch == '|' ? std::string("\\|") : std::string(1, ch);
  return out;
}

// Markdown, padded so it also reads well in a terminal.
std::string markdown_table(const Table& t) {
  std::vector<size_t> width(t.header.size());
  for (size_t i = 0; i < width.size(); ++i) {
    width[i] = std::max<size_t>(3, display_width(cell_text(t.header[i])));
    for (const auto& row : t.rows) width[i] = std::max(width[i], display_width(cell_text(row[i])));
  }
  const auto line = [&](auto&& text_of) {
    std::string s = "|";
    for (size_t i = 0; i < width.size(); ++i) {
      const std::string text = cell_text(text_of(i));
      const std::string fill(width[i] - display_width(text), ' ');
      s += " " + (t.right[i] ? fill + text : text + fill) + " |";
    }
    return s + "\n";
  };
  std::string out = line([&](size_t i) { return t.header[i]; });
  out += "|";
  for (size_t i = 0; i < width.size(); ++i)
    out += t.right[i] ? std::string(width[i] + 1, '-') + ":|" : ":" + std::string(width[i] + 1, '-') + "|";
  out += "\n";
  for (const auto& row : t.rows) out += line([&](size_t i) { return row[i]; });
  return out;
}

// ---- statistics over the stored samples ----------------------------------

// Solved or not, by sample index (samples with a right answer only).
std::map<int64_t, bool> outcomes(const StoredRun& run) {
  std::map<int64_t, bool> out;
  for (const StoredSample& s : run.samples)
    if (s.correct) out[s.index] = *s.correct;
  return out;
}

// Each sample's summed NLL and scored tokens (perplexity tasks): from the
// detail, or for older rows from its mean over the sample's tokens but the first.
void sample_nll(const StoredRun& run, std::vector<double>& nll, std::vector<int64_t>& count) {
  for (const StoredSample& s : run.samples) {
    const auto d = nlohmann::json::parse(s.detail_json, nullptr, false);
    if (d.is_discarded() || !d.is_object() || !d.contains("nll_mean")) continue;
    const int64_t n = d.contains("scored") ? d["scored"].get<int64_t>() : std::max<int64_t>(0, s.input_tokens - 1);
    nll.push_back(d.contains("nll_sum") ? d["nll_sum"].get<double>() : d["nll_mean"].get<double>() * double(n));
    count.push_back(n);
  }
}

std::string range(Interval i, double scale, int digits) {
  return fixed(scale * i.lo, digits) + "–" + fixed(scale * i.hi, digits);
}

// The intervals of the tables, also given to figures (accuracy_interval and the others below).
std::optional<Interval> wilson_of(const std::map<int64_t, bool>& outcomes) {
  int64_t solved = 0;
  for (const auto& [idx, ok] : outcomes) solved += ok;
  const int64_t n = int64_t(outcomes.size());
  if (n == 0) return std::nullopt;
  return wilson_interval(solved, n);
}

std::optional<Interval> perplexity_ci(const StoredRun& run) {
  std::vector<double> nll;
  std::vector<int64_t> count;
  sample_nll(run, nll, count);
  if (nll.size() < 2) return std::nullopt;
  return bootstrap_perplexity(nll, count);
}

std::optional<Interval> mean_ci(const std::vector<double>& values) {
  if (values.size() < 2) return std::nullopt;
  return bootstrap_mean(values);
}

// Accuracy's interval and sample count; against dense on the same samples, the
// ones the method lost and gained and McNemar's exact p.
void accuracy_statistics(Table& t, const std::vector<const StoredRun*>& runs, const StoredRun* baseline) {
  std::vector<std::map<int64_t, bool>> out;
  bool any = false;
  for (const StoredRun* run : runs) {
    out.push_back(outcomes(*run));
    any = any || !out.back().empty();
  }
  if (!any) return;
  const std::map<int64_t, bool> base = baseline ? outcomes(*baseline) : std::map<int64_t, bool>{};
  const bool paired = !base.empty();
  t.header.insert(t.header.end(), {"95% CI", "n"});
  t.right.insert(t.right.end(), {true, true});
  if (paired) {
    t.header.insert(t.header.end(), {"lost/gained", "McNemar p"});
    t.right.insert(t.right.end(), {true, true});
  }
  for (size_t r = 0; r < runs.size(); ++r) {
    const auto& o = out[r];
    const std::optional<Interval> ci = wilson_of(o);
    t.rows[r].push_back(ci ? range(*ci, 100, 1) : "");
    t.rows[r].push_back(ci ? std::to_string(o.size()) : "");
    if (!paired) continue;
    if (runs[r] == baseline || o.empty()) {
      t.rows[r].insert(t.rows[r].end(), {"", ""});
      continue;
    }
    int64_t lost = 0, gained = 0;
    for (const auto& [idx, ok] : o) {
      const auto b = base.find(idx);
      if (b == base.end()) continue;
      lost += b->second && !ok;
      gained += !b->second && ok;
    }
    t.rows[r].push_back(fmt::format("{}/{}", lost, gained));
    t.rows[r].push_back(fixed(mcnemar_exact_p(lost, gained), 3));
  }
}

// Perplexity's bootstrap interval over the samples (windows).
void perplexity_statistics(Table& t, const std::vector<const StoredRun*>& runs, const StoredRun*) {
  std::vector<std::string> cells;
  bool any = false;
  for (const StoredRun* run : runs) {
    const std::optional<Interval> ci = perplexity_ci(*run);
    any = any || ci.has_value();
    cells.push_back(ci ? range(*ci, 1, 2) : "");
  }
  if (!any) return;
  t.header.push_back("95% CI");
  t.right.push_back(true);
  for (size_t r = 0; r < runs.size(); ++r) t.rows[r].push_back(cells[r]);
}

// A sample field of the stored details, by sample index (samples that have it).
std::map<int64_t, double> sample_values(const StoredRun& run, const char* field) {
  std::map<int64_t, double> out;
  for (const StoredSample& s : run.samples) {
    const auto d = nlohmann::json::parse(s.detail_json, nullptr, false);
    if (d.is_object() && d.contains(field) && d[field].is_number()) out[s.index] = d[field].get<double>();
  }
  return out;
}

// The answer log-probability's bootstrap interval over samples; against dense,
// the interval of the mean paired difference on the same samples.
void answer_statistics(Table& t, const std::vector<const StoredRun*>& runs, const StoredRun* baseline) {
  std::vector<std::map<int64_t, double>> values;
  for (const StoredRun* run : runs) values.push_back(sample_values(*run, "answer_logprob"));
  const std::map<int64_t, double> base = baseline ? sample_values(*baseline, "answer_logprob") : std::map<int64_t, double>{};
  const bool paired = !base.empty();
  t.header.insert(t.header.end(), {"95% CI", "n"});
  t.right.insert(t.right.end(), {true, true});
  if (paired) {
    t.header.push_back("Δ 95% CI");
    t.right.push_back(true);
  }
  for (size_t r = 0; r < runs.size(); ++r) {
    std::vector<double> v, diff;
    for (const auto& [idx, lp] : values[r]) {
      v.push_back(lp);
      if (const auto b = base.find(idx); b != base.end()) diff.push_back(lp - b->second);
    }
    const std::optional<Interval> ci = mean_ci(v), diff_ci = mean_ci(diff);
    t.rows[r].push_back(ci ? range(*ci, 1, 3) : "");
    t.rows[r].push_back(v.empty() ? "" : std::to_string(v.size()));
    if (paired) t.rows[r].push_back(runs[r] != baseline && diff_ci ? range(*diff_ci, 1, 3) : "");
  }
}

// ---- per-depth breakdown -----------------------------------------------

// Where a sample sits in a task's grid: its nominal length and depth.
struct GridCell {
  int64_t length = 0;
  double depth = 0;
  auto operator<=>(const GridCell&) const = default;
};

struct CellTally {
  int64_t solved = 0, n = 0;
  double logprob_sum = 0;
  int64_t logprob_n = 0;
};

// A run's samples by (length, depth); samples without a depth are left out.
// The nominal length is the "length" tag, or for older rows the id's "len<N>".
std::map<GridCell, CellTally> grid_tallies(const StoredRun& run) {
  std::map<GridCell, CellTally> out;
  for (const StoredSample& s : run.samples) {
    const auto d = nlohmann::json::parse(s.detail_json, nullptr, false);
    if (!d.is_object() || !d.contains("depth") || !d["depth"].is_number()) continue;
    GridCell cell{0, d["depth"].get<double>()};
    if (d.contains("length") && d["length"].is_number()) {
      cell.length = int64_t(d["length"].get<double>());
    } else if (d.contains("id") && d["id"].is_string()) {
      const std::string id = d["id"].get<std::string>();
      if (id.starts_with("len")) cell.length = std::atoll(id.c_str() + 3);
    }
    CellTally& c = out[cell];
    if (s.correct) c.solved += *s.correct, ++c.n;
    if (d.contains("answer_logprob") && d["answer_logprob"].is_number())
      c.logprob_sum += d["answer_logprob"].get<double>(), ++c.logprob_n;
  }
  return out;
}


ReportBlock heading(int level, std::string text, int group) {
  ReportBlock b;
  b.kind = ReportBlock::Kind::Heading;
  b.level = level;
  b.text = std::move(text);
  b.group = group;
  return b;
}

ReportBlock paragraph(std::string text, int group) {
  ReportBlock b;
  b.text = std::move(text);
  b.group = group;
  return b;
}

ReportBlock table_block(Table t, int group) {
  ReportBlock b;
  b.kind = ReportBlock::Kind::Table;
  b.table = std::move(t);
  b.group = group;
  return b;
}

ReportBlock list_block(std::string intro, std::vector<std::string> items, int group) {
  ReportBlock b;
  b.kind = ReportBlock::Kind::List;
  b.text = std::move(intro);
  b.items = std::move(items);
  b.group = group;
  return b;
}

// One table per length: methods by depth, each cell "solved/n" and, where
// recorded, the mean answer log-probability. None when the task has one depth.
void depth_tables(const std::vector<const StoredRun*>& runs, int group, std::vector<ReportBlock>& out) {
  std::vector<std::map<GridCell, CellTally>> tallies;
  std::map<int64_t, std::vector<double>> depths;  // by length, sorted
  for (const StoredRun* run : runs) {
    tallies.push_back(grid_tallies(*run));
    for (const auto& [cell, tally] : tallies.back()) {
      auto& d = depths[cell.length];
      if (std::find(d.begin(), d.end(), cell.depth) == d.end()) d.insert(std::upper_bound(d.begin(), d.end(), cell.depth), cell.depth);
    }
  }
  for (const auto& [length, ds] : depths) {
    if (ds.size() < 2) continue;
    Table t{{"method"}, {false}, std::vector<std::vector<std::string>>(runs.size())};
    for (double depth : ds) {
      t.header.push_back(fmt::format("depth {}", format_real(depth)));
      t.right.push_back(true);
    }
    for (size_t r = 0; r < runs.size(); ++r) {
      t.rows[r].push_back(one_line(runs[r]->label));
      for (double depth : ds) {
        const auto it = tallies[r].find(GridCell{length, depth});
        if (it == tallies[r].end()) {
          t.rows[r].push_back("");
          continue;
        }
        const CellTally& c = it->second;
        std::string text = c.n > 0 ? fmt::format("{}/{}", c.solved, c.n) : "";
        if (c.logprob_n > 0) text += (text.empty() ? "" : ", ") + fixed(c.logprob_sum / double(c.logprob_n), 2);
        t.rows[r].push_back(text);
      }
    }
    const bool logprob = std::any_of(tallies.begin(), tallies.end(), [](const auto& m) {
      return std::any_of(m.begin(), m.end(), [](const auto& e) { return e.second.logprob_n > 0; });
    });
    out.push_back(paragraph(fmt::format("By depth{}: solved/n{}", length > 0 ? fmt::format(", {} tokens", length) : "",
                                        logprob ? ", mean answer logprob (nats)" : ""),
                            group));
    out.push_back(table_block(std::move(t), group));
  }
}

// runs: the task's finished runs, baseline first; baseline may be null.
Table task_table(const std::vector<const StoredRun*>& runs, const StoredRun* baseline) {
  Table t{{"method"}, {false}, std::vector<std::vector<std::string>>(runs.size())};
  for (size_t r = 0; r < runs.size(); ++r) t.rows[r].push_back(one_line(runs[r]->label));
  for (const MetricColumn& col : kColumns) {
    bool present = false;
    for (const StoredRun* run : runs) present = present || run_metric(*run, col.metric).has_value();
    if (!present) continue;
    const std::optional<double> base = baseline ? run_metric(*baseline, col.metric) : std::nullopt;
    const bool compare = col.compare != nullptr && base.has_value();
    t.header.push_back(col.header);
    t.right.push_back(true);
    if (compare) {
      t.header.push_back(col.compare_header);
      t.right.push_back(true);
    }
    for (size_t r = 0; r < runs.size(); ++r) {
      const std::optional<double> v = run_metric(*runs[r], col.metric);
      t.rows[r].push_back(v ? col.format(*v) : "");
      if (compare) t.rows[r].push_back(v ? col.compare(*v, *base) : "");
    }
    if (col.statistics != nullptr) col.statistics(t, runs, baseline);
  }
  return t;
}

// " engine.x=1 plugin.y=2": what the method reports it did.
std::string counters_of(const StoredRun& run) {
  std::string counters;
  for (const auto& [name, m] : run.metrics)
    if (name.starts_with("plugin.") || name.starts_with("engine."))
      counters += fmt::format(" {}={}", name, format_real(m.value));
  return counters;
}

// One line per run, so a method that silently did nothing is visible.
ReportBlock counter_lines(const std::vector<const StoredRun*>& runs, int group) {
  std::vector<std::string> items;
  bool any = false;
  for (const StoredRun* run : runs) {
    const std::string counters = counters_of(*run);
    any = any || !counters.empty();
    items.push_back(fmt::format("{}:{}", one_line(run->label), counters.empty() ? " none reported" : counters));
  }
  if (!any) return paragraph("Plugin counters: none reported by any run.", group);
  return list_block("Plugin counters:", std::move(items), group);
}

// A run's task parameters as recorded in its configuration (null when none).
nlohmann::json task_params(const StoredRun& run) {
  if (run.config_json.empty()) return nullptr;
  const auto config = nlohmann::json::parse(run.config_json, nullptr, false);
  if (config.is_discarded() || !config.is_object() || !config.contains("task")) return nullptr;
  const auto& task = config["task"];
  return task.is_object() && task.contains("params") ? task["params"] : nlohmann::json();
}

// A parameter value as a title shows it: a one-element list as its element, strings bare.
std::string param_text(const nlohmann::json& v) {
  if (v.is_array() && v.size() == 1) return param_text(v[0]);
  return v.is_string() ? v.get<std::string>() : v.dump();
}

void task_section(const ReportGroup& g, int group, std::vector<ReportBlock>& out) {
  out.push_back(heading(2, g.title, group));
  if (g.baseline == nullptr) out.push_back(paragraph("No dense baseline finished for this task: no comparisons.", group));
  out.push_back(table_block(task_table(g.runs, g.baseline), group));
  if (g.superseded > 0)
    out.push_back(paragraph(fmt::format("{} earlier run{} of the same method and task (another configuration hash) {} "
                                        "the latest run's row.",
                                        g.superseded, g.superseded == 1 ? "" : "s",
                                        g.superseded == 1 ? "gives way to" : "give way to"),
                            group));
  depth_tables(g.runs, group, out);
  out.push_back(counter_lines(g.runs, group));
}

// "model: a · backend: cpu · ...", each field listing its distinct values.
std::string provenance(const std::vector<const StoredRun*>& runs) {
  const std::pair<const char*, std::string StoredRun::*> fields[] = {{"model", &StoredRun::model},
                                                                     {"backend", &StoredRun::backend},
                                                                     {"device", &StoredRun::device},
                                                                     {"git", &StoredRun::git_revision}};
  std::vector<std::string> parts;
  for (const auto& [name, member] : fields) {
    std::vector<std::string> values;
    for (const StoredRun* run : runs)
      if (!(run->*member).empty() && std::find(values.begin(), values.end(), run->*member) == values.end())
        values.push_back(run->*member);
    if (!values.empty()) parts.push_back(fmt::format("{}: {}", name, fmt::join(values, ", ")));
  }
  return fmt::format("{}", fmt::join(parts, " · "));
}

std::string known_experiments(const std::vector<ExperimentInfo>& all) {
  if (all.empty()) return "none";
  std::vector<std::string> names;
  for (const auto& e : all) names.push_back(fmt::format("{} ({} run{})", e.name, e.runs, e.runs == 1 ? "" : "s"));
  return fmt::format("{}", fmt::join(names, ", "));
}

Result<const ExperimentInfo*> find_experiment(const ResultsDb& db, const std::vector<ExperimentInfo>& all,
                                              const std::string& wanted) {
  if (all.empty())
    return Error{fmt::format("{}: no experiments recorded yet; run one with `inferlab run <config.toml>`",
                             db.path().string())};
  if (wanted.empty()) return &all.front();  // most recently created
  for (const auto& e : all)
    if (e.name == wanted) return &e;
  return Error{fmt::format("{}: no experiment named '{}'; known experiments: {}", db.path().string(), wanted,
                           known_experiments(all))};
}

void failed_section(const std::vector<StoredRun>& runs, std::vector<ReportBlock>& out) {
  std::vector<std::string> items;
  for (const StoredRun& run : runs)
    if (run.status != RunStatus::Finished)
      items.push_back(fmt::format("{} ({}): {}", one_line(run.label), run.task, one_line(run.error)));
  if (items.empty()) return;
  out.push_back(heading(2, "Failed runs", -1));
  out.push_back(list_block("", std::move(items), -1));
}

}  // namespace

std::optional<double> run_metric(const StoredRun& run, const std::string& name) {
  const auto it = run.metrics.find(name);
  if (it == run.metrics.end() || std::isnan(it->second.value)) return std::nullopt;
  return it->second.value;
}

std::optional<Interval> accuracy_interval(const StoredRun& run) { return wilson_of(outcomes(run)); }

std::optional<Interval> perplexity_interval(const StoredRun& run) { return perplexity_ci(run); }

std::optional<Interval> answer_logprob_interval(const StoredRun& run) {
  std::vector<double> v;
  for (const auto& [idx, lp] : sample_values(run, "answer_logprob")) v.push_back(lp);
  return mean_ci(v);
}

Result<ReportData> load_report(ResultsDb& db, const std::string& experiment) {
  auto all = db.experiments();
  if (!all) return all.error();
  auto found = find_experiment(db, *all, experiment);
  if (!found) return found.error();
  ReportData data;
  data.experiment = **found;
  data.db_path = db.path().string();
  auto runs = db.experiment_runs(data.experiment.name);
  if (!runs) return runs.error();
  data.runs = std::move(*runs);

  std::vector<std::string> backends;
  for (const StoredRun& run : data.runs)
    if (run.status == RunStatus::Finished && std::find(backends.begin(), backends.end(), run.backend) == backends.end())
      backends.push_back(run.backend);
  // A section per task configuration: runs of one task type with different
  // task parameters (two question protocols, say) are compared only with the
  // baseline of theirs, and runs on two backends with their own backend's.
  std::vector<ReportGroup>& groups = data.groups;  // in order of first appearance
  bool any_finished = false;
  for (const StoredRun& run : data.runs) {
    if (run.status != RunStatus::Finished) continue;
    any_finished = true;
    const nlohmann::json params = task_params(run);
    auto it = std::find_if(groups.begin(), groups.end(), [&](const ReportGroup& g) {
      return g.task == run.task && g.params == params && (backends.size() < 2 || g.backend == run.backend);
    });
    if (it == groups.end()) {
      it = groups.insert(groups.end(), ReportGroup{});
      it->task = run.task;
      it->backend = run.backend;
      it->params = params;
    }
    // A method run again under another configuration hash (a parameter added
    // with its default, say) keeps one row: the latest.
    auto same = std::find_if(it->runs.begin(), it->runs.end(),
                             [&](const StoredRun* r) { return r->label == run.label && r->baseline == run.baseline; });
    if (same == it->runs.end()) {
      it->runs.push_back(&run);
    } else {
      if (run.finished_at >= (*same)->finished_at) *same = &run;
      ++it->superseded;
    }
  }
  if (!any_finished)
    return Error{fmt::format("{}: experiment '{}' has no finished runs ({} failed; see `inferlab query`); known "
                             "experiments: {}", db.path().string(), data.experiment.name, data.runs.size(),
                             known_experiments(*all))};
  for (ReportGroup& g : groups) {
    // Dense first, then grid order.
    for (const StoredRun* run : g.runs)
      if (run->baseline && g.baseline == nullptr) g.baseline = run;
    if (g.baseline != nullptr) {
      std::stable_partition(g.runs.begin(), g.runs.end(), [&](const StoredRun* r) { return r == g.baseline; });
    }
    // The title names what tells the sections of one task type apart.
    std::vector<std::string> differing;
    for (const auto& [key, value] : g.params.items())
      for (const ReportGroup& other : groups)
        if (&other != &g && other.task == g.task && other.params.value(key, nlohmann::json()) != value) {
          differing.push_back(fmt::format("{} = {}", key, param_text(value)));
          break;
        }
    if (backends.size() > 1) differing.push_back(g.backend);
    g.title = differing.empty() ? g.task : fmt::format("{} ({})", g.task, fmt::join(differing, ", "));
  }
  return data;
}

std::vector<ReportBlock> report_blocks(const ReportData& data) {
  std::vector<ReportBlock> out;
  out.push_back(heading(1, data.experiment.name, -1));
  if (!data.experiment.description.empty()) out.push_back(paragraph(one_line(data.experiment.description), -1));
  std::vector<const StoredRun*> finished;
  for (const StoredRun& run : data.runs)
    if (run.status == RunStatus::Finished) finished.push_back(&run);
  out.push_back(paragraph(provenance(finished), -1));
  for (size_t g = 0; g < data.groups.size(); ++g) task_section(data.groups[g], int(g), out);
  failed_section(data.runs, out);
  return out;
}

std::string render_markdown(const std::vector<ReportBlock>& blocks) {
  std::string out;
  for (const ReportBlock& b : blocks) {
    switch (b.kind) {
      case ReportBlock::Kind::Heading:
        out += std::string(size_t(std::max(1, b.level)), '#') + " " + b.text + "\n\n";
        break;
      case ReportBlock::Kind::Paragraph:
        out += b.text + "\n\n";
        break;
      case ReportBlock::Kind::Table:
        out += markdown_table(b.table) + "\n";
        break;
      case ReportBlock::Kind::List:
        if (!b.text.empty()) out += b.text + "\n";
        for (const std::string& item : b.items) out += "- " + item + "\n";
        out += "\n";
        break;
    }
  }
  return out;
}

Result<std::string> render_report(ResultsDb& db, const std::string& experiment) {
  auto data = load_report(db, experiment);
  if (!data) return data.error();
  return render_markdown(report_blocks(*data));
}

}  // namespace inferlab
