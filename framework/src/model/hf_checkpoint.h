// Hugging Face checkpoint folders: config.json, the weights as
// model.safetensors or as shards listed by model.safetensors.index.json, and
// tokenizer.json (tokenizer_config.json beside it for special tokens and the
// chat template). Llama-family decoders only: model_type llama, mistral
// (sliding-window attention) and qwen2 (Q/K/V bias, sliding layers).
//
// Hugging Face keeps each head's rotary pairs as halves (rotate_half), where
// GGUF conversion permutes Q/K rows into adjacent pairs; a checkpoint loads
// with ModelConfig::rope_neox set and its rows as they are.
#pragma once

#include <filesystem>
#include <string>
#include <vector>

#include "inferlab/result.h"
#include "model/model_config.h"

namespace inferlab::hf {

// A folder holding config.json.
bool is_checkpoint(const std::filesystem::path& path);

// config.json's hyper-parameters, validated; errors name the file and the key.
// Refused: another model_type, an activation other than SiLU, MLP biases,
// RoPE scaling other than linear and llama3, or partial rotary dims. n_vocab
// comes from vocab_size.
Result<ModelConfig> read_config(const std::filesystem::path& config_json);

// The safetensors file holding each tensor: the one model.safetensors, or the
// index's weight_map (its file names resolved in the folder; a name outside
// the folder is refused).
struct WeightFiles {
  std::vector<std::filesystem::path> files;         // each once, in index order
  std::vector<std::pair<std::string, size_t>> map;  // tensor name -> into files
};
Result<WeightFiles> weight_files(const std::filesystem::path& folder);

// Hugging Face's tensor names.
std::string layer_tensor_name(int32_t layer, LayerTensor tensor);  // "model.layers.3.self_attn.q_proj.weight"
inline constexpr const char* kEmbeddingName = "model.embed_tokens.weight";
inline constexpr const char* kNormName = "model.norm.weight";
inline constexpr const char* kLmHeadName = "lm_head.weight";

}  // namespace inferlab::hf
