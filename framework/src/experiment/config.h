// Experiment configs: a TOML file parsed and validated against the catalog
// (every error reported at once, each as `file:line:column: key: message`),
// expanded into a grid of runs, each with a stable hash of its resolved
// configuration, and split into shards for cluster job arrays.
#pragma once

#include <cstdint>
#include <filesystem>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "experiment/catalog.h"
#include "inferlab/params.h"
#include "inferlab/result.h"
#include "model/model.h"

namespace inferlab {

struct ModelSection {
  std::string name;  // short name, or an absolute .gguf path (relative paths resolved against the config)
  int64_t page_size = 16;
  int64_t max_context = 0;    // 0: the model's own
  int64_t threads = 0;        // 0: all cores
  int64_t prefill_chunk = 0;  // tokens per forward call during prefill; 0: the whole prompt
  std::string dtype = "f16";  // CUDA backend: weights and KV cache in f16 or bf16
  std::string weights = "f32";  // CPU backend: "f32" copies or the file's quantized blocks ("file")
  std::string kv_dtype = "auto";  // KV pages: "auto" (CPU f32, CUDA its dtype), "f32", "f16", "bf16" (CPU)
  // A LoRA adapter (PEFT folder or llama.cpp GGUF adapter) merged into the
  // weights at load, for every run, the dense baseline too; absolute. Empty: none.
  std::string adapter;
  double adapter_scale = 1.0;
};

struct TaskSection {
  std::string type;
  TaskParams params;  // every declared parameter present, defaults filled in
};

struct MethodSection {
  std::string plugin;
  std::string label;  // the config's `name`, or the plugin name
  std::string plugin_version;
  // Every declared parameter present; a scalar or a default is a one-element list.
  std::map<std::string, std::vector<ParamValue>> axes;
};

// [ltt]: `inferlab calibrate` certifies a threshold by Learn then Test
// (experiment/risk_control.h) over one method's grid of one parameter: it runs
// the grid (as `inferlab run`, resuming), takes each sample's loss
// 1 - <metric> from the runs' samples, splits the samples at random (seed)
// into `calibration_samples` and the rest, certifies the most aggressive value
// whose risk is at most delta with probability 1 - epsilon, writes it to
// `output` ("<parameter> <value>" lines, which the method reads back), checks
// it on the held-out samples, and repeats the split `splits` times to show how
// often the held-out risk exceeds delta (at most about epsilon).
struct LttSection {
  std::string method;                     // the [[method]]'s name
  std::string parameter = "lambda";       // one of its axes, a number; the others single-valued
  std::string order = "descending";       // which end of the axis is safest: descending = the largest
  std::string metric = "top1_agreement";  // a per-sample value in [0, 1] of the task's rows
  double delta = 0.1, epsilon = 0.1;
  int64_t calibration_samples = 0;
  int64_t splits = 20;
  int64_t seed = 0;
  std::string output;                     // absolute
};

struct ExperimentConfig {
  std::string path;  // the config file (absolute when loaded from disk)
  std::string name, description, backend;
  int64_t seed = 0;
  // How runs are isolated (experiment/worker.h): neither changes a result, so
  // neither enters a run's hash.
  double timeout = 0;           // seconds a run may take, calibration included; 0: no limit
  int64_t memory_limit_mb = 0;  // memory a worker process may allocate; 0: default_memory_limit_mb()
  ModelSection model;
  std::vector<TaskSection> tasks;
  std::vector<MethodSection> methods;
  std::optional<LttSection> ltt;
  // experiment.batch: sequences one step may run (continuous batching, throughput
  // tasks); a list is a grid axis, part of each run's hash (1 stays out of it).
  std::vector<int64_t> batch = {1};
};

// `inferlab finetune`'s config: the experiment format's [model] table and a
// [finetune] table (optionally [finetune.task], a task of datasets/ whose
// samples become training examples: the prompt, then the answer with the
// loss). Validated like experiment configs; relative paths resolve next to
// the config. Names of projections are Hugging Face's (q_proj ... down_proj).
struct FinetuneSection {
  std::string name;                   // default: the config file's stem
  std::vector<std::string> data;      // text or JSONL files, absolute
  std::string data_format = "auto";   // auto (by extension), text, jsonl
  std::string corpus;                 // a corpus as tasks name it ("kjv", or a text file): its text
  std::vector<int64_t> corpus_bytes;  // [begin, end) bytes of it, widened to whole lines; empty: all
  std::optional<TaskSection> task;
  std::vector<std::string> targets;   // q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj
  std::vector<int64_t> layers;        // empty: every layer
  int64_t r = 8;
  double alpha = 16;
  bool rslora = false;
  double dropout = 0;
  std::string quant = "none";         // none (float32 base: LoRA), nf4, fp4, int4 (QLoRA)
  bool double_quant = true;
  int64_t block_size = 64;
  double lr = 2e-4, weight_decay = 0, beta1 = 0.9, beta2 = 0.999, eps = 1e-8;
  double max_grad_norm = 1.0;         // 0: no clipping
  std::string schedule = "constant";  // constant, cosine, linear (after warm-up)
  int64_t warmup_steps = 0;
  int64_t steps = 0;                  // optimizer steps
  int64_t batch = 4;                  // sequences per forward
  int64_t grad_accum = 1;             // forwards per optimizer step
  int64_t seq_len = 256;              // tokens per training sequence at most
  int64_t seed = 0;
  bool checkpoint_layers = false;     // recompute each layer in backward
  std::string backend = "cpu";        // where the training graph runs: cpu, or cuda (a CUDA build and a GPU)
  // The early-exit objective: "calm" puts every layer's exit (its output through
  // the final norm and LM head) in the loss, weighted by layer index (CALM);
  // exit_weights gives each layer's weight instead. Losses are then the
  // weighted sums per target token.
  std::string exit_loss = "none";
  std::vector<double> exit_weights;
  // SkipDecode's schedule in the forward (inferlab/skipdecode_schedule.h), as
  // the skipdecode plugin's parameters: a target position g tokens after a
  // sequence's first target runs budget(g) layers (0: every layer; both 0: off).
  int64_t skip_max_exit = 0, skip_min_exit = 0, skip_warmup_layers = 1, skip_schedule_length = 256;
  int64_t checkpoint_every = 50;      // steps between resumable checkpoints
  int64_t log_every = 10;
  double eval_fraction = 0;           // held-out examples for the evaluation loss
  int64_t eval_every = 0;             // steps between evaluations (0: at the end only, when held out)
  int64_t threads = 0;
  std::string output;                 // the adapter folder to write
  bool overwrite = false;
  bool gguf = false;                  // also <output>/adapter_model.gguf, for llama.cpp
};

struct FinetuneConfig {
  std::string path;
  ModelSection model;
  FinetuneSection finetune;
};

Result<FinetuneConfig> load_finetune_config(const std::filesystem::path& file, const Catalog& catalog);
Result<FinetuneConfig> parse_finetune_config(std::string_view toml_text, const std::string& source_name,
                                             const Catalog& catalog);

// Reads and validates an experiment file; on failure the message holds one
// line per problem found.
Result<ExperimentConfig> load_experiment(const std::filesystem::path& file, const Catalog& catalog);

// The same from text; `source_name` names the text in messages, and relative
// paths in the config resolve against its folder.
Result<ExperimentConfig> parse_experiment(std::string_view toml_text, const std::string& source_name,
                                          const Catalog& catalog);

// One point of an experiment's grid: everything needed to execute and record a run.
// The version of what every run measures, part of every run hash: bump it
// when a metric's definition or computation changes, so numbers measured the
// old way are never mixed with new ones (their runs become pending again).
//   1  (no field) up to 2026-11
//   2  perplexity windows no longer count a window's unpredicted first token
//   3  TTFT: a prompt's logits are computed for its last row only (before, every
//      prompt row's logits were computed and all but the last thrown away)
//   4  generation tasks with an answer record answer_logprob and
//      answer_digit_accuracy; every run records keys_read_per_step; tasks gain
//      the question and answer_logprob parameters
inline constexpr int32_t kMeasurementVersion = 4;

struct RunSpec {
  int64_t index = 0;  // position in the grid (0-based), stable
  std::string experiment;
  int64_t seed = 0;
  std::string backend;
  ModelSection model;
  std::string model_checksum;   // of the model file
  std::string adapter_digest;   // "sha256:<hex>" of model.adapter, or empty
  TaskSection task;
  size_t task_index = 0;  // its task's position in the config's [[task]] list (not part of the hash)
  std::string plugin, plugin_version;
  std::string label;   // e.g. "dense" or "h2o-small heavy=32": the method label plus the axes that vary
  ParamValues params;  // every declared parameter present
  std::map<std::string, std::string> file_digests;  // Path parameters: "sha256:<hex>" of the file's content
  bool baseline = false;  // the dense baseline run of its task (and batch)
  int64_t batch = 1;      // experiment.batch: sequences a step may run
  // Canonical JSON (sorted keys) of everything that changes the run's results;
  // index, label and threads are left out.
  std::string config_json;
  std::string hash;  // sha256 hex of config_json
};

// Per task, in config order, and per batch size: the dense baseline, then each method's cartesian
// product of its axes (declaration order, last axis fastest). A point whose
// hash equals an earlier run's is dropped. Errors when "dense" is not in the catalog.
Result<std::vector<RunSpec>> expand_grid(const ExperimentConfig& config, const Catalog& catalog,
                                         const std::string& model_checksum);

struct Shard {
  int64_t index = 0;  // 0-based
  int64_t count = 1;
};

// "i/N" with 1 <= i <= N, as written on the command line.
Result<Shard> parse_shard(const std::string& text);

// The runs whose grid index falls in `shard` (index % count), in grid order.
std::vector<RunSpec> select_shard(const std::vector<RunSpec>& runs, Shard shard);

// What a Path or PathList value enters run hashes and artifact keys as:
// "sha256:<hex>" of its content ("[sha256:<hex>, ...]" for a list); "" for
// other types and an empty Path.
Result<std::string> path_digest(const ParamSpec& spec, const ParamValue& value);

}  // namespace inferlab
