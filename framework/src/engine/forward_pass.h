// The one forward schedule: a forward call of the engine from start to end,
// on any backend. It decides (by asking the method's hooks: each is called
// from exactly one place, here) and the backend carries the decisions out:
//
//   plan the step: layer plan, page budgets, retention budgets  (before any op)
//   embed
//   per layer:  component mask -> rmsnorm -> linear(q, k, v) -> rope
//               -> decide the key plan (page budgets, select_kv) -> select by bound
//               -> append -> decide the sparse prefill plan (prefill_pattern) -> attention
//               -> statistics (on_attention) -> retention -> eviction (evict) -> re-rotation
//               -> linear(o) -> residual -> rmsnorm -> ffn: linear(gate, up) -> swiglu -> linear(down) -> residual
//               -> early exit (exit_after_layer)
//   logits, counters
//
// A decode step whose plan needs nothing from the host between ops runs the
// same per-layer function once in capture mode and is replayed afterwards.
#pragma once

#include <memory>
#include <optional>
#include <span>
#include <vector>

#include "engine/backend.h"
#include "engine/engine.h"

namespace inferlab {

// The method as one call sees it.
struct MethodCall {
  Method* method = nullptr;
  uint32_t hooks = 0;
  bool cache_positions = false;  // KvPositions::Cache
  RetentionPolicy retention;     // with kHookRetention
  bool bound_per_head = false;   // kHookPageBudget with BoundScope::QueryHead
  ValuePruning values;           // Method::value_pruning
  KvQuantization quant;          // Method::kv_quantization
  const ActivationSparsity* sparsity = nullptr;  // Method::activation_sparsity, when active
  const PredictedLayers* predicted = nullptr;     // Method::component_predictors, when active
  const ExitLayout* exit = nullptr;               // Method::exit_policy, when active
  int32_t draft_layers = 0;  // > 0: a draft step of self-speculation (the first layers only, no KV above)
  SequenceState* state = nullptr;  // the method's state for this sequence
  bool has(uint32_t hook) const { return method != nullptr && (hooks & hook) != 0; }
};

// One sequence of a batched call (Engine::forward_batch).
struct BatchMember {
  KvSequence* seq = nullptr;
  std::span<const int32_t> tokens;
  int64_t logits_from = 0;
  const LogitsSink* sink = nullptr;
  MethodCall call;  // the engine's method, with this sequence's state
};

// The members' calls as one batched call: their plans are made first (every
// hook that plans a step is asked once per member); when they agree on what
// the step runs and need nothing a batched call cannot give (below), the
// call embeds, projects and runs the FFN over every member's rows at once,
// and each layer's attention part (RoPE, key plan, append, attention and the
// hooks around it) runs per member on its focused segment. Otherwise the
// members run one after another from their plans (counter batch_fallbacks).
Status run_batch(Backend& backend, const ModelConfig& config, const EngineOptions& options, EngineCounters& counters,
                 std::span<BatchMember> members);

class ForwardPass {
 public:
  ForwardPass(Backend& backend, const ModelConfig& config, const EngineOptions& options, const MethodCall& method,
              EngineCounters& counters, KvSequence& seq, std::span<const int32_t> tokens,
              ForwardObserver* observer = nullptr);
  Status run(int64_t logits_from, const LogitsSink& sink);
  // run() after plan_step (a batch that fell back planned it already).
  Status run_planned(int64_t logits_from, const LogitsSink& sink);
  // Layer `layer` alone on the call's rows given as its input residual
  // stream; `output` gets its output (Engine::layer_output).
  Status run_single_layer(int32_t layer, std::span<const float> input, std::vector<float>& output);

