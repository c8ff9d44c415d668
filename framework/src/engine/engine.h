// The common transformer's forward pass over a paged KV cache (CPU backend).
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

struct EngineOptions {
  int32_t page_size = 16;     // tokens per KV page
  int32_t max_context = 0;    // 0: the model's context length
  int32_t n_threads = 0;      // 0: OpenMP's default (all cores)
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
  std::map<std::string, double> as_map() const;
};

class Engine {
 public:
  static Result<std::unique_ptr<Engine>> create(std::shared_ptr<const Model> model, EngineOptions options = {});

  // A new empty sequence whose pages come from this engine's pool.
  std::unique_ptr<KvSequence> new_sequence() const;

  // Runs `tokens` through the model at positions seq.n_past() .. + n - 1, appending
  // their K/V to the cache. Logits are computed for rows [logits_from, n) and handed
  // to `sink` in order (pass logits_from = n for none).
  Status forward(KvSequence& seq, std::span<const int32_t> tokens, int64_t logits_from, const LogitsSink& sink);

  // Convenience: logits of the last token only.
  Result<std::vector<float>> prefill(KvSequence& seq, std::span<const int32_t> tokens);
  Result<std::vector<float>> decode(KvSequence& seq, int32_t token);

  // The method whose hooks run inside forward() (nullptr: dense). `hooks` is the
  // PluginHook set the method declared; only those hooks are called.
  void set_method(Method* method, uint32_t hooks);
  const EngineCounters& counters() const { return counters_; }
  void reset_counters() { counters_ = {}; }
  ModelShape shape() const;

  const Model& model() const { return *model_; }
  const ModelConfig& config() const { return model_->config(); }
  const EngineOptions& options() const { return options_; }
  int32_t max_context() const { return max_context_; }
  KvPagePool& pool() { return *pool_; }
  std::shared_ptr<KvPagePool> shared_pool() const { return pool_; }

 private:
  Engine(std::shared_ptr<const Model> model, EngineOptions options);
  struct LayerCall;  // per-layer state of one forward call (engine.cpp)
  void ensure_workspace(int64_t n_tokens);
  Status run_layer(KvSequence& seq, const StepInfo& step, int32_t layer);
  void fill_skipped_layer(KvSequence& seq, const StepInfo& step, int32_t layer, SkippedLayerKv fill);
  Status attention_layer(KvSequence& seq, const StepInfo& step, int32_t layer, const ComponentMask* mask);
  Status gather_keys(KvSequence& seq, const StepInfo& step, LayerCall& call);
  Status collect_prefill_patterns(const StepInfo& step, LayerCall& call);
  void attend_head(const LayerCall& call, int32_t head, int64_t row_begin, int64_t row_end, float* key_mass);
  Status feedback_and_evict(KvSequence& seq, const StepInfo& step, LayerCall& call);
  Status ffn_layer(int32_t layer, int64_t n, const ComponentMask* mask);
  const std::vector<float>& w_down_transposed(int32_t layer);
  void apply_rope(KvSequence& seq, int32_t layer, int64_t n, bool queries);
  int32_t rotary_position(int32_t kv_head, int64_t row) const;
  void rerotate_keys(KvSequence& seq, int32_t layer, int32_t kv_head);

  std::shared_ptr<const Model> model_;
  EngineOptions options_;
  int32_t max_context_ = 0;
  std::shared_ptr<KvPagePool> pool_;

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

  Method* method_ = nullptr;
  uint32_t hooks_ = 0;
  bool cache_positions_ = false;        // this call's method uses KvPositions::Cache
  std::vector<int32_t> group_positions_;  // (n_kv_heads, call_tokens_) RoPE positions in cache mode
  int64_t call_tokens_ = 0;
  EngineCounters counters_;
  std::vector<std::vector<float>> w_down_t_;  // per layer (n_ff, n_embd), built when a neuron mask first needs it
};

}  // namespace inferlab
