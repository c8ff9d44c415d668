// The CUDA backend: weights in f16/bf16 on the GPU, GEMMs through cuBLAS, the
// KV cache in device pages, attention by the kernels in kernels/cuda, and
// decode steps captured once and replayed as CUDA graphs when their plan
// needs nothing from the host mid-step. Its ops are split by job:
//   cuda_backend.cpp      setup, workspace, call begin/end, batched calls' segments, timing, views
//   cuda_weights.cpp      weights: upload, random init, per-run replacement
//   cuda_layer_ops.cpp    embed, norms, linear, activations, rope, logits
//   cuda_attention.cpp    KV append, key plans, selection by bound, attention, statistics
//   cuda_sparse_prefill.cpp  sparse prefill plans: estimation and build on the device
//   cuda_kv_ops.cpp       eviction, re-rotation, truncation, retention, page tables
//   cuda_graph.cpp        staging, capture and replay of decode steps
//   cuda_exits.cpp        early exit by confidence: the measures and exit heads on the device
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <array>
#include <map>
#include <set>
#include <memory>
#include <string>
#include <vector>

#include "engine/backend.h"
#include "engine/cuda/device_memory.h"
#include "engine/engine.h"
#include "cuda/quant4.cuh"
#include "kernel_types.h"

namespace inferlab {

class CudaBackend final : public Backend {
 public:
  CudaBackend(std::shared_ptr<const Model> model, const EngineOptions& options, int32_t max_context);
  ~CudaBackend() override;
  // Device, stream, cuBLAS, KV pool and page tables; then weights from the
  // model (upload) or from a seed (random_weights).
  Status init_device();
  Status upload_weights();
  Status random_weights(uint64_t seed);

  const char* name() const override { return "cuda"; }
  bool supports(Feature feature) const override;
  std::string device_description() const override;
  int64_t weight_bytes() const override;
  StoredWeights stored_weights() const override;
  std::shared_ptr<KvPagePool> pool() const override { return pool_; }
  // One device pool per width pair, made on first use and kept.
  std::unique_ptr<BackendKvView> kv_view(const KvSequence& seq) const override;

  Status begin_call(const CallSetup& call) override;
  Status embed() override;
  Status rmsnorm(Norm norm, int32_t layer) override;
  Status linear(Proj proj, int32_t layer, const std::vector<int32_t>* rows) override;
  Status swiglu(int64_t cols) override;
  Status linear_sparse(std::span<const Proj> projs, int32_t layer, std::span<const float> thresholds) override;
  Status linear_sparse_one(Proj proj, int32_t layer, float threshold);
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
  Status read_bound_selection(int32_t layer, KeyPlan& plan) override;
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

  Result<bool> prepare_replay(KvSequence& seq, const StepPlan& plan, std::vector<KeyPlan>& keys) override;
  bool has_graph(const StepPlan& plan) const override;
  Status capture_begin(const StepPlan& plan) override;
  Status capture_end(const StepPlan& plan, bool ok) override;
  Status replay(const StepPlan& plan, const LogitsSink& sink) override;

 private:
  struct TableSync {  // what the device copy of one (layer, kv head) page table holds
    uint64_t seq_id = 0;
    uint32_t rewrites = 0;
    int32_t pages = 0;
  };
  // Device copies of a layer's key plan: a fixed region per layer, so a
  // captured step reads every layer's plan at an address that does not move.
  struct PlanRegion {
    int32_t* indptr;        // (n_kv_heads + 1)
    int32_t* keep;          // (n_kv_heads) page budgets
    int32_t* stale_pages;   // (n_kv_heads) a replayed step's one stale page per head
    int32_t* stale_counts;  // (n_kv_heads) its filled slots (0: none)
    int32_t* indices;       // (plan_capacity_)
    uint32_t* heads;        // (plan_capacity_) beside indices: query heads of each entry (KeyPlan::heads)
    uint8_t* modes;         // (n_kv_heads) KeySelect
  };
  // The graph of one decode-step shape.
  struct Graph {
    cudaGraphExec_t exec = nullptr;
  };

