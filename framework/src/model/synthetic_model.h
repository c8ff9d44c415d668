// Llama models with random weights written as GGUF, for tests (tiny shapes, no
// download) and for timing (real shapes). Deterministic for a given seed.
#pragma once

#include <cstdint>
#include <filesystem>
#include <string>
#include <vector>

#include "gguf/gguf.h"
#include "inferlab/result.h"
#include "model/model_config.h"

namespace inferlab {

struct SyntheticModelSpec {
  std::string name = "synthetic-llama";
  int32_t n_layers = 2;
  int32_t n_embd = 64;
  int32_t n_ff = 160;
  int32_t n_heads = 4;
  int32_t n_kv_heads = 2;
  int32_t context_length = 1024;
  float rope_theta = 10000.0f;
  float rms_eps = 1e-5f;
  bool tied_embeddings = true;
  // Type of the 2-D weight matrices (norms stay F32). F32, F16, BF16, Q8_0, Q4_0, Q4_1.
  gguf::TensorType weight_type = gguf::TensorType::F32;
  // Extra BPE merges on top of the 256 byte tokens (vocab = 256 + merges + 3 specials).
  int32_t n_merges = 64;
  // When larger than that, the vocabulary is padded with unused tokens to this
  // size, so the embedding and LM head have a real model's shape.
  int32_t n_vocab = 0;
  uint64_t seed = 1;
};

// The tokenizer is byte-level BPE: 256 byte tokens, `n_merges` merges learnt from
// a fixed English snippet, and <|endoftext|> (BOS/EOS), <|im_start|>, <|im_end|>.
Status write_synthetic_model(const SyntheticModelSpec& spec, const std::filesystem::path& path);

// Real shapes for GPU timing: "llama2-7b" (32 layers, 4096 wide, 32 heads, MHA,
// 11008 FFN, vocab 32000, 4K context), "llama3-8b" (GQA 32/8, 14336 FFN, vocab
// 128256, 8K context, theta 500000), "llama2-7b-128k" (the 7B shape with a
// 128K context and theta 1e6, as long-context 7B fine-tunes use), "llama3-8b-1m"
// (the llama3-8b shape with a 1M context and theta 3.58e9, as the 1M-token
// Llama-3-8B fine-tunes MInference measured), "tiny", and "small" (tiny's kind
// with 64-dim heads: a quick model the CUDA kernels take).
// `n_layers` > 0 keeps only the first layers (a 7B-wide model that fits a test).
Result<SyntheticModelSpec> synthetic_preset(const std::string& name, int32_t n_layers = 0);
std::vector<std::string> synthetic_preset_names();

// The hyper-parameters a model written from `spec` has (for models made in memory).
ModelConfig synthetic_config(const SyntheticModelSpec& spec);

}  // namespace inferlab
