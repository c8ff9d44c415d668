#include "experiment/runner.h"

#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <map>
#include <memory>
#include <set>

#include "datasets/tasks.h"
#include "engine/device.h"
#include "engine/engine.h"
#include "experiment/calibration.h"
#include "experiment/config.h"
#include "experiment/measure.h"
#include "experiment/progress.h"
#include "plugins/method_context.h"
#include "plugins/plugin_host.h"
#include "results/database.h"


namespace inferlab {

namespace {

double unix_now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

// Which backend the runs use: "auto" is resolved here, so a run's hash and
// record name the backend that really ran it.
Result<std::string> resolve_backend(const std::string& requested) {
  auto backend = parse_backend(requested);
  if (!backend) return Error{fmt::format("experiment.backend: {}", backend.message())};
  return std::string(backend_name(*backend));
}

std::string device_description(const Engine& engine) {
  if (engine.backend() == BackendKind::Cuda) return engine.device_description();
  return fmt::format("{}; OpenBLAS {}", cpu_description(), blas_core_name());
}

// The model, engine and task samples shared by every run of an experiment.
struct Workbench {
  std::shared_ptr<Model> model;
  std::unique_ptr<Engine> engine;
  std::map<size_t, std::unique_ptr<Task>> tasks;               // by task index in the config
  std::map<size_t, std::vector<TaskSample>> samples;
  DenseCache dense;
  PrefillCache prefills;
  bool reuse_prefill = true;
  std::filesystem::path artifact_root;
};

Result<Workbench> open_workbench(const ExperimentConfig& config) {
  Workbench bench;
  auto path = resolve_model(config.model.name);
  if (!path) return Error{fmt::format("model.name: {}", path.message())};
  auto model = Model::load(*path);
  if (!model) return model.error();
  bench.model = *model;
  EngineOptions options{int32_t(config.model.page_size), int32_t(config.model.max_context),
                        int32_t(config.model.threads)};
  options.backend = config.backend == "cuda" ? BackendKind::Cuda : BackendKind::Cpu;
  auto dtype = parse_gpu_dtype(config.model.dtype);
  if (!dtype) return Error{fmt::format("model.dtype: {}", dtype.message())};
  options.gpu_dtype = *dtype;
  auto weights = parse_weight_source(config.model.weights);
  if (!weights) return Error{fmt::format("model.weights: {}", weights.message())};
  options.weights = *weights;
  auto engine = Engine::create(bench.model, options);
  if (!engine) return engine.error();
  bench.engine = std::move(*engine);
  return bench;
}

std::string task_key(const TaskSection& task) {
  std::string key = task.type;
  for (const auto& [name, values] : task.params.all()) {
    key += ";" + name + "=";
    for (const auto& v : values) key += param_value_to_string(v) + ",";
  }
  return key;
}

Status prepare_task(Workbench& bench, const ExperimentConfig& config, size_t index) {
  if (bench.tasks.count(index) != 0) return ok_status();
  const TaskSection& section = config.tasks[index];
  auto task = make_task(section.type, section.params);
  if (!task) return Error{fmt::format("task[{}] ({}): {}", index + 1, section.type, task.message())};
  auto samples = (*task)->samples(bench.model->tokenizer(), bench.engine->max_context(), uint64_t(config.seed));
  if (!samples) return Error{fmt::format("task[{}] ({}): {}", index + 1, section.type, samples.message())};
  bench.samples[index] = std::move(*samples);
  bench.tasks[index] = std::move(*task);
  return ok_status();
}

RunRecord base_record(const ExperimentConfig& config, const RunSpec& run, const Workbench& bench,
                      const std::string& backend) {
  RunRecord r;
  r.hash = run.hash;
  r.experiment = config.name;
  r.experiment_description = config.description;
  r.config_path = config.path;
  r.label = run.label;
  r.plugin = run.plugin;
  r.plugin_version = run.plugin_version;
  r.task = run.task.type;
  r.config_json = run.config_json;
  r.model = config.model.name;
  r.model_checksum = run.model_checksum;
  r.backend = backend;
  r.device = device_description(*bench.engine);
  r.git_revision = source_revision();
  r.baseline = run.baseline;
  return r;
}

// Executes one run; a failure becomes a "failed" record, not an exception.
RunRecord execute_run(const ExperimentConfig& config, const RunSpec& run, Workbench& bench,
                      const PluginRegistry& registry, const std::string& backend, Progress& progress) {
  RunRecord record = base_record(config, run, bench, backend);
  record.started_at = unix_now();
  auto fail = [&](const std::string& message) {
    record.status = RunStatus::Failed;
    record.error = message;
    record.finished_at = unix_now();
    return record;
  };
  const size_t index = run.task_index;
  if (auto s = prepare_task(bench, config, index); !s) return fail(s.message());
  const PluginEntry* entry = registry.find(run.plugin);
  if (entry == nullptr) return fail(fmt::format("plugin {} is no longer loaded", run.plugin));
  auto handle = registry.create(run.plugin, run.params);
  if (!handle) return fail(handle.message());
  WeightOverrides overrides;  // calibrated first when the method asks (and its artifacts are not there yet)
  if (auto s = prepare_method(*handle->get(), *entry, run.params, *bench.engine, bench.artifact_root, &overrides); !s)
    return fail(s.message());

  MeasureContext ctx;
  ctx.engine = bench.engine.get();
  ctx.method = run.baseline ? nullptr : handle->get();
  ctx.hooks = entry->hooks;
  ctx.method_name = run.plugin;
  ctx.overrides = &overrides;
  ctx.prefill_chunk = config.model.prefill_chunk;
  ctx.task = bench.tasks[index].get();
  ctx.task_params = &config.tasks[index].params;
  ctx.samples = &bench.samples[index];
  ctx.task_key = task_key(config.tasks[index]);
  ctx.dense = &bench.dense;
  ctx.prefills = bench.reuse_prefill ? &bench.prefills : nullptr;
  ctx.on_sample = [&](int64_t done) { progress.sample_done(done); };
  Result<RunMeasurements> measured = Error{"not measured"};
  try {
    measured = measure_run(ctx);
  } catch (const std::bad_alloc&) {
    // Out of (device) memory for KV pages, e.g. copying a saved prefill: this
    // run fails, the experiment goes on.
    return fail(fmt::format("plugin {}: out of memory (KV cache)", run.plugin));
  } catch (const std::exception& e) {
    return fail(fmt::format("plugin {}: {}", run.plugin, e.what()));
  }
  if (!measured) return fail(fmt::format("plugin {}: {}", run.plugin, measured.message()));
  record.metrics = std::move(measured->metrics);
  record.samples = std::move(measured->samples);
  record.status = RunStatus::Finished;
  record.finished_at = unix_now();
  return record;
}

std::string outcome_line(const RunRecord& r) {
  if (r.status != RunStatus::Finished) return "FAILED: " + r.error;
  std::string line = "done";
  for (const char* key : {"accuracy", "perplexity", "fidelity_top1", "decode_tokens_per_s"})
    for (const auto& m : r.metrics)
      if (m.name == key) line += fmt::format(", {} {:.4g}", key, m.value);
  return line;
}

void print_plan(std::FILE* out, const std::vector<RunSpec>& runs, ResultsDb* db) {
  fmt::print(out, "{:>4}  {:<12}  {:<18}  {:<40}  {}\n", "#", "hash", "task", "method", "status");
  for (const RunSpec& r : runs) {
    std::string status = "pending";
    if (db != nullptr) {
      auto done = db->has_finished_run(r.hash);
      if (done.ok() && *done) status = "done";
    }
    fmt::print(out, "{:>4}  {:<12}  {:<18}  {:<40}  {}\n", r.index + 1, r.hash.substr(0, 12), r.task.type, r.label,
               status);
  }
}

Result<Catalog> build_catalog(PluginRegistry& registry, const RunnerOptions& options, std::FILE* warn) {
  const auto paths = options.plugin_path.empty() ? PluginRegistry::default_search_path() : options.plugin_path;
  if (auto s = registry.scan(paths); !s) return s.error();
  for (const auto& p : registry.problems()) fmt::print(warn, "inferlab: warning: {}\n", p);
  return Catalog{task_catalog(), registry.entries()};
}

}  // namespace

std::string source_revision() { return build_revision(); }

// An experiment ready to run or calibrate: its plugins, config (backend
// resolved), model and engine, and grid.
struct OpenedExperiment {
  std::unique_ptr<PluginRegistry> registry = std::make_unique<PluginRegistry>();
  Catalog catalog;
  ExperimentConfig config;
  Workbench bench;
  std::vector<RunSpec> grid;
};

Result<OpenedExperiment> open_experiment(const std::filesystem::path& config_file, const RunnerOptions& options) {
  OpenedExperiment e;
  auto catalog = build_catalog(*e.registry, options, options.progress);
  if (!catalog) return catalog.error();
  e.catalog = std::move(*catalog);
  auto config = load_experiment(config_file, e.catalog);
  if (!config) return config.error();
  e.config = std::move(*config);
  if (!options.backend.empty()) e.config.backend = options.backend;
  auto backend = resolve_backend(e.config.backend);
  if (!backend) return Error{fmt::format("{}: {}", config_file.string(), backend.message())};
  e.config.backend = *backend;
  auto bench = open_workbench(e.config);
  if (!bench) return bench.error();
  e.bench = std::move(*bench);
  e.bench.reuse_prefill = options.reuse_prefill;
  e.bench.artifact_root = options.artifact_root;
  auto grid = expand_grid(e.config, e.catalog, e.bench.model->checksum());
  if (!grid) return grid.error();
  e.grid = std::move(*grid);
  return e;
}

Result<RunnerSummary> run_experiment(const std::filesystem::path& config_file, const RunnerOptions& options) {
  Shard shard;
  if (!options.shard.empty()) {
    auto parsed = parse_shard(options.shard);
    if (!parsed) return Error{fmt::format("--shard: {}", parsed.message())};
    shard = *parsed;
  }
  auto opened = open_experiment(config_file, options);
  if (!opened) return opened.error();
  const ExperimentConfig& config = opened->config;
  Workbench& bench = opened->bench;
  PluginRegistry& registry = *opened->registry;
  const std::string& backend = config.backend;
  const std::vector<RunSpec> runs = select_shard(opened->grid, shard);

  RunnerSummary summary{config.name, int64_t(runs.size()), 0, 0, 0};
  if (options.dry_run) {
    std::unique_ptr<ResultsDb> db;
    if (std::filesystem::exists(options.db_path)) {
      auto existing = ResultsDb::open(options.db_path);
      if (!existing) return existing.error();
      db = std::make_unique<ResultsDb>(std::move(*existing));
    }
    print_plan(options.out, runs, db.get());
    return summary;
  }
  auto db = ResultsDb::open(options.db_path);
  if (!db) return db.error();
  for (size_t t = 0; t < config.tasks.size(); ++t)
    if (auto s = prepare_task(bench, config, t); !s) return s.error();
  int64_t total_samples = 0;
  for (const RunSpec& r : runs) total_samples += int64_t(bench.samples[r.task_index].size());
  Progress progress(options.progress, summary.runs, total_samples);
  int64_t position = 0;
  for (const RunSpec& run : runs) {
    ++position;
    const int64_t n_samples = int64_t(bench.samples[run.task_index].size());
    const std::string title = fmt::format("{} · {}", run.task.type, run.label);
    progress.start_run(position, title, n_samples);
    auto done = db->has_finished_run(run.hash);
    if (!done) return done.error();
    if (*done) {
      ++summary.skipped;
      progress.end_run("already in the database, skipped");
      continue;
    }
    RunRecord record = execute_run(config, run, bench, registry, backend, progress);
    if (auto s = db->record_run(record); !s) return s.error();
    (record.status == RunStatus::Finished ? summary.finished : summary.failed) += 1;
    progress.end_run(outcome_line(record));
  }
  fmt::print(options.out, "experiment {}: {} runs, {} finished, {} skipped (already done), {} failed; results in {}\n",
             summary.experiment, summary.runs, summary.finished, summary.skipped, summary.failed,
             options.db_path.string());
  return summary;
}

Result<CalibrationSummary> calibrate_experiment(const std::filesystem::path& config_file, const RunnerOptions& options) {
  auto opened = open_experiment(config_file, options);
  if (!opened) return opened.error();
  const ExperimentConfig& config = opened->config;
  Workbench& bench = opened->bench;
  const Catalog& catalog = opened->catalog;
  PluginRegistry& registry = *opened->registry;
  const std::vector<RunSpec>& grid = opened->grid;
  CalibrationSummary summary;
  std::set<std::filesystem::path> seen;
  for (const RunSpec& run : grid) {
    const PluginEntry* entry = catalog.find_plugin(run.plugin);
    if (entry == nullptr || (entry->hooks & kHookCalibrate) == 0) continue;
    auto handle = registry.create(run.plugin, run.params);
    if (!handle) return Error{fmt::format("{}: {}", run.label, handle.message())};
    const auto started = std::chrono::steady_clock::now();
    auto prepared = ensure_calibrated(*handle->get(), *entry, run.params, *bench.engine, options.artifact_root);
    if (!prepared) return Error{fmt::format("{}: {}", run.label, prepared.message())};
    if (prepared->artifact_dir.empty() || !seen.insert(prepared->artifact_dir).second) continue;
    const double seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    const CalibrationRequest& q = prepared->request;
    if (prepared->calibrated) {
      ++summary.calibrated;
      fmt::print(options.out, "{}: calibrated on {} samples of {} tokens ({}) in {:.1f} s -> {}\n", run.label,
                 q.samples, q.tokens, q.corpus, seconds, prepared->artifact_dir.string());
    } else {
      ++summary.found;
      fmt::print(options.out, "{}: calibration found -> {}\n", run.label, prepared->artifact_dir.string());
    }
  }
  fmt::print(options.out, "experiment {}: {} calibrations run, {} found\n", config.name, summary.calibrated,
             summary.found);
  return summary;
}

}  // namespace inferlab