  // cuda_backend.cpp
  Status ensure_workspace(int64_t rows);
  void drop_graphs();
  Status next_event_pair(cudaEvent_t*& pair);  // null pair: not timing
  Status download(const void* device, size_t bytes, void* host);
  // cuda_weights.cpp
  void* weight_alloc(int64_t elems, kernels::DType dtype);
  const void* weight(Proj proj, int32_t layer) const;
  // (in, out) of dtype_: a neuron mask's down columns, activation sparsity's
  // skipped inputs as skipped rows (made when first needed, or by
  // prepare_sparsity); null: out of GPU memory.
  const void* transposed(Proj proj, int32_t layer);
  struct LinearIo {
    const void* x;  // (n, in) of dtype_
    float* y;       // (n, out)
    int64_t in, out;
  };
  Result<LinearIo> linear_io(Proj proj);
  Status linear_from(Proj proj, int32_t layer, const void* x, float* y, int64_t in, int64_t out);
  Status gemm(const void* x, const void* w, float* y, int64_t m, int64_t n, int64_t k);
  // cuda_adapters.cpp
  Status apply_adapter(Proj proj, int32_t layer, const void* x, float* y, int64_t in, int64_t out);
  Status reserve_adapter_workspace(int64_t rows);
  // cuda_weight_storage.cpp
  const void* stored_weight(Proj proj, int32_t layer, Status& status);  // dequantized now; null: not stored
  // y = x · W^T through the 4-bit weight itself (a fused dequantizing GEMV)
  // when W is stored in 4 bits and the call has at most 4 rows; false otherwise.
  Result<bool> stored_gemv(Proj proj, int32_t layer, const void* x, float* y, int64_t in, int64_t out);
  struct DeviceQuant4;
  kernels::cuda::Quant4View quant4_view(const DeviceQuant4& d) const;
  // cuda_predictors.cpp
  struct DevicePredictor {
    int32_t keep = 0, rank = 0;
    bool relu = false;
    const float* w1 = nullptr;  // into pred_weights_
    const float* w2 = nullptr;
    const float* b2 = nullptr;
  };
  // Scores the rows of pred_x_ with `p` on `stream` and lists each row's top
  // keep (their union) into list, count (device) and flags (device, zeroed here).
  Status run_predictor(const DevicePredictor& p, int64_t out, uint8_t* flags, int32_t* list, int32_t* count,
                       cudaStream_t stream);
  // Grows a buffer outside a capture (graphs that hold it are dropped).
  Status grow(DeviceMemory& buffer, size_t bytes, const char* what);
  // The main stream waits for the predictions it is about to read.
  Status wait_predicted(cudaEvent_t ready, bool& pending);
  Status join_predictions();
  // cuda_exits.cpp
  struct DeviceExitMap {
    const void* weight = nullptr;  // heads (n_embd, n_embd) of dtype_, classifiers (2, n_embd) float; null: none
    const float* bias = nullptr;   // null: none
  };
  Status upload_exit_heads(const ExitPolicy& policy, std::vector<DeviceExitMap>& heads);
  Status upload_exit_params(const ExitPolicy& policy, std::vector<DeviceExitMap>& heads,
                            std::vector<DeviceExitMap>& classifiers);
  // out (n_embd) = W (row / RMS) + b of layer l's exit head (out may be row).
  Status map_exit_row(int32_t layer, const float* row, float* out);
  // The per-sequence ops' rows of a (rows, cols) float buffer of the
  // workspace: a focused segment's in a batched call, else the call's.
  float* sequence_rows(const DeviceMemory& buffer, int64_t cols) const {
    return buffer.as<float>() + focus_row_ * cols;
  }
  // The residual stream's last row of the call, or of the focused segment:
  // the row the exit ops measure and map.
  float* sequence_last_row() const {
    return sequence_rows(x_, config_.n_embd) + (n_ - 1) * config_.n_embd;
  }
  // The exit state's slot: the focused segment's, 0 outside a focus.
  size_t exit_slot() const { return focused_ >= 0 ? size_t(focused_) : 0; }
  // The staging slot of the per-layer regions (stored counts, page tables, key
  // plans): the focused segment's own, 0 outside a focus. A batched call's
  // segments stage into their own slots, so none waits for another's uploads.
  int32_t staging_slot() const { return focused_ >= 0 ? focused_ : 0; }
  int64_t table_index(int32_t layer, int32_t g) const {
    return (int64_t(staging_slot()) * config_.n_layers + layer) * config_.n_kv_heads + g;
  }
  // The slot's stored counts of `layer` (n_kv_heads), on the device or pinned host.
  int32_t* counts_at(int32_t layer, bool host = false) const {
    return (host ? host_n_cached_.as<int32_t>() : n_cached_.as<int32_t>()) + table_index(layer, 0);
  }
  // The slot's page table of (layer, g) (max_pages_), on the device or pinned host.
  int32_t* table_at(int32_t layer, int32_t g = 0, bool host = false) const {
    return (host ? host_tables_.as<int32_t>() : tables_.as<int32_t>()) + table_index(layer, g) * max_pages_;
  }
  kernels::LayerPageTable layer_table(int32_t layer) const { return {table_at(layer), max_pages_}; }
  // Room for `slots` staging slots (a batched call's segments); moving the
  // regions drops the graphs that hold them.
  Status ensure_staging_slots(int32_t slots);
  // cuda_attention.cpp
  Status stage_counts(const KvSequence& seq, int32_t layer);
  Status stage_append(KvSequence& seq, int32_t layer, int32_t n);
  Status ensure_plan_capacity(int64_t indices);
  PlanRegion plan_region(int32_t layer, bool host) const;
  Status stage_key_plan(int32_t layer, const KeyPlan& plan);
  Status ensure_page_bounds();
  kernels::AttentionCall base_call(const KvPagePool& pool, int32_t layer, int64_t n) const;
  Status attention_values_pruned(const LayerAttention& work, const kernels::AttentionCall& call, int32_t max_keys);
  Status attention_bit_planes(const LayerAttention& work, const kernels::AttentionCall& call, int32_t max_keys);
  // Per kv head, the cached keys its rows read whose V row none of its query
  // heads kept (`kept`: the last row's flags, (n_heads, max_keys)).
  int64_t values_skipped(const LayerAttention& work, const std::vector<uint8_t>& kept, int32_t max_keys) const;
  kernels::PageSelectCall select_call(int32_t layer, const PlanRegion& region, int32_t max_pages,
                                      bool per_head) const;
  // Scratch of a selection by bound over at most max_pages pages per head.
  size_t bound_scratch_bytes(int32_t max_pages, bool per_head) const;
  // cuda_kv_ops.cpp
  Status sync_table(const KvSequence& seq, int32_t layer, int32_t kv_head);
  Status retain_sequence(KvSequence& seq, int32_t layer, const RetentionPolicy& policy,
                         const RetentionBudget& budget, std::vector<std::vector<int32_t>>& drops);
  // cuda_graph.cpp
  int32_t key_bound(int32_t max_keys) const;
  std::string graph_key(const StepPlan& plan) const;

