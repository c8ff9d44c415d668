// Experiment subcommands: run, calibrate, plugins, query, report, plot, merge.
#include <fmt/format.h>
#include <fmt/ranges.h>

#include <algorithm>
#include <cctype>
#include <cstdio>
#include <fstream>
#include <set>
#include <string>
#include <vector>

#include "cli/commands.h"
#include "experiment/runner.h"
#include "experiment/worker.h"
#include "plugins/plugin_host.h"
#include "results/database.h"
#include "results/figures.h"
#include "results/html_report.h"
#include "results/plot_tool.h"
#include "results/report.h"

namespace inferlab::cli {

namespace {

constexpr const char* kDefaultDb = "results/inferlab.db";

int fail(const std::string& message) {
  std::fprintf(stderr, "inferlab: %s\n", message.c_str());
  return 1;
}

struct RunArgs {
  std::string config;
  std::string db = kDefaultDb;
  std::string shard;
  bool dry_run = false;
  std::string backend;
  bool no_prefill_reuse = false;
  // A worker of a parent `inferlab run` (experiment/worker.h), with the parent's
  // memory limit, plugin folders and artifact folder.
  bool worker = false;
  int64_t memory_limit_mb = 0;
  std::vector<std::string> plugin_path;
  std::string artifact_dir;
};

int run_worker(const RunArgs& args, RunnerOptions options) {
  auto channel = attach_worker(args.memory_limit_mb);
  if (!channel) return fail(channel.message());
  options.plugin_path.assign(args.plugin_path.begin(), args.plugin_path.end());
  options.artifact_root = args.artifact_dir;
  options.progress = nullptr;  // the parent reports progress, warnings and errors
  return serve_runs(args.config, options, **channel, args.memory_limit_mb) ? 0 : 1;
}

int run_run(const RunArgs& args) {
  RunnerOptions options;
  options.db_path = args.db;
  options.shard = args.shard;
  options.dry_run = args.dry_run;
  options.backend = args.backend;
  options.reuse_prefill = !args.no_prefill_reuse;
  if (args.worker) return run_worker(args, options);
  // Workers run this very program: /proc/self/exe is the file this process
  // started from, even when a build has replaced it since.
  options.worker_executable = "/proc/self/exe";
  auto summary = run_experiment(args.config, options);
  if (!summary) return fail(summary.message());
  return summary->failed > 0 ? 1 : 0;
}

int run_calibrate(const RunArgs& args) {
  RunnerOptions options;
  options.backend = args.backend;
  options.db_path = args.db;
  options.worker_executable = "/proc/self/exe";  // an [ltt] table runs the grid, as `inferlab run` does
  auto summary = calibrate_experiment(args.config, options);
  return summary ? 0 : fail(summary.message());
}

std::string describe_default(const ParamSpec& p) {
  if (std::holds_alternative<std::string>(p.default_value)) return "\"" + std::get<std::string>(p.default_value) + "\"";
  return param_value_to_string(p.default_value);
}

std::string describe_range(const ParamSpec& p) {
  if (!p.choices.empty()) return fmt::format("one of {}", fmt::join(p.choices, "|"));
  if (!p.min && !p.max) return "";
  return fmt::format("{}..{}", p.min ? fmt::format("{}", *p.min) : "", p.max ? fmt::format("{}", *p.max) : "");
}

int run_plugins() {
  PluginRegistry registry;
  if (auto s = registry.scan(PluginRegistry::default_search_path()); !s) return fail(s.message());
  for (const PluginEntry& e : registry.entries()) {
    const auto hooks = hook_names(e.hooks);
    fmt::print("{} {}  {}\n", e.name, e.version, e.description);
    fmt::print("  file   {}\n", e.path);
    fmt::print("  hooks  {}\n", hooks.empty() ? "none" : fmt::format("{}", fmt::join(hooks, ", ")));
    if (e.params.empty()) fmt::print("  params none\n");
    for (const ParamSpec& p : e.params)
      fmt::print("  param  {:<18} {:<6} default {:<10} {:<14} {}\n", p.name, param_type_name(p.type),
                 describe_default(p), describe_range(p), p.help);
    fmt::print("\n");
  }
  for (const auto& problem : registry.problems()) std::fprintf(stderr, "inferlab: warning: %s\n", problem.c_str());
  if (registry.entries().empty()) return fail("no plugins found (searched $INFERLAB_PLUGIN_PATH and the plugins folder)");
  return 0;
}

Result<ResultsDb> open_existing(const std::string& path) {
  if (!std::filesystem::exists(path))
    return Error{fmt::format("{}: no results database here (run an experiment first, or pass --db)", path)};
  return ResultsDb::open(path);
}

int run_query(const std::string& db_path, const std::string& sql, bool csv, bool json) {
  auto db = open_existing(db_path);
  if (!db) return fail(db.message());
  auto result = db->query(sql);
  if (!result) return fail(result.message());
  const std::string text = csv ? format_csv(*result) : json ? format_json(*result) : format_table(*result);
  std::fwrite(text.data(), 1, text.size(), stdout);
  return 0;
}

struct ReportArgs {
  std::string db = kDefaultDb, experiment, html;
  bool no_figures = false;
};

struct PlotArgs {
  std::string db = kDefaultDb, experiment, out, spec;
  std::vector<std::string> formats = {"svg", "png"}, only;
  bool list = false;
};

// A file name for an experiment's figure: "<experiment>_<figure id>" without odd characters.
std::string figure_file(const std::string& experiment, const std::string& id) {
  std::string name;
  for (const char c : experiment) name += std::isalnum(static_cast<unsigned char>(c)) || c == '-' ? c : '-';
  return name + "_" + id;
}

Status write_file(const std::filesystem::path& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  out.close();
  if (!out) return Error{fmt::format("{}: cannot write it", path.string())};
  return ok_status();
}

// The HTML page: the report's tables and, unless --no-figures, its figures as SVG.
int run_report_html(const ReportArgs& args, const ReportData& data) {
  const nlohmann::json spec = figure_specs(data);
  const size_t count = spec["figures"].size();
  std::vector<HtmlFigure> figures;
  std::string note;
  if (args.no_figures) {
    note = fmt::format("Figures left out (--no-figures): {} figure{} of this experiment not drawn.", count,
                       count == 1 ? "" : "s");
  } else if (count == 0) {
    note = "No figures: no method has runs beside dense with a value to plot.";
  } else {
    auto tool = find_plot_tool();
    if (!tool)
      return fail(fmt::format("{}; nothing written to {} (--no-figures writes the tables alone)", tool.message(),
                              args.html));
    auto svgs = draw_svg_documents(*tool, spec);
    if (!svgs) return fail(fmt::format("{}; nothing written to {}", svgs.message(), args.html));
    for (size_t i = 0; i < count; ++i) {
      const auto& fig = spec["figures"][i];
      figures.push_back(HtmlFigure{fig["group"].get<int>(), fig["title"].get<std::string>(), std::move((*svgs)[i])});
    }
  }
  const std::string page = render_html(data, report_blocks(data), figures, note);
  if (auto s = write_file(args.html, page); !s) return fail(s.message());
  fmt::print("{}: report of {}, {} figure{}\n", args.html, data.experiment.name, figures.size(),
             figures.size() == 1 ? "" : "s");
  return 0;
}

int run_report(const ReportArgs& args) {
  auto db = open_existing(args.db);
  if (!db) return fail(db.message());
  auto data = load_report(*db, args.experiment);
  if (!data) return fail(data.message());
  if (!args.html.empty()) return run_report_html(args, *data);
  const std::string text = render_markdown(report_blocks(*data));
  std::fwrite(text.data(), 1, text.size(), stdout);
  return 0;
}

int run_plot(const PlotArgs& args) {
  auto db = open_existing(args.db);
  if (!db) return fail(db.message());
  auto data = load_report(*db, args.experiment);
  if (!data) return fail(data.message());
  nlohmann::json spec = figure_specs(*data);
  nlohmann::json& figures = spec["figures"];
  if (figures.empty())
    return fail(fmt::format("{}: experiment '{}': nothing to plot (figures need a method's finished runs beside "
                            "dense with a value to show)",
                            args.db, data->experiment.name));
  if (!args.only.empty()) {
    std::set<std::string> known;
    for (const auto& f : figures) known.insert(f["id"].get<std::string>());
    for (const std::string& id : args.only)
      if (known.count(id) == 0)
        return fail(fmt::format("experiment '{}' has no figure '{}'; its figures: {}", data->experiment.name, id,
                                fmt::join(known, ", ")));
    nlohmann::json kept = nlohmann::json::array();
    for (auto& f : figures)
      if (std::find(args.only.begin(), args.only.end(), f["id"].get<std::string>()) != args.only.end())
        kept.push_back(std::move(f));
    figures = std::move(kept);
  }
  for (auto& f : figures) f["file"] = figure_file(data->experiment.name, f["id"].get<std::string>());
  if (args.list) {
    for (const auto& f : figures) fmt::print("{}\t{}\n", f["id"].get<std::string>(), f["title"].get<std::string>());
    return 0;
  }
  if (!args.spec.empty()) {
    if (auto s = write_file(args.spec, spec.dump(1) + "\n"); !s) return fail(s.message());
    return 0;
  }
  if (args.out.empty()) return fail("plot: --out FOLDER is required (or --list, or --spec FILE)");
  auto tool = find_plot_tool();
  if (!tool) return fail(tool.message());
  std::error_code ec;
  std::filesystem::create_directories(args.out, ec);
  if (ec) return fail(fmt::format("{}: cannot make the folder: {}", args.out, ec.message()));
  auto files = draw_figures(*tool, spec, args.out, args.formats);
  if (!files) return fail(files.message());
  for (const auto& f : *files) fmt::print("{}\n", f.string());
  return 0;
}

int run_merge(const std::string& out, const std::vector<std::string>& inputs) {
  auto db = ResultsDb::open(out);
  if (!db) return fail(db.message());
  for (const auto& in : inputs) {
    if (!std::filesystem::exists(in)) return fail(fmt::format("{}: no such database", in));
    auto added = db->merge_from(in);
    if (!added) return fail(added.message());
    fmt::print("{}: {} runs added\n", in, *added);
  }
  return 0;
}

}  // namespace

void register_experiment_commands(CLI::App& app) {
  static RunArgs run;
  auto* r = app.add_subcommand("run", "run an experiment config (skips runs already in the database)");
  r->add_option("config", run.config, "experiment .toml file")->required();
  r->add_option("--db", run.db, "results database")->capture_default_str();
  r->add_option("--shard", run.shard, "run only shard i of N of the grid, as i/N (1-based)");
  r->add_flag("--dry-run", run.dry_run, "list the runs (and which are done) without running");
  r->add_option("--backend", run.backend, "override experiment.backend: cpu, cuda or auto")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  r->add_flag("--no-prefill-reuse", run.no_prefill_reuse,
              "recompute every prefill (by default methods with a dense prefill start from a saved one)");
  // How `inferlab run` starts its workers; not for people (an empty group hides them from --help).
  r->add_flag("--worker", run.worker, "run as a worker of a parent inferlab run")->group("");
  r->add_option("--memory-limit-mb", run.memory_limit_mb, "memory the worker may allocate (MB)")->group("");
  r->add_option("--plugin-path", run.plugin_path, "a plugin folder or file a worker loads")->group("");
  r->add_option("--artifact-dir", run.artifact_dir, "a worker's artifact folder")->group("");
  r->callback([] { set_exit_code(run_run(run)); });

  static RunArgs calibrate;
  auto* cal = app.add_subcommand("calibrate", "run the calibrations a config's methods need, ahead of `run`");
  cal->add_option("config", calibrate.config, "experiment .toml file")->required();
  cal->add_option("--backend", calibrate.backend, "override experiment.backend: cpu, cuda or auto")
      ->check(CLI::IsMember({"cpu", "cuda", "auto"}));
  cal->add_option("--db", calibrate.db, "results database the grid of an [ltt] table runs into")->capture_default_str();
  cal->callback([] { set_exit_code(run_calibrate(calibrate)); });

  auto* p = app.add_subcommand("plugins", "list plugins: version, hooks and parameters");
  p->callback([] { set_exit_code(run_plugins()); });

  static std::string q_db = kDefaultDb, q_sql;
  static bool q_csv = false, q_json = false;
  auto* q = app.add_subcommand("query", "run SQL on the results database");
  q->add_option("sql", q_sql, "one SQL statement, e.g. \"SELECT * FROM run_metrics\"")->required();
  q->add_option("--db", q_db, "results database")->capture_default_str();
  auto* csv = q->add_flag("--csv", q_csv, "CSV output");
  q->add_flag("--json", q_json, "JSON output")->excludes(csv);
  q->callback([] { set_exit_code(run_query(q_db, q_sql, q_csv, q_json)); });

  static ReportArgs report;
  auto* rep = app.add_subcommand("report", "tables of each method beside the dense baseline");
  rep->add_option("experiment", report.experiment, "experiment name (default: the latest)");
  rep->add_option("--db", report.db, "results database")->capture_default_str();
  rep->add_option("--html", report.html, "write one self-contained HTML page (tables and figures) to FILE");
  rep->add_flag("--no-figures", report.no_figures, "with --html: the tables alone (no Python or matplotlib needed)");
  rep->callback([] { set_exit_code(run_report(report)); });

  static PlotArgs plot;
  auto* pl = app.add_subcommand("plot", "figures of an experiment (SVG and PNG through matplotlib)");
  pl->add_option("experiment", plot.experiment, "experiment name (default: the latest)");
  pl->add_option("--db", plot.db, "results database")->capture_default_str();
  pl->add_option("-o,--out", plot.out, "folder for the figures (<experiment>_<figure>.svg/.png)");
  pl->add_option("--format", plot.formats, "svg, png or both")
      ->delimiter(',')
      ->check(CLI::IsMember({"svg", "png"}))
      ->capture_default_str();
  pl->add_option("--only", plot.only, "draw only these figures (ids as --list prints them)")->delimiter(',');
  pl->add_flag("--list", plot.list, "list the figures (id and title) without drawing them");
  pl->add_option("--spec", plot.spec, "write the figures' data (JSON) to FILE without drawing them");
  pl->callback([] { set_exit_code(run_plot(plot)); });

  static std::string m_out;
  static std::vector<std::string> m_in;
  auto* m = app.add_subcommand("merge", "merge shard databases into one, without duplicating runs");
  m->add_option("out", m_out, "database to merge into (created if missing)")->required();
  m->add_option("inputs", m_in, "databases to merge from")->required();
  m->callback([] { set_exit_code(run_merge(m_out, m_in)); });
}

}  // namespace inferlab::cli
