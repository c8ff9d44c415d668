// The common transformer's forward pass over a paged KV cache. An Engine owns
// a backend (backend.h: the op table of one device) and runs every call
// through the one forward schedule (forward_pass.h), which is where a method's
// hooks are called. Engine::create picks the backend from the options.
#pragma once

#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/kv_cache.h"
#include "inferlab/plugin.h"
#include "inferlab/result.h"
#include "model/model.h"

namespace inferlab {

enum class BackendKind { Cpu, Cuda };
const char* backend_name(BackendKind backend);
// "cpu", "cuda", or "auto" (CUDA when this build has it and a GPU is present).
Result<BackendKind> parse_backend(const std::string& name);

// Element type of the CUDA backend's weights and KV cache (the CPU backend is float32).
enum class GpuDType { F16, BF16 };
Result<GpuDType> parse_gpu_dtype(const std::string& name);  // "f16"/"fp16"/"float16", "bf16"/"bfloat16"

// Element type of the KV cache's pages. The CPU backend stores float32 (the
// reference) unless told f16 or bf16, halving the bytes attention streams;
// the CUDA backend stores its compute type (gpu_dtype). Auto: the backend's own.
enum class KvDType { Auto, F32, F16, BF16 };
Result<KvDType> parse_kv_dtype(const std::string& name);  // "auto", "f32", "f16", "bf16"
const char* kv_dtype_name(KvDType dtype);

// The weights the CPU backend computes with: float32 copies (the reference) or
// the model file's own quantized blocks (Q4_0, Q4_1, Q8_0), computed as
// llama.cpp does; tensors of other types stay float32.
enum class WeightSource { F32, File };
const char* weight_source_name(WeightSource source);
Result<WeightSource> parse_weight_source(const std::string& name);  // "f32", "file"

struct EngineOptions {
  int32_t page_size = 16;     // tokens per KV page
  int32_t max_context = 0;    // 0: the model's context length
  int32_t n_threads = 0;      // 0: OpenMP's default (all cores)
  BackendKind backend = BackendKind::Cpu;
  GpuDType gpu_dtype = GpuDType::F16;
  bool cuda_graphs = true;    // decode steps replay a captured CUDA graph where their plan allows it
  // Time the attention kernels (counters().attention_seconds); on CUDA this
  // records events around them and turns decode graphs off.
  bool time_attention = false;
  int32_t device = 0;         // CUDA device index
  WeightSource weights = WeightSource::F32;  // CPU backend
  KvDType kv_dtype = KvDType::Auto;          // CUDA: Auto or its gpu_dtype
};

// What the engine did on behalf of a method, so a run that silently did nothing
// shows in the results. Counts accumulate until reset_counters(). The traffic
// counters (keys, pages, bytes) come from each step's plan, on every backend
// and for every method including dense, so tables compare one quantity.
struct EngineCounters {
  int64_t forward_calls = 0;
  int64_t decode_steps = 0;
  int64_t tokens_evicted = 0;        // stored tokens dropped, summed over (layer, kv head)
  int64_t decode_keys_read = 0;      // cached keys attended to in decode steps, per (layer, kv head)
  int64_t decode_keys_cached = 0;    // cached keys that were available to those steps
  int64_t decode_pages_read = 0;     // pages those keys were read from
  int64_t decode_kv_bytes_read = 0;  // K and V bytes of those keys, in the KV pages' format
  int64_t layers_skipped = 0;        // (call, layer) pairs not computed
  // Layer plans and early exits (kHookLayerPlan): (decode step, layer) pairs
  // computed (per decode step: the layers a generated token ran), (row, layer)
  // K/V filled from the hidden state that skipped the layer (FromHidden), and
  // per layer the calls a method ended after it (exit_after_layer).
  int64_t decode_layers_run = 0;
  int64_t kv_fills_propagated = 0;
  std::vector<int64_t> exits_after_layer;
  int64_t exit_checks = 0;  // confidences the engine computed for an exit policy (ExitPolicy)
  // Self-speculative decoding (Method::speculation): draft steps (one-token
  // calls through the first exit_layer layers, also counted as decode steps),
  // tokens drafted, verifying calls, and drafts the token loop rejected or
  // left unused (generation ended first); accepted = drafted - both.
  int64_t draft_steps = 0;
  int64_t drafted_tokens = 0;
  int64_t verify_calls = 0;
  int64_t drafts_rejected = 0;
  int64_t drafts_unused = 0;
  int64_t heads_skipped = 0;         // (call, layer, head) not computed
  int64_t kv_heads_skipped = 0;      // (decode step, layer, kv head) whose query heads were all masked: no K/V read
  int64_t rows_pruned = 0;           // (row, layer) not computed: the row's token left inside its call
  int64_t decode_values_skipped = 0; // V rows of keys read in decode steps that no query head accumulated (value pruning)
  // Progressive quantization (bit-plane pages), per layer: query vectors
  // (row, head) attended from the MSB planes, and those recomputed with the
  // LSB planes (largest probability below the threshold); every call.
  std::vector<int64_t> requant_rows;
  std::vector<int64_t> requant_refetched;
  int64_t decode_lsb_keys_read = 0;  // cached keys whose LSB planes decode steps read, per (layer, kv head)
  int64_t neurons_skipped = 0;       // (call, layer, FFN neuron) not computed
  // Activation sparsity, per projection (Q, K, V, O, Gate, Up, Down): input
  // entries the projections read in every call, and those taken as zero (for
  // CATS's gated FFN: its neurons, counted under Up); empty: never active.
  std::vector<int64_t> sparse_inputs;
  std::vector<int64_t> sparse_zeros;
  int64_t sparse_prefill_heads = 0;  // (call, layer, head) computed with a prefill pattern
  int64_t sparse_prefill_keys_read = 0;    // keys those heads' rows read, summed over rows
  int64_t sparse_prefill_keys_causal = 0;  // keys the same rows read densely (causal)
  double sparse_plan_seconds = 0;          // estimating and building sparse prefill plans
  int64_t graph_replays = 0;         // decode steps served by a captured graph
  // Engine::forward_batch: calls that ran several sequences' rows together,
  // the sequences in them, and batches whose sequences ran one by one (their
  // plans or the backend did not allow a batched call).
  int64_t batched_calls = 0;
  int64_t batched_sequences = 0;
  int64_t batched_layers = 0;  // layers batched calls computed over their rows (with exits: up to the slowest one's)
  int64_t batch_fallbacks = 0;
  int64_t logits_rows = 0;           // rows whose logits were computed (the output projection's work)
  double attention_seconds = 0;      // attention kernels' time, with EngineOptions::time_attention
  std::map<std::string, double> as_map() const;
};

// Which layers a method's predictors choose for (ComponentPredictors; the
// weights live in the backend): per layer, 1 = a neuron / head predictor.
struct PredictedLayers {
  std::vector<uint8_t> neurons, heads;
  bool neurons_at(int32_t layer) const { return !neurons.empty() && neurons[size_t(layer)] != 0; }
  bool heads_at(int32_t layer) const { return !heads.empty() && heads[size_t(layer)] != 0; }
  bool active() const { return !neurons.empty() || !heads.empty(); }
};

// A method as the engine runs it: its hooks, and the weights it replaced for
// its runs (LoadContext::overrides), applied while it is the engine's method.
struct WeightOverride {
  Proj proj = Proj::Q;
  int32_t layer = 0;
  std::vector<float> data;  // float32, (out, in)
};
// The unmerged adapters of one projection, concatenated: A (rank, in) stacked,
// B (out, rank) side by side with each adapter's scale folded in.
struct WeightAdapter {
  Proj proj = Proj::Q;
  int32_t layer = 0;
  int32_t rank = 0;
  std::vector<float> a, b;
};
struct WeightStorageItem {
  Proj proj = Proj::Q;
  int32_t layer = 0;
  WeightStorage storage;
};
struct WeightOverrides final : public WeightEditor {
  WeightOverrides();
  Status replace(const std::string& tensor, int32_t layer, std::span<const float> data) override;
  Status add_adapter(const std::string& tensor, int32_t layer, const LowRankAdapter& adapter) override;
  Status load_adapter(const std::string& path, float scale, bool merge) override;
  Status set_storage(const std::string& tensor, int32_t layer, const WeightStorage& storage) override;
  const ModelConfig* config = nullptr;  // shapes to check against
  const WeightView* base = nullptr;     // the model's weights (merging; set during on_load)
  std::vector<WeightOverride> items;
  std::vector<WeightAdapter> adapters;
  std::vector<WeightStorageItem> storages;
  bool empty() const { return items.empty() && adapters.empty() && storages.empty(); }