  std::shared_ptr<const Model> model_;
  const ModelConfig& config_;
  EngineOptions options_;
  int32_t max_context_ = 0;
  kernels::DType dtype_ = kernels::DType::F16;
  bool time_attention_ = false;
  std::shared_ptr<CUstream_st> stream_owner_;  // shared with the pools' storage, which may outlive us
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  std::string device_name_;
  DeviceMemory cublas_workspace_;
  std::shared_ptr<KvPagePool> pool_;
  Result<std::shared_ptr<KvPagePool>> make_bit_plane_pool(kernels::BitPlanes planes) override;

  // Weights: per projection and layer (Output: layer 0), the model's or this
  // run's replacement; token_embd and the norms.
  struct DeviceLayerNorms {
    const float* attn = nullptr;  // (n_embd)
    const float* ffn = nullptr;   // (n_embd)
  };
  std::vector<DeviceMemory> weight_buffers_;
  int64_t weight_bytes_ = 0;
  const void* token_embd_ = nullptr;    // (n_vocab, n_embd)
  const float* output_norm_ = nullptr;  // (n_embd)
  std::vector<std::vector<const void*>> weights_;         // [proj][layer] (out, in) of dtype_
  std::vector<DeviceLayerNorms> norms_;
  std::vector<std::array<const float*, 4>> biases_;  // [layer][Q, K, V, O] float, null without
  std::map<std::pair<int32_t, int32_t>, DeviceMemory> overrides_;  // (proj, layer) -> this run's weight
  std::map<std::pair<int32_t, int32_t>, DeviceMemory> transposed_;  // (proj, layer) -> (in, out)
  // Activation sparsity: the sparse GEMV's split partials, a sparsified
  // many-row input, and the zero counts per projection (7, unsigned 64-bit).
  DeviceMemory sparse_partial_, sparse_x_, sparse_zeros_;
  bool sparsity_prepared_ = false;
  struct DeviceAdapter {
    int32_t rank = 0;
    DeviceMemory a, b;  // (rank, in), (out, rank) of dtype_, scales folded into b
  };
  std::map<std::pair<int32_t, int32_t>, DeviceAdapter> adapters_;  // (proj, layer) -> this run's unmerged adapters
  int32_t adapter_rank_max_ = 0;
  DeviceMemory adapter_tmp_, adapter_tmp_t_;  // (rows, rank_max): float, then dtype_
  struct DeviceQuant4 {
    DeviceMemory codes, absmax, absmax_codes, absmax_scale;
    kernels::cpu::Quant4Format format = kernels::cpu::Quant4Format::NF4;
    float absmax_offset = 0;
    int32_t block = 64;
    int64_t n = 0;
  };
  std::map<std::pair<int32_t, int32_t>, DeviceQuant4> stored_;  // (proj, layer) -> this run's 4-bit weight
  DeviceMemory dynamic_map_;     // double quantization's 256-entry map
  DeviceMemory dequant_scratch_; // the largest stored projection, dequantized into dtype_

