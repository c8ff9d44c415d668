// A loaded model: hyper-parameters, tokenizer and float32 weights (quantized
// GGUF tensors are dequantized on load; their file bytes are kept as well, for
// backends that compute with the model's own precision).
#pragma once

#include <array>
#include <filesystem>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "inferlab/result.h"
#include "model/host_memory.h"
#include "model/model_config.h"
#include "tokenizer/tokenizer.h"

namespace inferlab {

// A weight as the file stores it (block-quantized GGUF types only), for
// backends that compute with quantized weights; empty for float tensors.
struct FileTensor {
  uint32_t type = 0;                // GGUF tensor type id (gguf::TensorType)
  int64_t rows = 0, cols = 0;       // (out, in); cols is the contiguous dimension
  WeightBytes bytes;                // rows x (cols / block) blocks, the file's layout
  bool empty() const { return bytes.empty(); }
};

struct LayerWeights {
  WeightVector attn_norm;        // (n_embd)
  WeightVector wq;               // (q_dim, n_embd)
  WeightVector wk;               // (kv_dim, n_embd)
  WeightVector wv;               // (kv_dim, n_embd)
  WeightVector wo;               // (n_embd, q_dim)
  WeightVector ffn_norm;         // (n_embd)
  WeightVector w_gate;           // (n_ff, n_embd)
  WeightVector w_up;             // (n_ff, n_embd)
  WeightVector w_down;           // (n_embd, n_ff)
  WeightVector bq, bk, bv, bo;   // projection biases (q_dim, kv_dim, kv_dim, n_embd); empty without
  std::array<FileTensor, kLayerTensorCount> file;  // by LayerTensor: the file's quantized projections
};

struct ModelWeights {
  WeightVector token_embd;         // (n_vocab, n_embd)
  WeightVector output_norm;        // (n_embd)
  WeightVector output;             // (n_vocab, n_embd); empty when tied
  std::vector<LayerWeights> layers;
  FileTensor token_embd_file, output_file;  // quantized in the file (output_file empty when tied)
  const float* lm_head() const { return output.empty() ? token_embd.data() : output.data(); }
  const FileTensor& lm_head_file() const { return output.empty() ? token_embd_file : output_file; }
  // Bytes of the quantized file tensors kept.
  int64_t file_tensor_bytes() const;
};

// Weights live in huge-page mappings (model/host_memory.h) owned by the model's
// WeightArena; containers filled without one use the ordinary heap.
class Model {
 public:
  // Opens, validates (every tensor present with the expected shape and a
  // supported type) and dequantizes. Errors name the file and the fault.
  // `path` is a .gguf file or a Hugging Face checkpoint folder (hf_checkpoint.h).
  static Result<std::shared_ptr<Model>> load(const std::filesystem::path& path);

  // A model of this shape without weights or tokenizer: a backend fills its own
  // weights (random, for GPU timing at real shapes). `checksum` names it in results.
  static std::shared_ptr<Model> shape_only(const ModelConfig& config, const std::string& checksum);
  bool has_weights() const { return !weights_.layers.empty(); }

  const ModelConfig& config() const { return config_; }
  const ModelWeights& weights() const { return weights_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  // tokenizer.chat_template (a Jinja program), empty when the file has none.
  const std::string& chat_template() const { return chat_template_; }
  const std::filesystem::path& path() const { return path_; }
  uint64_t file_size() const { return file_size_; }  // of the weight files, for a checkpoint folder
  int64_t parameter_count() const { return parameter_count_; }
  // The float32 weights of every layer's projections (Q, K, V, O, gate, up,
  // down) go: their memory returns to the system and the tensors are empty.
  // For a process that computes through its own copies of them (fine-tuning
  // through a 4-bit base); nothing may read them afterwards.
  void release_layer_projections();
  bool projections_released() const { return projections_released_; }
  // Merges a LoRA adapter (a PEFT folder or a llama.cpp GGUF adapter,
  // formats/lora_file.h) into the float32 weights, W += scale * s * B A on
  // every projection it targets (s: the adapter's own alpha / r): the model
  // is then the fine-tuned one for every engine and run made from it. The
  // file's quantized blocks are not changed, so an engine computing from them
  // (weights = file) refuses such a model. Once per model; nothing changes
  // when it is refused (the error names the file and the projection).
  Status merge_adapter(const std::filesystem::path& path, float scale = 1.0f);
  // "sha256:<hex>" of the adapter merged (sha256_path), or empty.
  const std::string& adapter_digest() const { return adapter_digest_; }
  float adapter_scale() const { return adapter_scale_; }
  // SHA-256 of the file (of a checkpoint folder: sha256_path), hex; computed on first use.
  const std::string& file_checksum() const;
  // What names these weights (cached artifacts, calibrations): the file's
  // checksum, or with an adapter merged a SHA-256 of it, the adapter's digest and scale.
  const std::string& checksum() const;

 private:
  static Result<std::shared_ptr<Model>> load_hf(const std::filesystem::path& folder);  // hf_checkpoint.cpp

  std::filesystem::path path_;
  uint64_t file_size_ = 0;
  int64_t parameter_count_ = 0;
  ModelConfig config_;
  ModelWeights weights_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::string chat_template_;
  mutable std::string checksum_;
  bool projections_released_ = false;
  std::string adapter_digest_;
  float adapter_scale_ = 1.0f;
  std::string weights_checksum_;  // with an adapter merged
};

// SHA-256 of bytes, of a file, as lowercase hex.
std::string sha256_hex(std::string_view bytes);
Result<std::string> sha256_file(const std::filesystem::path& path);
// A file's SHA-256, or a folder's: of the list of its regular files (recursively,
// by relative path in byte order), each line "<sha256>  <relative path>".
// Renaming, adding, removing or editing a file changes it; where the folder
// lies does not.
Result<std::string> sha256_path(const std::filesystem::path& path);

// Short names for known models ("smollm2-135m"), a path to any .gguf file, or a
// Hugging Face checkpoint folder (one holding config.json).
// Short names resolve inside $INFERLAB_MODEL_DIR (default ~/.cache/inferlab/models).
Result<std::filesystem::path> resolve_model(const std::string& name_or_path);
std::filesystem::path model_cache_dir();

}  // namespace inferlab
