// The CPU backend: the reference implementation of every op (float32,
// OpenBLAS GEMMs, OpenMP attention over host pages).
#pragma once

#include <array>
#include <chrono>
#include <memory>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/quant4.h"
#include "cpu/quant_matmul.h"
#include "engine/backend.h"
#include "engine/engine.h"
#include "engine/thread_governor.h"

namespace inferlab {

class CpuBackend final : public Backend {
 public:
  CpuBackend(std::shared_ptr<const Model> model, const EngineOptions& options, int32_t max_context);

  const char* name() const override { return "cpu"; }
  bool supports(Feature feature) const override;
  std::string device_description() const override;
  // The float32 weights, plus the file's quantized blocks when they are computed with.
  int64_t weight_bytes() const override;
  StoredWeights stored_weights() const override;
  std::shared_ptr<KvPagePool> pool() const override { return pool_; }
  std::unique_ptr<BackendKvView> kv_view(const KvSequence& seq) const override;

  Status begin_call(const CallSetup& call) override;
  Status embed() override;
  Status rmsnorm(Norm norm, int32_t layer) override;
  Status linear(Proj proj, int32_t layer, const std::vector<int32_t>* rows) override;
  Status linear_group(std::span<const Proj> projs, int32_t layer) override;
  Status swiglu(int64_t cols) override;
  Status linear_sparse(std::span<const Proj> projs, int32_t layer, std::span<const float> thresholds) override;
  Status gated_swiglu(int32_t layer, float threshold) override;
  Status linear_heads(Proj proj, int32_t layer, std::span<const int32_t> heads) override;
  Status keep_top_neurons(int32_t k) override;
  Status keep_top_heads(int32_t k, std::span<const uint8_t> computed) override;
  Status prepare_sparsity(const ActivationSparsity& sparsity) override;
  Status read_sparsity(std::array<int64_t, kSparseProjections>& zeros) override;
  Status set_predictors(ComponentPredictors predictors) override;
  Status predict(int32_t layer, bool own_heads) override;
  Status predicted_counts(int32_t layer, int32_t& neurons, int32_t& heads) override;
  Status linear_predicted(Proj proj, int32_t layer) override;
  Status read_predicted_heads(std::vector<uint8_t>& flags) override;
  Status set_exit_policy(ExitPolicy policy) override;
  Status keep_exit_state() override;
  Result<float> exit_confidence(int32_t layer) override;
  Status apply_exit_head(int32_t layer) override;
  Status focus_segment(int32_t segment) override;
  Status unfocus_segment() override;
  Status stash_segment(bool restore) override;
  Status add_residual() override;
  Status add_bias(Proj proj, int32_t layer) override;
  Status rope(const KvSequence& seq, int32_t layer, bool queries) override;
  Status append_kv(KvSequence& seq, int32_t layer) override;
  Status select_by_bound(const KvSequence& seq, int32_t layer, KeyPlan& plan) override;
  Status plan_sparse_prefill(const KvSequence& seq, int32_t layer,
                             std::span<const std::optional<PrefillPattern>> patterns, SparsePlan& plan) override;
  Status attention(const KvSequence& seq, const LayerAttention& work) override;
  Status read_statistics(const KvSequence& seq, int32_t layer, LayerStatistics& out) override;
  Status retain(KvSequence& seq, int32_t layer, const RetentionPolicy& policy,
                std::span<const RetentionBudget> budgets, std::vector<std::vector<int32_t>>& drops) override;
  Status read_hidden(int64_t row_from, std::vector<float>& out) override;
  Status read_last_queries(std::vector<float>& out) override;
  Status write_hidden(std::span<const float> rows) override;
  Status read_tap(Tap tap, std::vector<float>& out) override;
  Status set_weight_adapter(Proj proj, int32_t layer, int32_t rank, std::span<const float> a,
                            std::span<const float> b) override;
  Status set_weight_storage(Proj proj, int32_t layer, const WeightStorage& storage,
                            std::span<const float> weight) override;
  Result<int32_t> evict(KvSequence& seq, int32_t layer, int32_t kv_head, std::vector<int32_t> drop) override;
  Status rerotate(KvSequence& seq, int32_t layer, int32_t kv_head) override;
  Status keep_rows(std::span<const int32_t> rows) override;
  Status logits(int64_t from, int64_t rows, const LogitsSink& sink) override;
  Status end_call(double& attention_seconds) override;
  Status truncate(KvSequence& seq, int32_t n) override;
  Status set_weight_override(Proj proj, int32_t layer, std::span<const float> data) override;
  void set_time_attention(bool on) override { time_attention_ = on; }