  // The call in flight.
  int64_t n_ = 0;          // rows of the call still computed
  int64_t call_rows_ = 0;  // rows the call began with
  bool cache_positions_ = false;
  int32_t first_position_ = 0;
  bool capturing_ = false;
  // A batched call (Feature::BatchedCalls): its sequences' rows. While one is
  // focused, the per-sequence ops read and write the workspace from its first
  // row (focus_row_), n_, call_rows_, first_position_ and
  // sequence_retention_started_ describe it, and whole_ keeps the call's.
  std::vector<CallSegment> segments_;
  int32_t focused_ = -1;
  int64_t focus_row_ = 0;
  struct {
    int64_t n = 0, call_rows = 0;
    int32_t first_position = 0;
    bool retention_started = false;
  } whole_;
  std::vector<uint8_t> segment_retention_started_;  // per segment, kept across its focuses
  // stash_segment: per segment, its residual rows kept aside (a buffer per
  // segment, grown on demand and kept across calls) and how many rows this
  // call stashed there (0: none).
  std::vector<DeviceMemory> stashed_;
  std::vector<int64_t> stashed_rows_;
  // Workspace for n rows (n = workspace_rows_):
  DeviceMemory x_;       // (n, n_embd) float residual stream
  DeviceMemory xn_;      // (n, n_embd) dtype, normed input of a GEMM
  DeviceMemory q_;       // (n, q_dim) float
  DeviceMemory k_, v_;   // (n, kv_dim) float
  DeviceMemory attn_;    // (n, q_dim) float
  DeviceMemory attn_t_;  // (n, q_dim) dtype
  DeviceMemory proj_;    // (n, n_embd) float
  DeviceMemory gate_, up_;  // (n, n_ff) float
  DeviceMemory act_;     // (n, n_ff) dtype
  DeviceMemory w_sel_;   // (n_ff, n_embd) dtype: selected weight rows (neuron masks)
  DeviceMemory rows_;    // (n_ff) int32 selected neurons
  DeviceMemory rows_partial_;  // a one-row subset GEMV's split partials
  DeviceMemory head_tmp_;    // (n, kept heads x head_dim): Q of the kept heads, or their attention outputs (dtype)
  DeviceMemory head_flags_;  // (n_heads) uint8: the heads an oracle chooses among
  DeviceMemory logits_;  // (logits_chunk, n_vocab) float
  DeviceMemory ids_;     // (n) int32
  DeviceMemory positions_;  // (n_kv_heads, n) int32
  int64_t workspace_rows_ = 0;
  PinnedMemory host_logits_;  // (logits_chunk, n_vocab)
  PinnedMemory host_small_;   // staging of per-call host data (positions, ids)
  std::vector<int32_t> host_positions_;  // (n) positions of this call