 private:
  Result<Proj> target(const char* what, const std::string& tensor, int32_t layer) const;

 public:
  uint64_t serial = 0;  // unique per object and content: the engine knows what it applied without keeping a pointer
};

// Sees a forward call's intermediates, layer by layer (calibration): the
// host's, not a method's. A call with an observer never replays a graph.
class ForwardObserver {
 public:
  virtual ~ForwardObserver() = default;
  virtual uint32_t taps() const = 0;  // CalibrationTap bits (kTapLogits is the caller's, from the sink)
  virtual void on_layer(const CalibrationTaps& taps) = 0;
};

class Engine;
struct MethodCall;

// A method installed on an engine for a scope: on every way out (an error, an
// exception) the engine is left dense and keeps no pointer to the method.
class MethodScope {
 public:
  explicit MethodScope(Engine& engine) : engine_(&engine) {}
  MethodScope(const MethodScope&) = delete;
  MethodScope& operator=(const MethodScope&) = delete;
  ~MethodScope();

 private:
  Engine* engine_;
};

class Engine {
 public:
  // The backend options.backend names; an error when it is unavailable here.
  static Result<std::unique_ptr<Engine>> create(std::shared_ptr<const Model> model, EngineOptions options = {});
  // A model of this shape with random weights made on the GPU from `seed`
  // (the scales of write_synthetic_model): 7B-sized timing without a file.
  // CUDA backend only.
  static Result<std::unique_ptr<Engine>> create_random(const ModelConfig& config, uint64_t seed,
                                                       EngineOptions options);
  ~Engine();
  Engine(const Engine&) = delete;
  Engine& operator=(const Engine&) = delete;

