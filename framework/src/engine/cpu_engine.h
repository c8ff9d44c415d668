// The CPU backend: the reference implementation of the engine (float32,
// OpenBLAS GEMMs, OpenMP attention over host pages).
#pragma once

#include "engine/engine.h"

namespace inferlab {

class CpuEngine final : public Engine {
 public:
  CpuEngine(std::shared_ptr<const Model> model, EngineOptions options);

  Status forward(KvSequence& seq, std::span<const int32_t> tokens, int64_t logits_from,
                 const LogitsSink& sink) override;
  std::string device_description() const override;
  int64_t weight_bytes() const override;

 private:
  struct LayerCall;  // per-layer state of one forward call (engine.cpp)
  void ensure_workspace(int64_t n_tokens);
  Status run_layer(KvSequence& seq, const StepInfo& step, int32_t layer);
  void fill_skipped_layer(KvSequence& seq, const StepInfo& step, int32_t layer, SkippedLayerKv fill);
  Status attention_layer(KvSequence& seq, const StepInfo& step, int32_t layer, const ComponentMask* mask);
  Status gather_keys(KvSequence& seq, const StepInfo& step, LayerCall& call);
  std::vector<KvSelection> select_by_bound(KvSequence& seq, const StepInfo& step, int32_t layer,
                                           const std::vector<int32_t>& budgets);
  Status collect_prefill_patterns(const StepInfo& step, LayerCall& call);
  void attend_head(const LayerCall& call, int32_t head, int64_t row_begin, int64_t row_end, float* key_mass);
  Status feedback_and_evict(KvSequence& seq, const StepInfo& step, LayerCall& call);
  Status ffn_layer(int32_t layer, int64_t n, const ComponentMask* mask);
  const std::vector<float>& w_down_transposed(int32_t layer);
  void apply_rope(KvSequence& seq, int32_t layer, int64_t n, bool queries);
  int32_t rotary_position(int32_t kv_head, int64_t row) const;
  void rerotate_keys(KvSequence& seq, int32_t layer, int32_t kv_head);

  // Workspace, grown on demand. Shapes for n tokens of this call:
  std::vector<float> x_;         // (n, n_embd) residual stream
  std::vector<float> xn_;        // (n, n_embd) normed input
  std::vector<float> q_;         // (n, q_dim)
  std::vector<float> k_;         // (n, kv_dim)
  std::vector<float> v_;         // (n, kv_dim)
  std::vector<float> attn_;      // (n, q_dim)
  std::vector<float> proj_;      // (n, n_embd)
  std::vector<float> gate_;      // (n, n_ff)
  std::vector<float> up_;        // (n, n_ff)
  std::vector<float> logits_;    // (logits_chunk, n_vocab)
  std::vector<int32_t> positions_;  // (n)
  int64_t workspace_tokens_ = 0;

  std::vector<int32_t> group_positions_;  // (n_kv_heads, call_tokens_) RoPE positions in cache mode
  int64_t call_tokens_ = 0;
  std::vector<std::vector<float>> w_down_t_;  // per layer (n_ff, n_embd), built when a neuron mask first needs it
  // Key bounds of the pool's pages (kHookPageBudget): (pages_reserved, 2, head_dim)
  // indexed by physical page, what each (layer, kv head) has folded in, and scratch.
  std::vector<float> page_bounds_;
  std::vector<PageBoundSync> bound_sync_;  // (n_layers, n_kv_heads)
  std::vector<float> bound_scores_;
};

}  // namespace inferlab