  // Device state shared by all calls:
  int32_t max_pages_ = 0;     // page-table row length
  // Per staging slot (staging_slot(); staging_slots_ of them):
  int32_t staging_slots_ = 0;
  DeviceMemory tables_;       // (slots, n_layers, n_kv_heads, max_pages) int32 physical pages
  PinnedMemory host_tables_;  // host copy of tables_
  std::vector<TableSync> table_sync_;  // (slots, n_layers, n_kv_heads)
  DeviceMemory n_cached_;     // (slots, n_layers, n_kv_heads) int32: stored tokens before this call
  PinnedMemory host_n_cached_;
  DeviceMemory plans_;        // (slots, n_layers) key-plan regions
  PinnedMemory host_plans_;
  int64_t plan_capacity_ = 0;  // indices per region
  int64_t region_ints_ = 0;
  DeviceMemory head_active_;  // (n_heads) uint8
  DeviceMemory key_mass_;     // (n_kv_heads, max_context) float
  DeviceMemory head_norms_;   // (n_heads) float
  // Sparse prefill (cuda_sparse_prefill.cpp): the layer's plan, estimation
  // scratch and outputs; sparse_layout_ points into it for the attention kernel.
  DeviceMemory sparse_;
  kernels::SparseLayout sparse_layout_;
  cudaEvent_t sparse_events_[2] = {nullptr, nullptr};
  DeviceMemory scratch_;      // re-rotation moves and other one-off uploads
  // Key bounds of the pool's pages (kHookPageBudget): (bound_pages_, 2, head_dim)
  // of dtype_ indexed by physical page; what each (layer, kv head) has folded in.
  DeviceMemory page_bounds_;
  int64_t bound_pages_ = 0;
  std::vector<PageBoundSync> bound_sync_;  // (n_layers, n_kv_heads)
  DeviceMemory bound_work_;    // stale pages and their filled slots (eager steps)
  DeviceMemory bound_scores_;  // (n_kv_heads, pages) float scores; per query head (n_heads, pages), then marks
  DeviceMemory attention_ws_;
  DeviceMemory value_work_;    // value pruning, bit planes: probabilities and kept weights per (head, row),
                               // refetch counts per (head, row), kept flags
  // Retention: budgets (n_kv_heads, 3), scores scratch, drop lists.
  DeviceMemory retention_budgets_;
  PinnedMemory host_retention_budgets_;
  DeviceMemory retention_scores_;  // (n_kv_heads, max_context) float
  DeviceMemory retention_drops_;   // (n_kv_heads, max_context) int32
  DeviceMemory retention_counts_;  // (n_kv_heads) int32
  PinnedMemory host_drops_;
  DeviceMemory sequence_work_;     // retention per sequence: positions, scratch, drops
  bool sequence_retention_started_ = false;  // this call's new positions are reset