  // A new empty sequence whose pages come from this engine's pool: the
  // current method's (bit planes, Method::kv_quantization) or the default.
  std::unique_ptr<KvSequence> new_sequence() const { return std::make_unique<KvSequence>(pool_); }

  // Runs `tokens` through the model at positions seq.n_past() .. + n - 1, appending
  // their K/V to the cache. Logits are computed for rows [logits_from, n) and handed
  // to `sink` in order (pass logits_from = n for none). `seq` must come from this engine.
  // With sliding-window layers, the rows past the smallest window run one call each.
  Status forward(KvSequence& seq, std::span<const int32_t> tokens, int64_t logits_from, const LogitsSink& sink,
                 ForwardObserver* observer = nullptr);

  // One step of several sequences (continuous batching): each item's tokens
  // run as by forward(), but in one call whose GEMMs cover every item's rows
  // and whose attention reads each sequence's own pages, each hook deciding
  // for its item's sequence with that sequence's method state. When the
  // items' plans differ (layer plans, early exit, component masks or
  // predictors, retention per sequence, sliding windows) or the backend has
  // no batched calls, the items run one after another (counter
  // batch_fallbacks). Every item's sequence must be distinct.
  struct BatchItem {
    KvSequence* seq = nullptr;
    std::span<const int32_t> tokens;
    int64_t logits_from = 0;
    LogitsSink sink;
  };
  Status forward_batch(std::span<const BatchItem> items);