 private:
  struct AttentionRefs;  // the pages each kv head reads (cpu_backend_attention.cpp)
  const float* weight(Proj proj, int32_t layer) const;
  struct LinearIo {  // a projection's input and output rows in the workspace
    const float* x;
    float* y;
    int64_t in, out;
  };
  LinearIo linear_io(Proj proj);
  // The file's quantized weight of (proj, layer) when this run computes with it:
  // weights = file, a type the kernels know, no replacement or 4-bit storage.
  const kernels::cpu::QuantMatrixRef* file_weight(Proj proj, int32_t layer) const;
  int32_t rotary_position(int32_t kv_head, int64_t row) const;
  void attend_head(const AttentionRefs& refs, int32_t head, int64_t r0, int64_t r1, float* key_mass);
  void attend_sparse_block(const AttentionRefs& refs, int32_t head, int32_t query_block, float* key_mass);
  void attend_groups(const AttentionRefs& refs, bool keep_stats);
  void attend_values_pruned(const AttentionRefs& refs, const ValuePruning& values, bool keep_stats, int64_t* skipped,
                            const KvQuantization* requant, RequantTally* tally);
  void attend_progressive(const AttentionRefs& refs, bool keep_stats, const KvQuantization& requant,
                          RequantTally& tally);
  // refetched (n rows, or null): which of the head's rows were computed with the LSB planes.
  void add_key_mass(const AttentionRefs& refs, int32_t head, const uint8_t* refetched = nullptr);
  // keep_stats: each query vector's merged softmax max and sum in stats_ml_ (as attend_groups).
  void attend_split_keys(const AttentionRefs& refs, bool keep_stats = false);
  void group_mass(int32_t kv_head, std::vector<float>& mass) const;
  Status rerotate_from_originals(KvSequence& seq, int32_t layer, int32_t kv_head);
  Status retain_sequence(KvSequence& seq, int32_t layer, const RetentionPolicy& policy,
                         const RetentionBudget& budget, std::vector<std::vector<int32_t>>& drops);

  std::shared_ptr<const Model> model_;
  const ModelConfig& config_;
  std::shared_ptr<KvPagePool> pool_;
  Result<std::shared_ptr<KvPagePool>> make_bit_plane_pool(kernels::BitPlanes planes) override;
  bool time_attention_ = false;
  double attention_seconds_ = 0;
  int32_t max_context_ = 0;

  // Threads: all of them for long calls; decode-sized calls as the governor says.
  int32_t max_threads_ = 1;
  ThreadGovernor governor_{1};
  OtherLoad other_load_;
  int64_t governed_calls_ = 0;
  bool governed_call_ = false;
  std::chrono::steady_clock::time_point call_start_;

  // The call in flight.
  std::vector<int32_t> tokens_;
  bool sequence_retention_started_ = false;  // this call's new positions are reset
  int64_t n_ = 0;            // rows of the call still computed
  int64_t call_rows_ = 0;    // rows the call began with
  int32_t call_first_position_ = 0;
  bool cache_positions_ = false;
  // Workspace, grown on demand. Shapes for n tokens of this call:
  std::vector<float> x_;         // (n, n_embd) residual stream
  std::vector<float> xn_;        // (n, n_embd) normed input
  std::vector<float> q_;         // (n, q_dim)
  std::vector<float> k_;         // (n, kv_dim)
  std::vector<float> v_;         // (n, kv_dim)
  std::vector<float> attn_;      // (n, q_dim)
  std::vector<float> proj_;      // (n, n_embd)
  std::vector<float> gate_;      // (n, n_ff); also the activation
  std::vector<float> up_;        // (n, n_ff)
  std::vector<float> logits_;    // (logits_chunk, n_vocab)
  std::vector<float> stats_ml_;  // attention statistics: per query head, each row's softmax max then sum
  std::vector<float> split_o_, split_ml_;  // split-key decode partials: (items, rows x group, head_dim), (items, 2, ...)
  std::vector<int32_t> positions_;  // (n)
  // A batched call: its sequences' rows, and while one is focused the whole
  // call's q, k, v, attention output, positions and tokens (the workspace
  // members then hold the segment's rows alone).
  std::vector<CallSegment> segments_;
  int32_t focused_ = -1;
  int64_t x_row0_ = 0;  // the focused segment's first row in x_ (the residual stream is not swapped)
  std::vector<std::vector<float>> stashed_;  // per segment: its residual rows kept aside (stash_segment)
  // The call's last row of the residual stream, or the focused segment's.
  float* last_row() { return x_.data() + (x_row0_ + n_ - 1) * config_.n_embd; }
  struct CallRows {
    std::vector<float> q, k, v, attn;
    std::vector<int32_t> positions, tokens;
    int64_t n = 0;
  } call_;
  void swap_call_rows();  // the workspace's per-sequence members <-> call_
  int64_t workspace_tokens_ = 0;
  std::vector<int32_t> group_positions_;  // (n_kv_heads, n) RoPE positions in cache mode
  // Statistics of the layer last computed: per query head, mass per stored token.
  std::vector<std::vector<float>> head_mass_;
  int32_t stats_layer_ = -1;

