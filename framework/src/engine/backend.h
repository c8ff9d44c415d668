// A backend is a small table of operations on one device: the forward schedule
// (forward_pass.h) calls them in order and never touches device memory itself;
// a backend never calls a method hook. Activations of the call in flight live
// in the backend (its workspace); ops name which by their role. Every backend
// answers supports(), asked when a method is set, so a limit is refused before
// the first token instead of surfacing mid-run.
//
//   CpuBackend  (cpu_backend.h)         float32, OpenBLAS, the reference
//   CudaBackend (cuda/cuda_backend.h)   f16/bf16 weights and KV, cuBLAS, kernels/cuda, CUDA graphs
#pragma once

#include <fmt/format.h>

#include <array>
#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "cpu/quant4.h"
#include "engine/kv_cache.h"
#include "engine/plans.h"
#include "model/model_config.h"
#include "inferlab/plugin.h"
#include "inferlab/result.h"

namespace inferlab {

// What a backend can do. The schedule derives the features a method needs
// from its hooks and declarations (method_features) and asks for each.
enum class Feature : int32_t {
  TokenSelection,       // a key plan lists stored tokens (KeySelect::Tokens)
  PageSelection,        // a key plan lists pages
  BoundSelection,       // pages selected by key bound on the device (page_budget)
  QueryHeadSelection,   // keys selected per query head of a group, the kv head reading their union
  SparsePrefill,        // a sparse plan of every kind: estimated indices, ranges and columns (plan_sparse_prefill)
  AttentionStatistics,  // key mass and head output norms delivered to the host (on_attention)
  Eviction,             // compaction of a head's stored tokens (evict)
  CachePositions,       // RoPE at cache indices, keys re-rotated after eviction
  LayerSkip,            // layers skipped, KV filled from the hidden state (plan_layers, exit_after_layer)
  HeadMask,             // heads not computed (mask_components)
  NeuronSubset,         // FFN neurons gathered (mask_components)
  Retention,            // engine-side retention (Method::retention): scores kept where the KV lives
  RetentionPerSequence, // ... with one score per token across layers and heads (SpAtten's cascade)
  ValuePruning,         // P·V over each row's most probable keys only (Method::value_pruning)
  WeightReplace,        // a projection replaced for one run (LoadContext::overrides)
  WeightAdapters,       // unmerged low-rank adapters on projections, for one run
  WeightStorage4Bit,    // projections stored in 4 bits (NF4, FP4, Int4), for one run
  KvPagesF32,           // KV pages stored as float32
  KvPagesF16,
  KvPagesBF16,
  KvBitPlanes,          // a method's pages as bit planes, MSB pass and LSB refetch (Method::kv_quantization)
  ActivationSparsity,   // projections that skip the weights of small inputs; CATS's gated FFN (Method::activation_sparsity)
  PredictedComponents,  // the engine runs a method's predictors of neurons and heads (Method::component_predictors)
  ExitConfidence,       // confidences computed after layers, exit heads (Method::exit_policy)
  BatchedCalls,         // one call over several sequences' rows (Engine::forward_batch: focus_segment)
  Graphs,               // decode steps captured once and replayed
};
const char* feature_name(Feature feature);

// The projections of one layer (and the output head): the one linear operation
// every weight goes through, so adapters, other weight storages and gathered
// rows have one place to live.
enum class Proj : int32_t { Q, K, V, O, Gate, Up, Down, Output };
inline constexpr int32_t kProjCount = 8;

// The 4-bit kernels' format of a stored weight (format != Model).
inline kernels::cpu::Quant4Format quant4_format(WeightFormat format) {
  switch (format) {
    case WeightFormat::FP4: return kernels::cpu::Quant4Format::FP4;
    case WeightFormat::Int4: return kernels::cpu::Quant4Format::Int4;
    default: return kernels::cpu::Quant4Format::NF4;
  }
}
const char* proj_name(Proj p);            // GGUF tensor name: "attn_q", ... "output"
Result<Proj> parse_proj(const std::string& gguf_name);
std::pair<int64_t, int64_t> proj_shape(const ModelConfig& config, Proj p);  // (out, in)

// Intermediates a forward call can hand to an observer (calibration).
enum class Tap : int32_t {
  HiddenIn,       // the layer's input residual stream (n, n_embd)
  HiddenOut,      // the layer's output residual stream (n, n_embd)
  Queries,        // after RoPE (n, q_dim)
  Keys,           // after RoPE (n, kv_dim)
  AttentionOut,   // per head, before the output projection (n, q_dim)
  FfnActivation,  // silu(gate) * up (n, n_ff)
  Values,         // the call's V rows before they are appended (n, kv_dim)
  AttentionIn,    // the normed input of Q, K, V (n, n_embd)
  FfnIn,          // the normed input of gate and up (n, n_embd)
  FfnGate,        // the gate projection before SiLU (n, n_ff)
};

// Which normalization feeds the next projections (the output norm is part of
// the logits op).
enum class Norm : int32_t { Attention, Ffn };

// Receives the logits of one row of a forward pass: `row` indexes the tokens
// passed to that call. The span is valid only during the call.
using LogitsSink = std::function<void(int64_t row, std::span<const float> logits)>;

// Statistics of one layer's attention, on the host (Feature::AttentionStatistics).
struct LayerStatistics {
  std::vector<std::vector<float>> key_mass;  // per kv head: (stored tokens) probability received
  std::vector<float> head_norms;             // per query head: sum over rows of ||output||_2
  std::vector<float> head_l1;                // per query head: sum over rows of ||output||_1
};

// A KvView over a sequence on some device; the schedule creates one per hook
// phase and tells it when the rows of a head changed.
class BackendKvView : public KvView {
 public:
  virtual ~BackendKvView() = default;
  virtual void forget(int32_t layer, int32_t kv_head) const { (void)layer; (void)kv_head; }
};

// One sequence's rows in a batched call: rows [row_from, row_from + rows) of
// the call, at positions first_position ... (Engine::forward_batch).
struct CallSegment {
  int32_t row_from = 0;
  int32_t rows = 0;
  int32_t first_position = 0;
};

// Per-call inputs the schedule hands to begin_call.
struct CallSetup {
  std::span<const int32_t> tokens;
  int32_t first_position = 0;
  bool cache_positions = false;  // RoPE at cache indices (KvPositions::Cache)
  // A batched call (Feature::BatchedCalls): the sequences' rows one after
  // another, in order and covering every token; empty: one sequence from
  // first_position.
  std::span<const CallSegment> segments;
};

// Each row's position in a call: one sequence's from first_position, or in
// a batched call each segment's from its own; segments that do not cover the
// rows in order are an error naming `backend`.
Status call_positions(const CallSetup& call, std::vector<int32_t>& positions, const char* backend);

class Backend {
 public:
  virtual ~Backend() = default;

