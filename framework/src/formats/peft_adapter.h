// PEFT LoRA adapters (huggingface/peft): a folder with adapter_config.json
// and adapter_model.safetensors, read into low-rank adapters on this engine's
// projections. The config gives r, lora_alpha, use_rslora, target_modules (a
// list of module-name suffixes, a regex matched against the whole module
// name, or "all-linear"), rank_pattern / alpha_pattern (per-module overrides
// keyed by a regex or suffix) and layers_to_transform; other keys are
// ignored. Hugging Face module names map to GGUF tensors (q_proj -> attn_q,
// ..., down_proj -> ffn_down, lm_head -> output). GGUF conversion permutes the
// rows of q_proj and k_proj per head (RoPE's rotate-half pairs become
// adjacent pairs), so the rows of their lora_B are permuted the same way, or
// the adapter would meet the wrong rows (unless the model keeps Hugging
// Face's order: a checkpoint folder, or a NeoX-RoPE GGUF such as Qwen2's,
// whose conversion permutes nothing). Everything is checked against the
// model's shape; errors name the file, the key or the tensor.
#pragma once

#include <array>
#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "inferlab/plugin.h"
#include "inferlab/result.h"

namespace inferlab::peft {

// The layer projections an adapter can sit on, in one order: Hugging Face's
// module names and this engine's (GGUF's) tensor names.
inline constexpr std::array<const char*, 7> kProjectionModules = {"q_proj",    "k_proj",  "v_proj",   "o_proj",
                                                                  "gate_proj", "up_proj", "down_proj"};
inline constexpr std::array<const char*, 7> kProjectionTensors = {"attn_q",   "attn_k", "attn_v",  "attn_output",
                                                                  "ffn_gate", "ffn_up", "ffn_down"};

struct AdapterConfig {
  int32_t r = 8;
  double lora_alpha = 8;
  bool use_rslora = false;
  std::vector<std::string> target_list;  // module-name suffixes
  std::string target_regex;              // or a regex over the whole name
  bool all_linear = false;               // or every linear layer but the output head
  std::vector<std::pair<std::string, int32_t>> rank_pattern;
  std::vector<std::pair<std::string, double>> alpha_pattern;
  std::vector<int32_t> layers_to_transform;  // empty: every layer
};

// adapter_config.json's text; `origin` names it in errors.
Result<AdapterConfig> parse_config(const std::string& text, const std::string& origin);

// One projection's adapter, with its scale (alpha / r, or alpha / sqrt(r)).
struct ProjectionAdapter {
  std::string tensor;  // "attn_q" ... "ffn_down", "output"
  int32_t layer = -1;  // -1 for the output head
  LowRankAdapter adapter;
};

// GGUF's row order for a projection of `heads` heads of head_dim rows each:
// row h*D + 2i + j holds Hugging Face's row h*D + j*D/2 + i (rows of `cols`
// values, in place of a copy).
std::vector<float> permute_rows_for_gguf(const std::vector<float>& rows, int32_t heads, int32_t head_dim,
                                         int64_t cols);

// The inverse: Hugging Face's row order from GGUF's.
std::vector<float> permute_rows_from_gguf(const std::vector<float>& rows, int32_t heads, int32_t head_dim,
                                          int64_t cols);

// The adapter in `dir` for a model of `shape` (`tied`: the output head shares
// the embedding, so an lm_head adapter is refused).
// `gguf_rows`: the model's Q/K rows are in GGUF's permuted order (see above).
Result<std::vector<ProjectionAdapter>> read_adapter(const std::filesystem::path& dir, const ModelShape& shape,
                                                    bool tied, bool gguf_rows = true);

struct WriteOptions {
  bool use_rslora = false;       // the adapters' scales are alpha / sqrt(r) (else alpha / r)
  bool gguf_rows = true;         // the adapters' q/k rows are in GGUF's permuted order (read_adapter)
  double lora_dropout = 0;       // recorded in the config (training-time only)
  std::string base_model;        // base_model_name_or_path
  bool overwrite = false;        // replace a folder that already holds an adapter
};

// Writes adapters (in this engine's row order, as read_adapter returns them)
// as a PEFT adapter folder that read_adapter and PEFT load: float32
// adapter_model.safetensors with Hugging Face module names (lora_B of q_proj
// and k_proj back in Hugging Face's row order), and an adapter_config.json
// with r and lora_alpha (the most common; others as rank_pattern /
// alpha_pattern), target_modules (module names, with layers_to_transform when
// every layer holds the same modules, else a regex naming each module). The
// folder is written under a temporary name beside `dir` and renamed into
// place, so a failure leaves no half-written adapter; an existing `dir` is
// refused unless options.overwrite.
Status write_adapter(const std::filesystem::path& dir, const std::vector<ProjectionAdapter>& adapters,
                     const ModelShape& shape, const WriteOptions& options);

}  // namespace inferlab::peft
