// The common transformer's forward pass over a paged KV cache. `Engine` is the
// interface every backend implements (CpuEngine in cpu_engine.h, the reference;
// CudaEngine in cuda/cuda_engine.h); Engine::create picks one from the options.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <string>
#include <span>
#include <vector>

#include "engine/kv_cache.h"
#include "inferlab/plugin.h"
#include "inferlab/result.h"
#include "model/model.h"

namespace inferlab {

enum class Backend { Cpu, Cuda };
const char* backend_name(Backend backend);
// "cpu", "cuda", or "auto" (CUDA when this build has it and a GPU is present).
Result<Backend> parse_backend(const std::string& name);

// Element type of the CUDA backend's weights and KV cache (the CPU backend is float32).
enum class GpuDType { F16, BF16 };
Result<GpuDType> parse_gpu_dtype(const std::string& name);  // "f16"/"fp16"/"float16", "bf16"/"bfloat16"

struct EngineOptions {
  int32_t page_size = 16;     // tokens per KV page
  int32_t max_context = 0;    // 0: the model's context length
  int32_t n_threads = 0;      // 0: OpenMP's default (all cores)
  Backend backend = Backend::Cpu;
  GpuDType gpu_dtype = GpuDType::F16;
  bool cuda_graphs = true;    // decode steps replay a captured CUDA graph where the shapes allow it
  // Time the attention kernels (counters().attention_seconds); on CUDA this
  // records events around them and turns decode graphs off.
  bool time_attention = false;
  int32_t device = 0;         // CUDA device index
};

// Receives the logits of one row of a forward pass: `row` indexes the tokens
// passed to that call. The span is valid only during the call.
using LogitsSink = std::function<void(int64_t row, std::span<const float> logits)>;

// What the engine did on behalf of a method, so a run that silently did nothing
// shows in the results. Counts accumulate until reset_counters().
struct EngineCounters {
  int64_t forward_calls = 0;
  int64_t decode_steps = 0;
  int64_t tokens_evicted = 0;        // stored tokens dropped, summed over (layer, kv head)
  int64_t decode_keys_read = 0;      // cached keys attended to in decode steps, per (layer, kv head)
  int64_t decode_keys_cached = 0;    // cached keys that were available to those steps
  int64_t decode_pages_read = 0;     // pages those keys were read from
  int64_t layers_skipped = 0;        // (call, layer) pairs not computed
  int64_t heads_skipped = 0;         // (call, layer, head) not computed
  int64_t neurons_skipped = 0;       // (call, layer, FFN neuron) not computed
  int64_t sparse_prefill_heads = 0;  // (call, layer, head) computed block-sparse
  double attention_seconds = 0;      // attention kernels' time, with EngineOptions::time_attention
  std::map<std::string, double> as_map() const;
};

// What the engine-kept key bounds of one (layer, kv head) cover (kHookPageBudget):
// the first `tokens` stored tokens of sequence `seq_id` as of `rewrites`.
struct PageBoundSync {
  uint64_t seq_id = 0;
  uint32_t rewrites = 0;
  int32_t tokens = 0;
};

// The pages of (layer, kv head) whose bounds must be recomputed to cover its
// first `n` stored tokens, given what `sync` covers: appends each one's physical
// page and filled slots to `pages` / `counts` and returns the coverage once they
// are recomputed (record it only then). Everything when the sequence or its
// table was rewritten since `sync`.
PageBoundSync stale_bound_pages(const KvSequence& seq, int32_t layer, int32_t kv_head, int32_t n,
                                const PageBoundSync& sync, std::vector<int32_t>& pages, std::vector<int32_t>& counts);

class Engine {
 public:
  // The backend options.backend names; an error when it is unavailable here.
  static Result<std::unique_ptr<Engine>> create(std::shared_ptr<const Model> model, EngineOptions options = {});
  virtual ~Engine() = default;
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // A new empty sequence whose pages come from this engine's pool.
  std::unique_ptr<KvSequence> new_sequence() const { return std::make_unique<KvSequence>(pool_); }

  // Runs `tokens` through the model at positions seq.n_past() .. + n - 1, appending
  // their K/V to the cache. Logits are computed for rows [logits_from, n) and handed
  // to `sink` in order (pass logits_from = n for none). `seq` must come from this engine.
  virtual Status forward(KvSequence& seq, std::span<const int32_t> tokens, int64_t logits_from,
                         const LogitsSink& sink) = 0;

  // Convenience: logits of the last token only.
  Result<std::vector<float>> prefill(KvSequence& seq, std::span<const int32_t> tokens);
  Result<std::vector<float>> decode(KvSequence& seq, int32_t token);

  // The method whose hooks run inside forward() (nullptr: dense). `hooks` is the
  // PluginHook set the method declared; only those hooks are called.
  void set_method(Method* method, uint32_t hooks);
  const EngineCounters& counters() const { return counters_; }
  void reset_counters() { counters_ = {}; }
  ModelShape shape() const;

  Backend backend() const { return options_.backend; }
  // "cpu: <model name>, N cores" / "cuda: NVIDIA H100 ..., f16": recorded with every run.
  virtual std::string device_description() const = 0;
  // Bytes of weights resident on the backend's device.
  virtual int64_t weight_bytes() const = 0;

  const Model& model() const { return *model_; }
  const ModelConfig& config() const { return model_->config(); }
  const EngineOptions& options() const { return options_; }
  void set_time_attention(bool on) { options_.time_attention = on; }
  int32_t max_context() const { return max_context_; }
  KvPagePool& pool() { return *pool_; }
  std::shared_ptr<KvPagePool> shared_pool() const { return pool_; }

 protected:
  Engine(std::shared_ptr<const Model> model, EngineOptions options);
  // Checks tokens against the vocabulary and the context (stored tokens in
  // cache-position mode, else n_past); sets cache_positions_ for this call.
  Status check_call(const KvSequence& seq, std::span<const int32_t> tokens);

  std::shared_ptr<const Model> model_;
  EngineOptions options_;
  int32_t max_context_ = 0;
  std::shared_ptr<KvPagePool> pool_;
  // The method's page budget for each kv head of `layer` in this call: > 0
  // pages to select by key bound when that is fewer than the head's cached
  // pages; 0 when the head is dense; < 0 (every head without kHookPageBudget)
  // to ask select_kv.
  std::vector<int32_t> page_budgets(const StepInfo& step, const KvView& view, const KvSequence& seq, int32_t layer);

  Method* method_ = nullptr;
  uint32_t hooks_ = 0;
  bool cache_positions_ = false;  // this call's method uses KvPositions::Cache
  EngineCounters counters_;
};

// Checks the shape of a component mask a method returned for `layer`.
Status check_component_mask(const ComponentMask& mask, const ModelConfig& config, int32_t layer);
// Checks a decode selection for (layer, kv_head) of `cached` stored tokens:
// ascending, no repeats, every page or token index in range.
// Checks a block pattern a method returned for (layer, head) and sorts its
// pairs without repeats; a head whose kv head has a decode selection in the
// same call may not have one.
Status normalize_block_pattern(BlockPattern& pattern, int32_t layer, int32_t head, bool kv_head_selected);
Status check_kv_selection(const KvSelection& selection, int32_t cached, int32_t page_size, int32_t layer,
                          int32_t kv_head);

}  // namespace inferlab
