// The CUDA backend: weights in f16/bf16 on the GPU, GEMMs through cuBLAS, the
// KV cache in device pages, attention by the kernels in kernels/cuda, and
// decode steps replayed from CUDA graphs when no method hook needs the host
// inside the step. Method hooks behave as on the CPU backend (the reference).
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <vector>

#include "engine/cuda/device_memory.h"
#include "engine/engine.h"
#include "kernel_types.h"

namespace inferlab {

class CudaEngine final : public Engine {
 public:
  // Uploads the model's weights (converted to options.gpu_dtype).
  static Result<std::unique_ptr<CudaEngine>> create(std::shared_ptr<const Model> model, EngineOptions options);
  // A model of this shape with random weights made on the GPU from `seed`
  // (the scales of write_synthetic_model): 7B-sized timing without a file.
  static Result<std::unique_ptr<CudaEngine>> create_random(const ModelConfig& config, uint64_t seed,
                                                           EngineOptions options);
  ~CudaEngine() override;

  Status forward(KvSequence& seq, std::span<const int32_t> tokens, int64_t logits_from,
                 const LogitsSink& sink) override;
  std::string device_description() const override;
  int64_t weight_bytes() const override { return weight_bytes_; }

  // Decode steps served from a CUDA graph so far (tests and benchmarks check it).
  int64_t graph_replays() const { return graph_replays_; }

 private:
  struct DeviceLayer {
    const float* attn_norm = nullptr;  // (n_embd)
    const float* ffn_norm = nullptr;   // (n_embd)
    const void* wq = nullptr;          // (q_dim, n_embd)
    const void* wk = nullptr;          // (kv_dim, n_embd)
    const void* wv = nullptr;          // (kv_dim, n_embd)
    const void* wo = nullptr;          // (n_embd, q_dim)
    const void* w_gate = nullptr;      // (n_ff, n_embd)
    const void* w_up = nullptr;        // (n_ff, n_embd)
    const void* w_down = nullptr;      // (n_embd, n_ff)
  };
  struct TableSync {  // what the device copy of one (layer, kv head) page table holds
    uint64_t seq_id = 0;
    uint32_t rewrites = 0;
    int32_t pages = 0;
  };
  struct LayerHooks;  // per-layer method decisions of one call (cuda_engine.cpp)

  CudaEngine(std::shared_ptr<const Model> model, EngineOptions options);
  Status init_device();
  Status upload_weights();
  Status random_weights(uint64_t seed);
  void* weight_alloc(int64_t elems, kernels::DType dtype);
  Status ensure_workspace(int64_t n_rows);

  Status forward_layers(KvSequence& seq, const StepInfo& step, std::span<const int32_t> tokens);
  Status run_layer(KvSequence& seq, const StepInfo& step, int32_t layer);
  Status fill_skipped_layer(KvSequence& seq, const StepInfo& step, int32_t layer);
  Status attention(KvSequence& seq, const StepInfo& step, int32_t layer, const ComponentMask* mask);
  Status ffn(int32_t layer, int64_t n, const ComponentMask* mask);
  Status project_qkv(int32_t layer, int64_t n, bool queries);
  Status rope(KvSequence& seq, int32_t layer, int64_t n, bool queries);
  Status append_kv(KvSequence& seq, int32_t layer, int64_t n);
  Status sync_table(const KvSequence& seq, int32_t layer, int32_t kv_head);
  Status select_keys(KvSequence& seq, const StepInfo& step, int32_t layer, kernels::AttentionCall& call);
  Status select_by_bound(KvSequence& seq, const StepInfo& step, int32_t layer, const std::vector<int32_t>& budgets,
                         int32_t max_pages, const int32_t* offsets, int32_t* out);
  Status prefill_patterns(const KvSequence& seq, const StepInfo& step, int32_t layer, kernels::AttentionCall& call);
  Status feedback_and_evict(KvSequence& seq, const StepInfo& step, int32_t layer);
  Status rerotate_keys(KvSequence& seq, int32_t layer, int32_t kv_head);
  Status logits(int64_t n, int64_t logits_from, const LogitsSink& sink);
  Status decode_graph_step(KvSequence& seq, const StepInfo& step, int32_t token, const LogitsSink& sink);
  bool graph_eligible(const StepInfo& step) const;
  void drop_graph();
  Status next_event_pair(cudaEvent_t*& pair);  // (start, stop) events for one attention call
  void collect_attention_time();
  Status gemm(const void* x, const void* w, float* y, int64_t m, int64_t n, int64_t k);
  kernels::AttentionCall base_call(int32_t layer, int64_t n) const;
  const void* w_down_transposed(int32_t layer);
  std::vector<float> download(const float* device, int64_t count);

