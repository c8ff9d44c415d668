// The common transformer's forward pass over a paged KV cache (CPU backend).
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "engine/kv_cache.h"
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

  const Model& model() const { return *model_; }
  const ModelConfig& config() const { return model_->config(); }
  const EngineOptions& options() const { return options_; }
  int32_t max_context() const { return max_context_; }
  KvPagePool& pool() { return *pool_; }

 private:
  Engine(std::shared_ptr<const Model> model, EngineOptions options);
  void ensure_workspace(int64_t n_tokens);
  void attention_layer(KvSequence& seq, int32_t layer, int64_t n_tokens, int32_t n_cached_before);

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
};

}  // namespace inferlab