 private:
  friend class BatchedCall;
  Status plan_step();
  Result<bool> try_replay(const LogitsSink& sink);
  Status run_layers();
  Status run_layer(int32_t layer);
  // run_layer in three parts, so a batched call runs the middle one per
  // sequence between the first and last over every row.
  struct LayerWork {
    ComponentMask mask;
    const ComponentMask* active = nullptr;
    std::vector<int32_t> kept_heads;  // a mask's computed heads, when it masks some
    bool heads_predicted = false;
    // taps, when observed
    std::vector<float> hidden_in, queries, key_rows, value_rows, attention_out, ffn_activation, attention_in, ffn_in,
        ffn_gate, hidden_out;
  };
  Status layer_input(int32_t layer, LayerWork& work);
  Status layer_attention(int32_t layer, LayerWork& work);
  Status layer_output(int32_t layer, LayerWork& work);
  Status skip_layer(int32_t layer, SkippedLayerKv fill);
  Status skipped_kv(int32_t layer);
  Status append_skipped_kv(int32_t layer);
  void count_exit(int32_t layer);
  Status decide_mask(int32_t layer, ComponentMask& mask, const ComponentMask*& active);
  Status decide_keys(int32_t layer, KeyPlan& plan);
  Status select_keys(int32_t layer, KeyPlan& plan);
  bool window_binds(int32_t layer) const;
  Status apply_window(int32_t layer, KeyPlan& plan) const;
  void plan_from_budgets(int32_t layer, KeyPlan& plan) const;
  // The layer's sparse prefill plan, built by the backend from the heads' patterns.
  Status decide_sparse(int32_t layer, const KeyPlan& keys, SparsePlan& sparse);
  Status statistics(int32_t layer);
  Status retain(int32_t layer);
  // Retention per sequence: tokens shallower layers dropped in this call leave
  // this layer before its attention; rows dropped at this layer leave the call.
  Status cascade(int32_t layer);
  Status prune_rows(int32_t layer);
  Status evict(int32_t layer);
  Status drop_tokens(int32_t layer, int32_t kv_head, std::vector<int32_t> drop);
  Status ffn(int32_t layer, const ComponentMask* mask, std::vector<float>& gate, std::vector<float>& activation);
  void count_keys(const KeyPlan& plan, int32_t layer, const ComponentMask* mask = nullptr);
  // Predicted components: the layer's predictors run (Backend::predict), and
  // after the call the heads they chose come back once for the counters.
  Status predict(int32_t layer);
  bool predicted_neurons(int32_t layer) const { return method_.predicted != nullptr && method_.predicted->neurons_at(layer); }
  bool predicted_heads(int32_t layer) const { return method_.predicted != nullptr && method_.predicted->heads_at(layer); }
  Status collect_predicted();
  float input_threshold(int32_t layer, Proj proj) const;
  float gate_threshold(int32_t layer) const;
  Status project(std::span<const Proj> projs, int32_t layer);
  void count_sparse_inputs(int32_t layer);
  Status collect_sparsity();
  void finish_call();
  // After a replayed step: what its eager run counts, and finish_call.
  Status count_replayed();
  Status tap(Tap tap, uint32_t bit, std::vector<float>& out);

  Backend& backend_;
  const ModelConfig& config_;
  const EngineOptions& options_;
  const MethodCall& method_;
  EngineCounters& counters_;
  KvSequence& seq_;
  std::span<const int32_t> tokens_;
  StepInfo step_;
  StepPlan plan_;
  std::vector<KeyPlan> staged_;  // every layer's key plan, decided before a replayed step
  bool capturing_ = false;
  ForwardObserver* observer_ = nullptr;
  // Rows still computed: the call's row index of each (all of them unless
  // retention per sequence pruned some), and what pruning decided so far.
  std::vector<int32_t> row_ids_;
  std::vector<int32_t> cascade_positions_;  // ascending: positions a layer of this call dropped
  std::vector<int32_t> pruned_rows_;        // current rows the layer in progress dropped
  int32_t predicted_layer_ = -1;            // the last layer whose predictors ran (its lookahead is ready)
  std::vector<uint8_t> computed_;           // (n_layers) 1 = the layer ran in this call
  // Decode traffic counted for each (layer, kv head) of a layer with predicted
  // heads, taken back after the call where the predictors masked every query head.
  std::vector<std::array<int64_t, 3>> predicted_traffic_;  // keys, pages, bytes
  int32_t rows() const { return int32_t(row_ids_.size()); }
};

}  // namespace inferlab