  // Layer `layer` alone on input residual rows (rows, n_embd) in windows of
  // `window` tokens, each a new sequence from position 0, with `sparsity`'s
  // thresholds for that layer (LayerProbe); output: its output residual rows.
  // Only while no method is set (calibration).
  Status layer_output(int32_t layer, std::span<const float> input, int32_t window, const ActivationSparsity& sparsity,
                      std::vector<float>& output);

  // The model's prediction from residual rows (rows, n_embd) taken as final
  // hidden states, after `head` when given (LayerProbe::predict): per row the
  // argmax token and the softmax top-1 minus top-2. Only while no method is set.
  Status predict_rows(std::span<const float> hidden, const ExitMap* head, float norm_eps, std::vector<int32_t>& top1,
                      std::vector<float>& margin);

  // Convenience: logits of the last token only.
  Result<std::vector<float>> prefill(KvSequence& seq, std::span<const int32_t> tokens);
  Result<std::vector<float>> decode(KvSequence& seq, int32_t token);

  // Back to the sequence's first n tokens (speculative decoding, preemption):
  // every stored token at a position >= n leaves the cache and n_past becomes n.
  Status truncate(KvSequence& seq, int32_t n);

  // Self-speculative decoding under the method's Speculation (the token loop's
  // mechanism, generation.h): `token` is the model's choice, not in the cache
  // yet. Drafts up to min(draft_length, max_drafts) tokens (fewer near the end
  // of the context) by one-token calls through the first exit_layer layers,
  // greedily; truncates their KV away; then runs `token` and the drafts through
  // every layer in one call. `rows` gets (drafts + 1) x n_vocab logits: after
  // `token`, then after each draft. The token and every draft are then in the
  // cache: drop_drafts takes back those the caller does not keep.
  struct Speculated {
    std::vector<int32_t> drafts;
    std::vector<float> rows;
  };
  Status speculate(KvSequence& seq, int32_t token, int32_t max_drafts, Speculated& out);
  // The sequence's last `count` tokens were drafts the caller did not keep:
  // they leave the cache, counted as rejected or (generation ended) unused.
  Status drop_drafts(KvSequence& seq, int32_t count, bool rejected);
  // The current method's speculation (inactive without one).
  const Speculation& speculation() const { return speculation_; }

  // The method whose hooks run inside forward() (nullptr: dense). `hooks` is the
  // PluginHook set the method declared; only those hooks are called. Refused,
  // before any token, when the backend lacks a feature the method needs.
  // `name` (the plugin's) is for messages.
  Status set_method(Method* method, uint32_t hooks, const WeightOverrides* overrides = nullptr,
                    const std::string& name = "method");
  const EngineCounters& counters() const { return counters_; }
  void reset_counters() { counters_ = {}; }
  ModelShape shape() const;

  BackendKind backend() const { return options_.backend; }
  Backend& ops() { return *backend_; }
  // "cpu: <model name>, N cores" / "cuda: NVIDIA H100 ..., f16": recorded with every run.
  std::string device_description() const { return backend_->device_description(); }
  // Bytes of weights resident on the backend's device.
  int64_t weight_bytes() const { return backend_->weight_bytes(); }
  Backend::StoredWeights stored_weights() const { return backend_->stored_weights(); }

  const Model& model() const { return *model_; }
  const ModelConfig& config() const { return model_->config(); }
  const EngineOptions& options() const { return options_; }
  bool has_method() const { return method_ != nullptr; }
  void set_time_attention(bool on);
  int32_t max_context() const { return max_context_; }
  KvPagePool& pool() { return *pool_; }
  std::shared_ptr<KvPagePool> shared_pool() const { return pool_; }

