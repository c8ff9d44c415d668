// Llama-family hyper-parameters read from GGUF metadata, and the table of GGUF
// tensor names (the only place those strings live).
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "inferlab/result.h"
#include "kernel_types.h"

namespace inferlab {

struct ModelConfig {
  std::string architecture;  // general.architecture, e.g. "llama"
  std::string name;          // general.name (may be empty)
  int32_t n_layers = 0;
  int32_t n_embd = 0;
  int32_t n_ff = 0;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t rope_dim = 0;  // dims of a head that rotate (== head_dim for Llama)
  int32_t n_vocab = 0;
  int32_t context_length = 0;
  float rope_theta = 10000.0f;
  bool rope_neox = false;  // pair layout; GGUF "llama" uses adjacent pairs
  // Long-context frequency scaling (config.json's rope_type linear / llama3,
  // GGUF's rope.scaling.type linear), and GGUF's per-pair rope_freqs.weight.
  kernels::RopeScaling rope_scaling;
  std::vector<float> rope_freq_factors;
  // What the RoPE kernels take (freq_factors pointing into this config).
  kernels::RopeScaling rope() const {
    kernels::RopeScaling s = rope_scaling;
    s.freq_factors = rope_freq_factors.empty() ? nullptr : rope_freq_factors.data();
    return s;
  }
  float rms_eps = 1e-5f;
  bool tied_embeddings = false;  // no output.weight: the embedding is the LM head
  // Q, K and V projections add a bias (Qwen2; Llama's attention_bias also
  // gives O one): y = x W^T + b.
  bool qkv_bias = false;
  bool o_bias = false;
  // Sliding-window attention (Mistral, Qwen2's sliding layers): per layer, the
  // number of keys a query at position p sees, itself included (positions
  // p - window + 1 .. p); 0 = all. Empty: no layer has a window.
  std::vector<int32_t> layer_window;
  int32_t window(int32_t layer) const { return layer_window.empty() ? 0 : layer_window[size_t(layer)]; }
  bool has_window() const {
    for (int32_t w : layer_window)
      if (w > 0) return true;
    return false;
  }

  int64_t q_dim() const { return int64_t(n_heads) * head_dim; }
  int64_t kv_dim() const { return int64_t(n_kv_heads) * head_dim; }
  int32_t group_size() const { return n_heads / n_kv_heads; }
};

// Validates architecture, presence and ranges of every hyper-parameter.
Result<ModelConfig> read_model_config(const gguf::File& file);

// Per-layer tensors of the Llama graph.
enum class LayerTensor { attn_norm, attn_q, attn_k, attn_v, attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down };
inline constexpr int kLayerTensorCount = 9;

std::string layer_tensor_name(int32_t layer, LayerTensor tensor);
std::string layer_bias_name(int32_t layer, LayerTensor tensor);  // "blk.3.attn_q.bias"
inline constexpr const char* kTokenEmbeddingName = "token_embd.weight";
inline constexpr const char* kOutputNormName = "output_norm.weight";
inline constexpr const char* kOutputName = "output.weight";

// Expected GGUF dims (ggml order: input dim first) of a layer tensor.
std::vector<int64_t> layer_tensor_dims(const ModelConfig& config, LayerTensor tensor);

}  // namespace inferlab
