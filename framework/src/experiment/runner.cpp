#include "experiment/runner.h"

#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <set>

#include <nlohmann/json.hpp>

#include "datasets/tasks.h"
#include "engine/device.h"
#include "engine/engine.h"
#include "experiment/calibration.h"
#include "experiment/config.h"
#include "experiment/measure.h"
#include "experiment/progress.h"
#include "experiment/tracked_method.h"
#include "experiment/worker.h"
#include "gguf/gguf.h"
#include "model/model_config.h"
#include "plugins/method_context.h"
#include "plugins/plugin_host.h"
#include "results/database.h"

namespace inferlab {

namespace {

using Clock = std::chrono::steady_clock;

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

Result<Workbench> open_workbench(const ExperimentConfig& config, const std::filesystem::path& model_path) {
  Workbench bench;
  auto model = Model::load(model_path);
  if (!model) return model.error();
  if (!config.model.adapter.empty())
    if (auto s = (*model)->merge_adapter(config.model.adapter, float(config.model.adapter_scale)); !s)
      return Error{fmt::format("model.adapter: {}", s.message())};
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
  auto kv_dtype = parse_kv_dtype(config.model.kv_dtype);
  if (!kv_dtype) return Error{fmt::format("model.kv_dtype: {}", kv_dtype.message())};
  options.kv_dtype = *kv_dtype;
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

struct TaskWithSamples {
  std::unique_ptr<Task> task;
  std::vector<TaskSample> samples;
};

Result<TaskWithSamples> make_task_samples(const ExperimentConfig& config, size_t index, const Tokenizer& tokenizer,
                                          int32_t max_context) {
  const TaskSection& section = config.tasks[index];
  auto task = make_task(section.type, section.params);
  if (!task) return Error{fmt::format("task[{}] ({}): {}", index + 1, section.type, task.message())};
  auto samples = (*task)->samples(tokenizer, max_context, uint64_t(config.seed));
  if (!samples) return Error{fmt::format("task[{}] ({}): {}", index + 1, section.type, samples.message())};
  return TaskWithSamples{std::move(*task), std::move(*samples)};
}

Status prepare_task(Workbench& bench, const ExperimentConfig& config, size_t index) {
  if (bench.tasks.count(index) != 0) return ok_status();
  auto made = make_task_samples(config, index, bench.model->tokenizer(), bench.engine->max_context());
  if (!made) return made.error();
  bench.samples[index] = std::move(made->samples);
  bench.tasks[index] = std::move(made->task);
  return ok_status();
}

// What the parent learns of a grid from the model file's header and
// tokenizer alone (run_experiment never loads weights): the sample count of
// each task, for progress, and what the memory estimate needs.
struct GridFacts {
  std::vector<int64_t> samples;   // per task
  ModelConfig model;
  int64_t weight_elements = 0;    // every tensor's element count
  int64_t longest_sample = 0;     // prompt + generated tokens, over every task
  // The KV cache a run may hold at once, over every task: the longest sample
  // (one sequence), or for a throughput task with a batch above 1 its
  // kv_budget_mb, else as many of its longest requests as a step may run.
  int64_t kv_tokens = 0;           // tokens of KV in model.kv_dtype
  double kv_budget_bytes = 0;      // a throughput task's explicit budget, when larger
  int64_t kv_sequences = 1;        // the sequences kv_tokens belongs to
};

Result<GridFacts> grid_facts(const ExperimentConfig& config, const std::filesystem::path& model_path) {
  auto file = gguf::File::open(model_path);
  if (!file) return file.error();
  auto model = read_model_config(**file);
  if (!model) return model.error();
  auto tokenizer = Tokenizer::from_gguf(**file);
  if (!tokenizer) return tokenizer.error();
  GridFacts facts;
  facts.model = *model;
  for (const gguf::TensorInfo& t : (*file)->tensors()) facts.weight_elements += t.n_elems();
  // As Engine::create sets it.
  const int32_t max_context = config.model.max_context > 0 ? int32_t(config.model.max_context) : model->context_length;
  for (size_t t = 0; t < config.tasks.size(); ++t) {
    auto made = make_task_samples(config, t, **tokenizer, max_context);
    if (!made) return made.error();
    facts.samples.push_back(int64_t(made->samples.size()));
    int64_t longest = 0;
    for (const TaskSample& sample : made->samples)
      longest = std::max(longest, int64_t(sample.prompt_tokens.size()) + std::max<int64_t>(sample.max_new_tokens, 1));
    facts.longest_sample = std::max(facts.longest_sample, longest);
    const int64_t batch = *std::max_element(config.batch.begin(), config.batch.end());
    int64_t sequences = 1;
    if (config.tasks[t].type == "throughput" && batch > 1) {
      const double budget_mb = config.tasks[t].params.get_float("kv_budget_mb");
      if (budget_mb > 0) {
        facts.kv_budget_bytes = std::max(facts.kv_budget_bytes, budget_mb * 1024.0 * 1024.0);
        continue;
      }
      sequences = std::min<int64_t>(batch, int64_t(made->samples.size()));
    }
    if (sequences * longest > facts.kv_tokens) {
      facts.kv_tokens = sequences * longest;
      facts.kv_sequences = sequences;
    }
  }
  return facts;
}

RunRecord base_record(const ExperimentConfig& config, const RunSpec& run, const std::string& device) {
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
  r.backend = config.backend;
  r.device = device;
  r.git_revision = source_revision();
  r.baseline = run.baseline;
  return r;
}

// Executes one run in this process (a worker); a failure becomes a "failed"
// record, not an exception. `memory_limit_mb` is the worker's, named when an
// allocation failed under it.
RunRecord execute_run(const ExperimentConfig& config, const RunSpec& run, Workbench& bench,
                      const PluginRegistry& registry, int64_t memory_limit_mb,
                      const std::function<void(int64_t)>& on_sample) {
  RunRecord record = base_record(config, run, device_description(*bench.engine));
  record.started_at = unix_now();
  auto fail = [&](const std::string& message) {
    record.status = RunStatus::Failed;
    record.error = message;
    record.finished_at = unix_now();
    return record;
  };
  // Put before a message when an allocation failed under the memory limit (the
  // message may not say so: the engine reports any bad_alloc as out of KV memory).
  WorkerState& state = worker_state();
  const auto memory_note = [&] {
    return state.allocation_failed.load() != 0
               ? fmt::format("memory limit {} MB exceeded (an allocation failed): ", memory_limit_mb)
               : std::string();
  };
  const size_t index = run.task_index;
  if (auto s = prepare_task(bench, config, index); !s) return fail(memory_note() + s.message());
  const PluginEntry* entry = registry.find(run.plugin);
  if (entry == nullptr) return fail(fmt::format("plugin {} is no longer loaded", run.plugin));
  auto handle = registry.create(run.plugin, run.params);
  if (!handle) return fail(memory_note() + handle.message());
  TrackedMethod method(*handle->get(), state);  // names the hook under way, for a run that dies in one
  // "plugin X", with the hook an exception came out of when one did.
  const auto where = [&] {
    const char* hook = method.threw_in();
    return hook != nullptr ? fmt::format("plugin {}, hook {}", run.plugin, hook) : fmt::format("plugin {}", run.plugin);
  };
  WeightOverrides overrides;  // calibrated first when the method asks (and its artifacts are not there yet)
  if (auto s = prepare_method(method, *entry, run.params, *bench.engine, bench.artifact_root, &overrides); !s)
    return fail(memory_note() + s.message());

  MeasureContext ctx;
  ctx.engine = bench.engine.get();
  ctx.method = run.baseline ? nullptr : &method;
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
  ctx.on_sample = on_sample;
  ctx.batch = run.batch;
  Result<RunMeasurements> measured = Error{"not measured"};
  try {
    measured = measure_run(ctx);
  } catch (const std::bad_alloc&) {
    // Out of (device) memory for KV pages, e.g. copying a saved prefill: this
    // run fails, the experiment goes on.
    return fail(fmt::format("{}: {}out of memory (KV cache)", where(), memory_note()));
  } catch (const std::exception& e) {
    return fail(fmt::format("{}: {}{}", where(), memory_note(), e.what()));
  }
  if (!measured) return fail(fmt::format("{}: {}{}", where(), memory_note(), measured.message()));
  record.metrics = std::move(measured->metrics);
  record.samples = std::move(measured->samples);
  record.status = RunStatus::Finished;
  record.finished_at = unix_now();
  return record;
}

std::string outcome_line(const RunRecord& r) {
  if (r.status != RunStatus::Finished) return "FAILED: " + r.error;
  std::string line = "done";
  for (const char* key : {"accuracy", "perplexity", "fidelity_top1", "decode_tokens_per_s", "output_tokens_per_s"})
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

// An experiment's config (backend resolved) and the plugins its runs load.
struct ExperimentPlan {
  std::unique_ptr<PluginRegistry> registry = std::make_unique<PluginRegistry>();
  std::vector<std::filesystem::path> plugin_path;  // where they were looked for
  Catalog catalog;
  ExperimentConfig config;
  std::filesystem::path model_path;
};

Result<ExperimentPlan> open_plan(const std::filesystem::path& config_file, const RunnerOptions& options) {
  ExperimentPlan plan;
  plan.plugin_path = options.plugin_path.empty() ? PluginRegistry::default_search_path() : options.plugin_path;
  if (auto s = plan.registry->scan(plan.plugin_path); !s) return s.error();
  if (options.progress != nullptr)
    for (const auto& p : plan.registry->problems()) fmt::print(options.progress, "inferlab: warning: {}\n", p);
  plan.catalog = Catalog{task_catalog(), plan.registry->entries()};
  auto config = load_experiment(config_file, plan.catalog);
  if (!config) return config.error();
  plan.config = std::move(*config);
  if (!options.backend.empty()) plan.config.backend = options.backend;
  auto backend = resolve_backend(plan.config.backend);
  if (!backend) return Error{fmt::format("{}: {}", config_file.string(), backend.message())};
  plan.config.backend = *backend;
  auto path = resolve_model(plan.config.model.name);
  if (!path) return Error{fmt::format("model.name: {}", path.message())};
  plan.model_path = *path;
  return plan;
}

// A worker's command line: the parent's plan, which the worker opens again
// (backend resolved and plugin folders as the parent found them, so both
// expand the same grid).
std::vector<std::string> worker_argv(const ExperimentPlan& plan, const RunnerOptions& options,
                                     int64_t memory_limit_mb) {
  std::vector<std::string> argv = {options.worker_executable.string(), "run", plan.config.path, "--worker",
                                   "--backend", plan.config.backend, "--memory-limit-mb", std::to_string(memory_limit_mb)};
  if (!options.reuse_prefill) argv.emplace_back("--no-prefill-reuse");
  if (!options.artifact_root.empty()) argv.insert(argv.end(), {"--artifact-dir", options.artifact_root.string()});
  for (const auto& p : plan.plugin_path) argv.insert(argv.end(), {"--plugin-path", p.string()});
  return argv;
}

// Executes runs in a worker process, one at a time, and keeps the worker for
// the next run. What runs share — the model and engine, task samples, dense
// references for fidelity and saved dense prefills — lives in the worker, as
// it lived in the one process before: a worker started after a crash
// recomputes what it needs of it on demand (measure.cpp makes a missing
// reference or prefill when a run asks, as in a resumed grid), so results do
// not depend on where a worker started and the parent owns none of it.
class WorkerRunner {
 public:
  WorkerRunner(std::vector<std::string> argv, const ExperimentConfig& config, int64_t memory_limit_mb)
      : argv_(std::move(argv)), config_(config), memory_limit_mb_(memory_limit_mb) {}

  // The run's record: the worker's, or a failed one when the worker died or
  // ran past the timeout (it is then gone; the next run starts another). An
  // Error stops the grid: no worker started, or one could not go on.
  Result<RunRecord> execute(const RunSpec& run, Progress& progress) {
    if (!worker_)
      if (auto s = start(); !s) return s.error();
    WorkerState& state = worker_->state();
    state.hook.store(-1);
    state.allocation_failed.store(0);
    const double started = unix_now();
    std::optional<Clock::time_point> deadline;
    if (config_.timeout > 0)
      deadline = Clock::now() + std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double>(config_.timeout));
    // A worker that is gone fails the send; its end is then read below like any other.
    (void)worker_->channel().send({{"run", run.hash}});
    for (;;) {
      nlohmann::json message;
      auto got = worker_->channel().receive(message, deadline);
      if (!got) return got.error();
      if (*got == Channel::Received::Message) {
        const std::string event = message.value("event", "");
        if (event == "sample") {
          progress.sample_done(message.value("done", int64_t(0)));
          continue;
        }
        if (event == "record" && message.contains("record")) return record_from_json(message["record"]);
        return Error{message.value("message", fmt::format("a worker sent an unknown message ({})", event))};
      }
      const bool timed_out = *got == Channel::Received::TimedOut;
      const int status = timed_out ? worker_->kill() : worker_->wait();
      std::string reason = timed_out ? fmt::format("timed out after {} s", config_.timeout)
                                     : "the worker process " + describe_exit(status);
      if (!timed_out && state.allocation_failed.load() != 0)
        reason = fmt::format("memory limit {} MB exceeded (an allocation failed), then {}", memory_limit_mb_, reason);
      const char* hook = hook_call_name(state.hook.load());
      RunRecord record = base_record(config_, run, device_);
      record.status = RunStatus::Failed;
      record.error = fmt::format("plugin {}{}: {}", run.plugin, hook ? fmt::format(", hook {}", hook) : "", reason);
      record.started_at = started;
      record.finished_at = unix_now();
      worker_.reset();
      return record;
    }
  }

 private:
  // A new worker, once it has opened the experiment (no deadline: loading a model takes what it takes).
  Status start() {
    auto worker = WorkerProcess::start(argv_);
    if (!worker) return worker.error();
    nlohmann::json message;
    auto got = (*worker)->channel().receive(message);
    if (!got) return got.error();
    if (*got != Channel::Received::Message) {
      const int status = (*worker)->wait();
      std::string why = "a worker process " + describe_exit(status) + " before its first run";
      if ((*worker)->state().allocation_failed.load() != 0)
        why += fmt::format(" (memory limit {} MB exceeded: an allocation failed)", memory_limit_mb_);
      return Error{why};
    }
    if (message.value("event", "") != "ready")
      return Error{message.value("message", std::string("a worker process did not start"))};
    device_ = message.value("device", "");
    worker_ = std::move(*worker);
    return ok_status();
  }

  std::vector<std::string> argv_;
  const ExperimentConfig& config_;
  int64_t memory_limit_mb_;
  std::unique_ptr<WorkerProcess> worker_;
  std::string device_;  // as the worker describes it, for the records of runs it could not finish
};

}  // namespace

std::string source_revision() { return build_revision(); }

// An experiment ready to run or calibrate in this process: its plan, model
// and engine, and grid.
struct OpenedExperiment {
  ExperimentPlan plan;  // first: its plugin libraries outlive everything else
  Workbench bench;
  std::vector<RunSpec> grid;
};

Result<OpenedExperiment> open_experiment(const std::filesystem::path& config_file, const RunnerOptions& options) {
  OpenedExperiment e;
  auto plan = open_plan(config_file, options);
  if (!plan) return plan.error();
  e.plan = std::move(*plan);
  auto bench = open_workbench(e.plan.config, e.plan.model_path);
  if (!bench) return bench.error();
  e.bench = std::move(*bench);
  e.bench.reuse_prefill = options.reuse_prefill;
  e.bench.artifact_root = options.artifact_root;
  auto grid = expand_grid(e.plan.config, e.plan.catalog, e.bench.model->file_checksum());
  if (!grid) return grid.error();
  e.grid = std::move(*grid);
  return e;
}

namespace {

// Free space kept on the results database's disk before a grid starts;
// INFERLAB_DB_MIN_FREE_MB overrides the 64 MiB default.
std::uintmax_t db_min_free_bytes() {
  std::uintmax_t mb = 64;
  if (const char* env = std::getenv("INFERLAB_DB_MIN_FREE_MB"); env != nullptr && *env != '\0')
    mb = std::strtoumax(env, nullptr, 10);
  return mb << 20;
}

// Where a finished run goes when the database cannot take it: a JSON file
// beside the database, which the next `inferlab run` on it records.
std::filesystem::path unsaved_path(const std::filesystem::path& db, const std::string& hash) {
  return db.parent_path() / (db.filename().string() + ".unsaved-" + hash.substr(0, 16) + ".json");
}

Error keep_unsaved_run(const RunRecord& record, const std::filesystem::path& db, const Error& why) {
  const auto path = unsaved_path(db, record.hash);
  const std::string text = record_to_json(record).dump();
  {
    std::ofstream out(path, std::ios::binary);
    out << text;
    out.flush();
    if (out) {
      out.close();
      return Error{fmt::format("run \"{}\" ({}) ended but could not be recorded: {}; it is kept in {}, which the "
                               "next `inferlab run` with this --db records; the grid stops here",
                               record.label, run_status_name(record.status), why.message, path.string())};
    }
  }
  std::error_code ec;
  std::filesystem::remove(path, ec);
  // Not even that file could be written: the record goes to the error output.
  std::fprintf(stderr, "%s\n", text.c_str());
  return Error{fmt::format("run \"{}\" ({}) ended but could not be recorded: {}; nor could {} be written, so its "
                           "record (JSON) is on the error output above; the grid stops here",
                           record.label, run_status_name(record.status), why.message, path.string())};
}

// Records the runs an earlier `inferlab run` kept beside the database.
Status recover_unsaved_runs(ResultsDb& db, std::FILE* out) {
  const auto folder = db.path().has_parent_path() ? db.path().parent_path() : std::filesystem::path(".");
  const std::string prefix = db.path().filename().string() + ".unsaved-";
  std::error_code ec;
  std::vector<std::filesystem::path> files;
  for (const auto& entry : std::filesystem::directory_iterator(folder, ec)) {
    const std::string name = entry.path().filename().string();
    if (name.rfind(prefix, 0) == 0 && entry.path().extension() == ".json") files.push_back(entry.path());
  }
  std::sort(files.begin(), files.end());
  for (const auto& file : files) {
    std::ifstream in(file, std::ios::binary);
    nlohmann::json json;
    try {
      in >> json;
    } catch (const nlohmann::json::exception& e) {
      return Error{fmt::format("{}: a run kept by an earlier `inferlab run`, not valid JSON ({}); move it away to go "
                               "on", file.string(), e.what())};
    }
    auto record = record_from_json(json);
    if (!record)
      return Error{fmt::format("{}: a run kept by an earlier `inferlab run`: {}; move it away to go on", file.string(),
                               record.message())};
    if (auto s = db.record_run(*record); !s) return s.error();
    std::filesystem::remove(file, ec);
    fmt::print(out, "recorded run \"{}\" kept in {} by an earlier `inferlab run`\n", record->label, file.string());
  }
  return ok_status();
}

// Per-layer schedules (ParamType::Schedule) name layers the model has: one
// past its last layer is refused before any run, naming the run and the key.
Status check_schedules(const std::vector<RunSpec>& runs, const Catalog& catalog, const ModelConfig& model) {
  for (const RunSpec& run : runs) {
    const PluginEntry* entry = catalog.find_plugin(run.plugin);
    if (entry == nullptr) continue;
    for (const ParamSpec& spec : entry->params) {
      if (spec.type != ParamType::Schedule || !run.params.has(spec.name)) continue;
      if (const std::string why = run.params.get_schedule(spec.name).check_layers(model.n_layers); !why.empty())
        return Error{fmt::format("{}: {} = \"{}\": {} (the model has {} layers)", run.label, spec.name,
                                 run.params.get_string(spec.name), why, model.n_layers)};
    }
  }
  return ok_status();
}

// A lower bound of what one worker needs on the CPU backend: the weights as f32
// copies, the KV cache a run holds at once (the longest sample, in
// model.kv_dtype; a throughput task's batch of its longest requests, or its
// kv_budget_mb), and the activations of the longest prefill. A grid above the
// worker's memory limit (or the machine's memory) is refused before any run,
// with the estimate.
Status check_memory(const ExperimentConfig& config, const GridFacts& facts, int64_t memory_limit_mb) {
  if (config.backend != "cpu") return ok_status();  // CUDA: weights and KV live in device memory, not estimated here
  const ModelConfig& m = facts.model;
  const double mib = 1024.0 * 1024.0;
  const double tokens = double(facts.longest_sample);
  const double weights = double(facts.weight_elements) * 4.0;
  const double kv_bytes = config.model.kv_dtype == "f16" || config.model.kv_dtype == "bf16" ? 2.0 : 4.0;
  const double kv = std::max(double(facts.kv_tokens) * double(m.n_layers) * double(m.kv_dim()) * 2.0 * kv_bytes,
                             facts.kv_budget_bytes);
  const double activations =
      tokens * double(2 * int64_t(m.n_embd) + m.q_dim() + 2 * m.kv_dim() + 3 * int64_t(m.n_ff)) * 4.0 +
      double(m.n_vocab) * 4.0;
  const double need = weights + kv + activations;
  const double machine = double(physical_memory_bytes());
  const double limit = std::min(double(memory_limit_mb) * mib, machine > 0 ? machine : 1e300);
  if (need <= limit) return ok_status();
  return Error{fmt::format(
      "experiment {}: a run needs at least {:.0f} MiB (weights {:.0f} MiB as f32, KV cache {:.0f} MiB{} and prefill "
      "activations {:.0f} MiB for the longest sample, {} tokens), more than {} ({:.0f} MiB); shorten the tasks, lower "
      "[model] max_context or the batch, or raise [experiment] memory_limit_mb",
      config.name, need / mib, weights / mib, kv / mib,
      kv == facts.kv_budget_bytes && kv > 0 ? std::string(" (a throughput task's kv_budget_mb)")
      : facts.kv_sequences > 1              ? fmt::format(" ({} sequences of a batch)", facts.kv_sequences)
                                            : std::string(),
      activations / mib, facts.longest_sample,
      double(memory_limit_mb) * mib <= machine || machine <= 0 ? "the worker's memory limit (memory_limit_mb)"
                                                                : "this machine's memory",
      limit / mib)};
}

}  // namespace

Result<RunnerSummary> run_experiment(const std::filesystem::path& config_file, const RunnerOptions& options) {
  Shard shard;
  if (!options.shard.empty()) {
    auto parsed = parse_shard(options.shard);
    if (!parsed) return Error{fmt::format("--shard: {}", parsed.message())};
    shard = *parsed;
  }
  auto plan = open_plan(config_file, options);
  if (!plan) return plan.error();
  const ExperimentConfig& config = plan->config;
  // Only workers load the model's weights: the file is mapped only while a
  // model loads, and the weights are dequantized into each process's own
  // memory, so a parent holding them too would double a grid's memory. The
  // parent needs the file's checksum (run hashes) and tokenizer (samples).
  auto checksum = sha256_file(plan->model_path);
  if (!checksum) return checksum.error();
  auto grid = expand_grid(config, plan->catalog, *checksum);
  if (!grid) return grid.error();
  const std::vector<RunSpec> runs = select_shard(*grid, shard);

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
  if (options.worker_executable.empty())
    return Error{"run_experiment: RunnerOptions::worker_executable names no inferlab executable for the workers"};
  auto db = ResultsDb::open(options.db_path);
  if (!db) return db.error();
  if (auto s = db->check_writable(std::chrono::seconds(10), db_min_free_bytes()); !s) return s.error();
  if (auto s = recover_unsaved_runs(*db, options.out); !s) return s.error();
  auto facts = grid_facts(config, plan->model_path);
  if (!facts) return facts.error();
  const std::vector<int64_t>& counts = facts->samples;
  int64_t total_samples = 0;
  for (const RunSpec& r : runs) total_samples += counts[r.task_index];
  const int64_t memory_limit_mb = config.memory_limit_mb > 0 ? config.memory_limit_mb : default_memory_limit_mb();
  if (auto s = check_schedules(runs, plan->catalog, facts->model); !s) return s.error();
  if (!runs.empty())
    if (auto s = check_memory(config, *facts, memory_limit_mb); !s) return s.error();
  Progress progress(options.progress, summary.runs, total_samples);
  WorkerRunner workers(worker_argv(*plan, options, memory_limit_mb), config, memory_limit_mb);
  int64_t position = 0;
  for (const RunSpec& run : runs) {
    ++position;
    const std::string title = fmt::format("{} · {}", run.task.type, run.label);
    progress.start_run(position, title, counts[run.task_index]);
    auto done = db->has_finished_run(run.hash);
    if (!done) return done.error();
    if (*done) {
      ++summary.skipped;
      progress.end_run("already in the database, skipped");
      continue;
    }
    auto record = workers.execute(run, progress);
    if (!record) return record.error();
    if (auto s = db->record_run(*record); !s) return keep_unsaved_run(*record, options.db_path, s.error());
    (record->status == RunStatus::Finished ? summary.finished : summary.failed) += 1;
    progress.end_run(outcome_line(*record));
  }
  fmt::print(options.out, "experiment {}: {} runs, {} finished, {} skipped (already done), {} failed; results in {}\n",
             summary.experiment, summary.runs, summary.finished, summary.skipped, summary.failed,
             options.db_path.string());
  return summary;
}

Status serve_runs(const std::filesystem::path& config_file, const RunnerOptions& options, Channel& channel,
                  int64_t memory_limit_mb) {
  const auto stop = [&](const Error& error) -> Status {
    (void)channel.send({{"event", "error"}, {"message", error.message}});
    return error;
  };
  auto opened = open_experiment(config_file, options);
  if (!opened) return stop(opened.error());
  const ExperimentConfig& config = opened->plan.config;
  Workbench& bench = opened->bench;
  for (size_t t = 0; t < config.tasks.size(); ++t)
    if (auto s = prepare_task(bench, config, t); !s) return stop(s.error());
  std::map<std::string, const RunSpec*> by_hash;
  for (const RunSpec& r : opened->grid) by_hash[r.hash] = &r;
  if (auto s = channel.send({{"event", "ready"}, {"device", device_description(*bench.engine)}}); !s) return s;
  for (;;) {
    nlohmann::json command;
    auto got = channel.receive(command);
    if (!got) return got.error();
    if (*got != Channel::Received::Message) return ok_status();  // the parent has no more runs
    const auto run = by_hash.find(command.value("run", ""));
    if (run == by_hash.end())
      return stop(Error{fmt::format("{}: a run of the grid is not in it any more (was the config, or a file it "
                                    "names, edited while the grid ran?)",
                                    config_file.string())});
    const RunRecord record =
        execute_run(config, *run->second, bench, *opened->plan.registry, memory_limit_mb,
                    [&](int64_t done) { (void)channel.send({{"event", "sample"}, {"done", done}}); });
    if (auto s = channel.send({{"event", "record"}, {"record", record_to_json(record)}}); !s) return s;
  }
}

Result<CalibrationSummary> calibrate_experiment(const std::filesystem::path& config_file, const RunnerOptions& options) {
  auto opened = open_experiment(config_file, options);
  if (!opened) return opened.error();
  const ExperimentConfig& config = opened->plan.config;
  Workbench& bench = opened->bench;
  const Catalog& catalog = opened->plan.catalog;
  PluginRegistry& registry = *opened->plan.registry;
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
  if (!config.ltt) return summary;
  // Learn then Test: the grid's runs (as `inferlab run`: finished ones are kept), then the certificate.
  auto ran = run_experiment(config_file, options);
  if (!ran) return ran.error();
  if (ran->failed > 0)
    return Error{fmt::format("ltt: {} runs of the grid failed; nothing is certified (see the errors above)", ran->failed)};
  auto db = ResultsDb::open(options.db_path);
  if (!db) return db.error();
  auto certified = certify_by_ltt(config, grid, *db, options.out);
  if (!certified) return certified.error();
  summary.ltt = *certified;
  return summary;
}

}  // namespace inferlab