 private:
  MethodCall method_call() const;
  // The method's state for `seq` (made on first use); nullptr without a method.
  SequenceState* sequence_state(KvSequence& seq) const;
  // `body`, with an allocation failure or an exception out of it as an error naming the backend.
  Status guarded(const std::function<Status()>& body) const;
  Status forward_call(KvSequence& seq, std::span<const int32_t> tokens, int64_t logits_from, const LogitsSink& sink,
                      ForwardObserver* observer);
  Engine(std::shared_ptr<const Model> model, EngineOptions options, std::unique_ptr<Backend> backend);
  // Checks tokens against the vocabulary and the context (stored tokens in
  // cache-position mode, else n_past).
  Status check_call(const KvSequence& seq, std::span<const int32_t> tokens, bool cache_positions) const;
  // The sequence's pages are the current pool's (a clear error when they are another of this engine's).
  Status check_pool(const KvSequence& seq) const;

  std::shared_ptr<const Model> model_;
  EngineOptions options_;
  int32_t max_context_ = 0;
  std::unique_ptr<Backend> backend_;
  std::shared_ptr<KvPagePool> pool_;          // where new sequences' pages come from
  std::shared_ptr<KvPagePool> default_pool_;  // the backend's (options.kv_dtype)
  std::vector<std::shared_ptr<KvPagePool>> method_pools_;  // bit-plane pools methods asked for
  Method* method_ = nullptr;
  uint32_t hooks_ = 0;
  ActivationSparsity sparsity_;  // the method's (Method::activation_sparsity), checked
  PredictedLayers predicted_;    // where the method's predictors choose (Method::component_predictors)
  ExitLayout exit_;              // where the method's exit policy checks (Method::exit_policy)
  Speculation speculation_;      // the method's (Method::speculation), checked
  int32_t draft_layers_ = 0;     // > 0 while Engine::speculate drafts: the calls run that many layers
  std::vector<uint8_t> probe_pattern_;  // the sparse projections layer_output last prepared the backend for
  uint64_t overrides_applied_ = 0;                     // serial of the overrides the backend holds (0: none)
  std::vector<std::pair<Proj, int32_t>> overridden_;  // what they replaced
  std::vector<std::pair<Proj, int32_t>> adapted_;     // where they put unmerged adapters
  std::vector<std::pair<Proj, int32_t>> stored_;      // what they stored in another format
  EngineCounters counters_;
};

// The features a method with these hooks and declarations needs from a backend
// (`predictors`: its component_predictors(), fetched once by the caller, as
// they carry their weights).
std::vector<Feature> method_features(const Method& method, uint32_t hooks, const ComponentPredictors& predictors,
                                     const ExitPolicy& exits);

// The shape a plugin sees of a model (ModelShape), for an engine's context and page size.
ModelShape model_shape(const ModelConfig& config, int32_t context = 0, int32_t page_size = 0);

// Checks the shape of a component mask a method returned for `layer`.
Status check_component_mask(const ComponentMask& mask, const ModelConfig& config, int32_t layer);
// Checks a prefill pattern a method returned for (layer, head) (a positive
// block size, budgets >= 0, block pairs with 0 <= key block <= query block)
// and sorts its pairs without repeats; a head whose kv head has a decode
// selection in the same call may not have one.
Status normalize_prefill_pattern(PrefillPattern& pattern, int32_t layer, int32_t head, bool kv_head_selected);
// Checks a decode selection for (layer, kv_head) of `cached` stored tokens:
// ascending, no repeats, every page or token index in range, and head masks
// (when given) one per index, each naming some of the group's query heads.
Status check_kv_selection(const KvSelection& selection, int32_t cached, int32_t page_size, int32_t layer,
                          int32_t kv_head, int32_t group_size = 1);

// Self-speculation drafts at most this many tokens per verifying call.
inline constexpr int32_t kMaxDraftLength = 64;

// Key selection per query head keeps a 32-bit mask of the group's heads per index.
inline constexpr int32_t kMaxSelectionGroup = 32;
inline uint32_t group_mask(int32_t group_size) {
  return group_size >= 32 ? ~0u : (1u << group_size) - 1u;
}

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

}  // namespace inferlab