  virtual const char* name() const = 0;  // "cpu", "cuda"
  virtual bool supports(Feature feature) const = 0;
  virtual std::string device_description() const = 0;
  virtual int64_t weight_bytes() const = 0;
  // This run's 4-bit weights (WeightEditor::set_storage): bytes allocated for
  // them (codes and absmaxes) and the values they hold.
  struct StoredWeights {
    int64_t bytes = 0, values = 0;
  };
  virtual StoredWeights stored_weights() const = 0;
  virtual std::shared_ptr<KvPagePool> pool() const = 0;
  // A pool of bit-plane pages of the pool()'s shape (Feature::KvBitPlanes),
  // the same one for the same planes (made by make_bit_plane_pool, then kept);
  // its sequences are attended MSB planes first (LayerAttention::requant).
  Result<std::shared_ptr<KvPagePool>> bit_plane_pool(kernels::BitPlanes planes);
  virtual std::unique_ptr<BackendKvView> kv_view(const KvSequence& seq) const = 0;

  // --- one forward call -----------------------------------------------------
  // Makes room for the call's rows and stages its token ids and positions.
  virtual Status begin_call(const CallSetup& call) = 0;
  virtual Status embed() = 0;                                  // x = token_embd[ids]
  virtual Status rmsnorm(Norm norm, int32_t layer) = 0;        // xn = norm(x) (Attention, Ffn)
  // y = x W^T for one projection: Q, K, V read xn and write q, k, v; O reads
  // the attention output and writes proj; Gate/Up read xn and write gate/up
  // (only `rows` of W when given: gathered neurons, ascending, maybe none);
  // Down reads the activation (its `rows` columns when given) and writes proj.
  virtual Status linear(Proj proj, int32_t layer, const std::vector<int32_t>* rows = nullptr) = 0;
  // The same for projections that read the same input (Q, K, V; Gate, Up), as
  // one operation where the backend can share work among them.
  virtual Status linear_group(std::span<const Proj> projs, int32_t layer) {
    for (const Proj p : projs)
      if (auto s = linear(p, layer); !s) return s;
    return ok_status();
  }
  virtual Status swiglu(int64_t cols) = 0;                     // act = silu(gate) * up over `cols` columns
  // Feature::ActivationSparsity: linear(proj, layer) for projections that
  // read the same input, each with its input entries |x| <= its threshold
  // taken as zero and the weight columns they multiply not read (one-row
  // calls; more rows compute the sparsified input densely).
  virtual Status linear_sparse(std::span<const Proj> projs, int32_t layer, std::span<const float> thresholds) {
    (void)projs; (void)layer; (void)thresholds;
    return Error{fmt::format("the {} backend has no activation sparsity", name())};
  }
  // Feature::ActivationSparsity (CATS), after linear(Gate): act = silu(gate) *
  // up over the neurons with |silu(gate)| > threshold and 0 elsewhere; up's
  // rows of the others are not read (one-row calls).
  virtual Status gated_swiglu(int32_t layer, float threshold) {
    (void)layer; (void)threshold;
    return Error{fmt::format("the {} backend has no activation sparsity", name())};
  }
  // Q or O for the query heads `heads` only (ascending; a component mask's
  // computed heads): Q writes their queries (the others' are not computed),
  // O reads only their attention outputs' columns of the weight.
  virtual Status linear_heads(Proj proj, int32_t layer, std::span<const int32_t> heads) = 0;
  // Oracle selection (ComponentMask::oracle_neurons), after swiglu: in each
  // row the k neurons of largest |activation| stay, the others become 0 (ties
  // to the lower index).
  virtual Status keep_top_neurons(int32_t k) = 0;
  // Oracle selection (ComponentMask::oracle_heads), after attention: in each
  // row the k heads among `computed` (per head, 1 = computed) of largest
  // output L2 norm keep it, the others' becomes 0.
  virtual Status keep_top_heads(int32_t k, std::span<const uint8_t> computed) = 0;
  // Whether linear_sparse reads a transposed copy of (proj, layer) under
  // `sparsity`: a projection with an input threshold, and down under CATS.
  static bool reads_transposed(const ActivationSparsity& sparsity, int32_t layer, Proj proj) {
    return sparsity.input(layer, int32_t(proj)) >= 0 || (proj == Proj::Down && sparsity.gate(layer) >= 0);
  }
  // Makes what linear_sparse and gated_swiglu read for the method being set
  // (transposed copies of its sparse projections' weights, workspace), and
  // drops what an earlier method's needed; an inactive one drops everything.
  // Called when the method is set, after its weights are in place.
  virtual Status prepare_sparsity(const ActivationSparsity& sparsity) {
    if (!sparsity.active()) return ok_status();
    return Error{fmt::format("the {} backend has no activation sparsity", name())};
  }
  // The input entries linear_sparse and gated_swiglu took as zero since the
  // last read, per ActivationSparsity projection (Q, K, V, O, Gate, Up, Down;
  // gated_swiglu's count under Up); read after each call that used them.
  virtual Status read_sparsity(std::array<int64_t, kSparseProjections>& zeros) {
    zeros.fill(0);
    return ok_status();
  }
  // Feature::PredictedComponents. set_predictors holds the method's
  // predictors (checked: shapes fit the model) for its runs; an inactive set
  // drops them. Called when the method is set.
  virtual Status set_predictors(ComponentPredictors predictors) {
    if (!predictors.active()) return ok_status();
    return Error{fmt::format("the {} backend has no predicted components", name())};
  }
  // Before layer `layer` computes (the residual stream is its input): scores
  // its neurons (when it has a neuron predictor), its heads from this input
  // when `own_heads`, and layer + 1's heads (when that layer has a head
  // predictor: the lookahead); each row's top keep, their union over the
  // call's rows. The choices stay in the backend, per layer.
  virtual Status predict(int32_t layer, bool own_heads) {
    (void)layer; (void)own_heads;
    return Error{fmt::format("the {} backend has no predicted components", name())};
  }
  // How many neurons and heads layer `layer`'s predicted choice holds (in a
  // one-row call the predictors' keep, without asking the device).
  virtual Status predicted_counts(int32_t layer, int32_t& neurons, int32_t& heads) {
    (void)layer; (void)neurons; (void)heads;
    return Error{fmt::format("the {} backend has no predicted components", name())};
  }
  // linear over layer `layer`'s predicted choice: Q and O over its heads (as
  // linear_heads), Gate, Up and Down over its neurons (as linear with rows);
  // LayerAttention::predicted_heads masks attention the same way.
  virtual Status linear_predicted(Proj proj, int32_t layer) {
    (void)proj; (void)layer;
    return Error{fmt::format("the {} backend has no predicted components", name())};
  }
  // The heads each layer's predicted choice computed in the last call, (n_layers,
  // n_heads), 1 = computed (layers without a head choice: all 1); one read per
  // call, for the counters.
  virtual Status read_predicted_heads(std::vector<uint8_t>& flags) {
    (void)flags;
    return Error{fmt::format("the {} backend has no predicted components", name())};
  }
  // Feature::ExitConfidence. set_exit_policy holds the method's exit heads
  // and classifiers (checked by the engine) for its runs; an inactive policy
  // drops them. Called when the method is set.
  virtual Status set_exit_policy(ExitPolicy policy) {
    if (!policy.active()) return ok_status();
    return Error{fmt::format("the {} backend has no early exit by confidence", name())};
  }
  // Before a checked layer runs under ExitMeasure::State: keeps the call's
  // last residual row (the layer's input) for exit_confidence.
  virtual Status keep_exit_state() { return Error{fmt::format("the {} backend has no early exit by confidence", name())}; }
  // After checked layer `layer`: the policy's confidence in the call's last
  // row (ExitPolicy's measures), computed where the activations live; one
  // float comes back.
  virtual Result<float> exit_confidence(int32_t layer) {
    (void)layer;
    return Error{fmt::format("the {} backend has no early exit by confidence", name())};
  }
  // The call exited after `layer`: its exit head maps the residual stream's
  // last row (read over its RMS) before logits(). Layers without a head: nothing.
  virtual Status apply_exit_head(int32_t layer) {
    (void)layer;
    return Error{fmt::format("the {} backend has no early exit by confidence", name())};
  }
  // Feature::BatchedCalls. Between focus_segment(i) and unfocus_segment()
  // the per-sequence ops (rope, append_kv, select_by_bound,
  // plan_sparse_prefill, attention, read_statistics, retain, evict, rerotate,
  // read_last_queries, keep_exit_state) act on segment i's rows alone, as if
  // they were the whole call of its sequence; unfocus_segment puts the
  // segment's attention output back among the call's rows. Row-wise ops
  // (embed, rmsnorm, linear, swiglu, add_residual, add_bias, logits) run on
  // the whole call outside a focus.
  virtual Status focus_segment(int32_t segment) {
    (void)segment;
    return Error{fmt::format("the {} backend has no batched calls", name())};
  }
  virtual Status unfocus_segment() { return Error{fmt::format("the {} backend has no batched calls", name())}; }
  // Inside a focus: the segment's residual rows kept aside (restore false)
  // or written back (restore true). A sequence that exited early stays in
  // its batched call as a frozen row: the others' layers compute over it (its
  // K/V are the exit state's, the KV fill), and its state is written back
  // after each of them. The exit ops (keep_exit_state, exit_confidence,
  // apply_exit_head) read the focused segment's last row.
  virtual Status stash_segment(bool restore) {
    (void)restore;
    return Error{fmt::format("the {} backend has no batched calls", name())};
  }
  virtual Status add_residual() = 0;                           // x += proj
  // The projection's output rows += its bias (Q, K, V or O), when the model
  // has one (ModelConfig::qkv_bias, o_bias); otherwise nothing.
  virtual Status add_bias(Proj proj, int32_t layer) = 0;
  // RoPE of q (queries) and k for layer `layer`: at the call's positions, or
  // at each kv head's stored count when positions are cache indices.
  virtual Status rope(const KvSequence& seq, int32_t layer, bool queries) = 0;
  // Stages the call's new K/V rows of `layer` in the cache (pages reserved,
  // positions and rotary recorded) and writes them from k, v.
  virtual Status append_kv(KvSequence& seq, int32_t layer) = 0;
  // Fills the slots of the plan's heads with a page budget (KeyPlan::budget)
  // with the pages their key bounds select, from the queries' last row (per
  // query head with KeyPlan::by_bound_per_head: the union and its head masks).
  virtual Status select_by_bound(const KvSequence& seq, int32_t layer, KeyPlan& plan) = 0;
  // Feature::SparsePrefill: the sparse prefill plan of `layer` from the query
  // heads' patterns (nullopt: dense), normalized; the indices of estimated
  // kinds come from this call's queries and the cache (the call's tokens
  // appended).
  virtual Status plan_sparse_prefill(const KvSequence& seq, int32_t layer,
                                     std::span<const std::optional<PrefillPattern>> patterns, SparsePlan& plan) {
    (void)seq; (void)layer; (void)patterns; (void)plan;
    return Error{fmt::format("the {} backend has no sparse prefill plans", name())};
  }
  // The slots select_by_bound filled, into the host plan, where they were
  // filled on the device: the traffic counters count a per-query-head union,
  // whose size only the selection knows. A host backend filled them already.
  virtual Status read_bound_selection(int32_t layer, KeyPlan& plan) {
    (void)layer; (void)plan;
    return ok_status();
  }
  // Attention of the call's rows over each kv head's planned keys then its new
  // tokens (appended already); statistics kept for read_statistics when asked.
  virtual Status attention(const KvSequence& seq, const LayerAttention& work) = 0;
  virtual Status read_statistics(const KvSequence& seq, int32_t layer, LayerStatistics& out) = 0;
  // The call's residual stream (n_tokens, n_embd) from row `row_from`, or the
  // queries' last row (group heads of every kv head), for host-side hooks.
  virtual Status read_hidden(int64_t row_from, std::vector<float>& out) = 0;
  virtual Status read_last_queries(std::vector<float>& out) = 0;
  // The call's residual stream set from the host (rows, n_embd) instead of
  // embed(): a single layer run on given inputs (Engine::layer_output).
  virtual Status write_hidden(std::span<const float> rows) = 0;
  // An intermediate of the call, as float32, for an observer (calibration).
  virtual Status read_tap(Tap tap, std::vector<float>& out) = 0;
  // Engine-side retention (Feature::Retention) of `layer`, after its attention
  // with statistics: each stored token's score takes this call's key mass by
  // the policy's rule (the score lives in a slot plane beside the token's K/V
  // rows, so it moves and is copied with them), then each kv head whose budget
  // has heavy >= 0 lists in drops[g] the stored tokens outside its sink, its
  // recent window and its `heavy` best-scoring others (ascending).
  virtual Status retain(KvSequence& seq, int32_t layer, const RetentionPolicy& policy,
                        std::span<const RetentionBudget> budgets, std::vector<std::vector<int32_t>>& drops) = 0;
  // Only the call's rows `rows` (ascending indices into its current rows)
  // stay in the residual stream, with their positions: later layers compute
  // them alone (a token pruned inside a call by retention per sequence).
  // Original positions only.
  virtual Status keep_rows(std::span<const int32_t> rows) = 0;
  // Drops stored tokens of one head (compaction, pages returned to the pool).
  virtual Result<int32_t> evict(KvSequence& seq, int32_t layer, int32_t kv_head, std::vector<int32_t> drop) = 0;
  // Keys whose rotary position differs from their cache index are turned to it.
  virtual Status rerotate(KvSequence& seq, int32_t layer, int32_t kv_head) = 0;
  // Output norm and head over rows [from, from + rows) of the call; the logits
  // are handed to `sink` in order.
  // In capture mode the rows are computed only; replay() hands them over.
  virtual Status logits(int64_t from, int64_t rows, const LogitsSink& sink) = 0;
  // The call is complete (waits for the device; attention time collected).
  virtual Status end_call(double& attention_seconds) = 0;