  // Weights replaced for the current method's runs: (projection, layer) -> (out, in).
  // [proj][layer or 0 for output]: this run's replaced weights, in huge pages
  // as the model's are (a decode streams them too); the arena goes when the
  // last of them does.
  std::vector<std::vector<WeightVector>> overrides_;
  std::shared_ptr<WeightArena> override_arena_;
  struct Adapter {
    int32_t rank = 0;
    std::vector<float> a, b;  // (rank, in), (out, rank), scales folded in
  };
  std::vector<std::vector<Adapter>> adapters_;  // [proj][layer]
  std::vector<float> adapter_tmp_;              // (n, rank)
  std::vector<std::vector<std::unique_ptr<kernels::cpu::Quant4Tensor>>> stored_;  // [proj][layer]: 4-bit for this run
  std::vector<float> dequant_scratch_;          // a stored projection dequantized for a many-row call
  // weights = file: the model's quantized projections [proj][layer or 0 for output]
  // (rows == 0: none, computed in float32), and the kernels' scratch.
  std::vector<std::vector<kernels::cpu::QuantMatrixRef>> file_weights_;
  kernels::cpu::QuantScratch quant_scratch_;
  Status apply_adapter(Proj p, int32_t layer, const float* x, float* y, int64_t in, int64_t out);
  // Transposed float32 weights [proj][layer] (in, out): a neuron mask's down
  // columns, activation sparsity's skipped inputs as skipped rows. Built when
  // first needed (prepare_sparsity builds a sparse method's up front).
  std::vector<std::vector<std::vector<float>>> transposed_;
  const std::vector<float>& transposed(Proj proj, int32_t layer);
  // x W^T for the call's rows from input `x` (the projection's own, or a sparsified copy), adapters included.
  Status linear_from(Proj p, int32_t layer, const float* x);
  std::vector<float> sparse_x_;  // a sparsified input
  std::vector<int32_t> head_rows_;  // linear_heads: the kept heads' rows of W_q (columns of W_o)
  std::vector<float> head_scratch_;
  std::array<int64_t, kSparseProjections> sparsity_zeros_{};
  // Predicted components (cpu_predictors.cpp): the method's predictors, and
  // per layer the neurons and heads they chose in this call.
  ComponentPredictors predictors_;
  // Scores rows x_ with `p` (out outputs) and marks each row's top keep in flags.
  void run_predictor(const LowRankPredictor& p, int64_t out, std::vector<uint8_t>& flags);
  std::vector<float> pred_x_, pred_hidden_, pred_logits_;
  std::vector<std::vector<int32_t>> predicted_neurons_;  // [layer] ascending
  std::vector<std::vector<int32_t>> predicted_heads_;    // [layer] ascending
  std::vector<ComponentMask> predicted_masks_;           // [layer] heads as attention reads them
  // Early exit by confidence (cpu_exits.cpp): the method's policy, the layer
  // input kept for the state measure, and scratch.
  ExitPolicy exits_;
  std::vector<float> exit_x_, exit_y_;
  // The layer input keep_exit_state kept: the call's, or per segment of a batched call.
  std::vector<std::vector<float>> exit_states_{1};
  std::vector<float>& exit_state() {
    const size_t at = focused_ >= 0 ? size_t(focused_) : 0;
    if (exit_states_.size() <= at) exit_states_.resize(at + 1);
    return exit_states_[at];
  }
  void exit_map(const ExitMap& m, int64_t out, const float* h, float* y);
  // The output head over `rows` normed rows xn (rows, n_embd) into out (rows, n_vocab).
  void output_head(const float* xn, int64_t rows, float* out);
  // Key bounds of the pool's pages (kHookPageBudget): (pages_reserved, 2, head_dim)
  // indexed by physical page, what each (layer, kv head) has folded in, and scratch.
  std::vector<float> page_bounds_;
  std::vector<PageBoundSync> bound_sync_;  // (n_layers, n_kv_heads)
  std::vector<float> bound_scores_;
};

}  // namespace inferlab