  // Decode graphs by plan shape, valid while the buffers they captured stay.
  std::map<std::string, Graph> graphs_;
  int32_t graph_bound_ = 0;          // key bound of the step being captured or replayed
  uint64_t planes_at_capture_ = 0;   // the slot planes the graphs write (their storage's generation)
  std::set<std::string> failed_keys_;  // plan shapes whose capture failed: they run eagerly
  std::vector<std::pair<size_t, PageBoundSync>> pending_bounds_;  // coverage a replay makes true

  // Predicted components (cuda_predictors.cpp): the predictors' weights (one
  // allocation), and per layer the choices of the call, written on the device:
  // one-row calls score on a side stream that overlaps the main one (joined
  // by events before each choice is read), more rows on the main stream.
  std::vector<DevicePredictor> pred_neurons_, pred_heads_;  // per layer (keep 0: none)
  DeviceMemory pred_weights_;
  float pred_eps_ = 1e-5f;
  int32_t pred_rank_max_ = 0;
  DeviceMemory pred_x_, pred_hidden_, pred_logits_;  // (rows, n_embd), (rows, rank max), (rows, n_ff or n_heads)
  DeviceMemory pred_flags_;        // (n_ff) uint8 scratch
  DeviceMemory pred_neuron_list_;  // (n_layers, n_ff) int32
  DeviceMemory pred_head_flags_;   // (n_layers, n_heads) uint8: what attention reads
  DeviceMemory pred_head_list_;    // (n_layers, n_heads) int32
  DeviceMemory pred_head_rows_;    // (n_layers, q_dim) int32: the listed heads' rows of W_q
  DeviceMemory pred_counts_;       // (n_layers, 2) int32: neurons, heads
  std::vector<int32_t> pred_host_counts_;  // (n_layers, 2) as read back after many-row calls
  std::vector<int64_t> pred_rows_;         // (n_layers) rows of the call that chose
  cudaStream_t pred_stream_ = nullptr;
  cudaEvent_t pred_fork_ = nullptr, pred_heads_ready_ = nullptr, pred_neurons_ready_ = nullptr, pred_done_ = nullptr;
  int32_t pred_last_layer_ = -1;  // the layer of the latest predict (own heads: pred_heads_ready_)
  bool pred_heads_pending_ = false, pred_neurons_pending_ = false, pred_pending_ = false;

  // Early exit by confidence (cuda_exits.cpp): the policy's measure, its maps
  // per layer (exit heads in one allocation of dtype_; the classifiers and
  // every bias in one float allocation), the layer input kept for the state
  // measure (one slot per segment of a batched call: several sequences
  // check the same layer in one call), one-row scratch, and the confidence
  // the host reads.
  bool exit_active_ = false;
  ExitMeasure exit_measure_ = ExitMeasure::Softmax;
  float exit_eps_ = 1e-5f;
  std::vector<DeviceExitMap> exit_heads_, exit_classifiers_;  // per layer, or empty: none
  DeviceMemory exit_head_weights_, exit_params_;
  DeviceMemory exit_state_;      // (slots, n_embd) float: the checked layer's input row, per exit_slot()
  std::vector<uint8_t> exit_state_kept_;  // (slots) ... kept for the slot's next confidence
  DeviceMemory exit_x_, exit_y_;  // (n_embd) float: a row over its RMS, a row an exit head mapped
  DeviceMemory exit_xt_;          // (n_embd) dtype_: the row over its RMS as a GEMM input
  DeviceMemory exit_out_;         // (3) float: a classifier's logits, then the confidence

  std::vector<cudaEvent_t> events_;  // pairs around attention kernels (time_attention)
  size_t events_used_ = 0;
};

}  // namespace inferlab