  kernels::DType dtype_ = kernels::DType::F16;
  std::shared_ptr<CUstream_st> stream_owner_;  // shared with the pools' storage, which may outlive us
  cudaStream_t stream_ = nullptr;
  cublasHandle_t cublas_ = nullptr;
  std::string device_name_;
  DeviceMemory cublas_workspace_;

  std::vector<DeviceMemory> weight_buffers_;
  int64_t weight_bytes_ = 0;
  const void* token_embd_ = nullptr;   // (n_vocab, n_embd)
  const void* lm_head_ = nullptr;      // (n_vocab, n_embd)
  const float* output_norm_ = nullptr; // (n_embd)
  std::vector<DeviceLayer> layers_;
  std::vector<DeviceMemory> w_down_t_;  // per layer (n_ff, n_embd), built when a neuron mask first needs it

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
  DeviceMemory logits_;  // (logits_chunk, n_vocab) float
  DeviceMemory ids_;     // (n) int32
  DeviceMemory positions_;  // (n_kv_heads, n) int32
  int64_t workspace_rows_ = 0;
  PinnedMemory host_logits_;  // (logits_chunk, n_vocab)
  PinnedMemory host_small_;   // staging of per-call host data (positions, ids, selections)

  // Device state shared by all calls:
  int32_t max_pages_ = 0;     // page-table row length
  DeviceMemory tables_;       // (n_layers, n_kv_heads, max_pages) int32 physical pages
  PinnedMemory host_tables_;  // host copy of tables_
  std::vector<TableSync> table_sync_;  // (n_layers, n_kv_heads)
  DeviceMemory n_cached_;     // (n_layers, n_kv_heads) int32: stored tokens before this call
  PinnedMemory host_n_cached_;
  DeviceMemory head_active_;  // (n_heads) uint8
  DeviceMemory key_mass_;     // (n_kv_heads, max_context) float
  DeviceMemory head_norms_;   // (n_heads) float
  DeviceMemory select_;       // selection: (n_kv_heads) mode, (n_kv_heads + 1) indptr, indices
  std::vector<uint8_t> select_modes_;  // (n_kv_heads) KeySelect of the layer being computed
  // Key bounds of the pool's pages (kHookPageBudget): (bound_pages_, 2, head_dim)
  // of dtype_ indexed by physical page; what each (layer, kv head) has folded in.
  DeviceMemory page_bounds_;
  int64_t bound_pages_ = 0;
  std::vector<PageBoundSync> bound_sync_;  // (n_layers, n_kv_heads)
  DeviceMemory bound_work_;    // keep per head, stale pages, their filled slots
  DeviceMemory bound_scores_;  // (n_kv_heads, pages) float
  DeviceMemory blocks_;       // block-sparse: flags, indptr, key blocks
  DeviceMemory attention_ws_;
  std::vector<int32_t> host_positions_;  // (n_kv_heads, n) RoPE positions of this call

  // CUDA graph of a dense decode step, valid for keys up to graph_max_keys_.
  cudaGraphExec_t graph_ = nullptr;
  int32_t graph_max_keys_ = 0;
  int64_t graph_replays_ = 0;

  std::vector<cudaEvent_t> events_;  // pairs around attention kernels (time_attention)
  size_t events_used_ = 0;
};

}  // namespace inferlab