  // Back to the first n tokens: every stored token at a position >= n leaves.
  virtual Status truncate(KvSequence& seq, int32_t n) = 0;

  // A weight of this engine replaced for the runs of one method (or restored
  // with an empty span): `data` holds the projection in float32, (out, in).
  virtual Status set_weight_override(Proj proj, int32_t layer, std::span<const float> data) = 0;
  // The unmerged adapters of a projection for the runs of one method (rank 0:
  // none): linear() then adds x A^T B^T, A (rank, in), B (out, rank) with the
  // scales folded in (engine.h, WeightAdapter).
  virtual Status set_weight_adapter(Proj proj, int32_t layer, int32_t rank, std::span<const float> a,
                                    std::span<const float> b) = 0;
  // A projection stored in another format for the runs of one method
  // (WeightFormat::Model: back to the weight it had), quantized from `weight`
  // (float32, (out, in): the weight it has now, replaced or not).
  virtual Status set_weight_storage(Proj proj, int32_t layer, const WeightStorage& storage,
                                    std::span<const float> weight) = 0;

  // Timing of attention kernels: the backend measures its own.
  virtual void set_time_attention(bool on) = 0;

  // --- graphs (Feature::Graphs) ---------------------------------------------
  // A decode step whose plan needs nothing from the host mid-step may be
  // captured once, by running the same schedule in capture mode, and replayed.
  // prepare_replay stages what the captured step reads (for every layer);
  // false when this step cannot be replayed (the schedule then runs it eagerly).
  // `keys` holds every running layer's key plan (decided from the step plan).
  // A batched call of one-token decode steps is staged segment by segment,
  // each focused (focus_segment); its graph is the whole batched step, and
  // replay hands each segment's logits row (row i: segment i) to the sink.
  virtual Result<bool> prepare_replay(KvSequence& seq, const StepPlan& plan, std::vector<KeyPlan>& keys) {
    (void)seq; (void)plan; (void)keys;
    return false;
  }
  virtual bool has_graph(const StepPlan& plan) const { (void)plan; return false; }
  virtual Status capture_begin(const StepPlan& plan) {
    (void)plan;
    return Error{"graphs are not supported by this backend"};
  }
  // Ends the capture started by capture_begin (also after a failed body: `ok` false drops it).
  virtual Status capture_end(const StepPlan& plan, bool ok) {
    (void)plan; (void)ok;
    return Error{"graphs are not supported by this backend"};
  }
  virtual Status replay(const StepPlan& plan, const LogitsSink& sink) {
    (void)plan; (void)sink;
    return Error{"graphs are not supported by this backend"};
  }

 protected:
  // A new pool of bit-plane pages (supported widths); the default has none.
  virtual Result<std::shared_ptr<KvPagePool>> make_bit_plane_pool(kernels::BitPlanes planes);
  std::vector<std::shared_ptr<KvPagePool>> bit_plane_pools_;  // made on demand, kept for reuse
};

}  // namespace inferlab
