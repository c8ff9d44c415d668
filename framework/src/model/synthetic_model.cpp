#include "model/synthetic_model.h"

#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <map>
#include <random>

#include "model/model_config.h"
#include "tokenizer/tokenizer.h"

namespace inferlab {

namespace {

constexpr const char* kMergeCorpus =
    "the quick brown fox jumps over the lazy dog. the cat sat on the mat and the dog sat on the log. "
    "in the beginning there was the word, and the word was with the model. the pass key is 12345. "
    "remember it. the grass is green and the sky is blue. there and then, here and now.";

struct Vocab {
  std::vector<std::string> tokens;
  std::vector<int32_t> types;
  std::vector<std::string> merges;
  int32_t end_of_text = 0;
};

// Learns `n_merges` BPE merges greedily from kMergeCorpus (most frequent pair first).
Vocab build_vocab(int32_t n_merges) {
  Vocab v;
  for (int b = 0; b < 256; ++b) {
    v.tokens.push_back(byte_level_symbol(uint8_t(b)));
    v.types.push_back(1);
  }
  // Words as sequences of pieces; a leading space belongs to the word (GPT-2 style).
  std::vector<std::vector<std::string>> words;
  std::string corpus = kMergeCorpus;
  for (size_t i = 0; i < corpus.size();) {
    size_t j = i + 1;
    while (j < corpus.size() && corpus[j] != ' ') ++j;
    std::vector<std::string> w;
    for (size_t k = i; k < j; ++k) w.push_back(byte_level_symbol(uint8_t(corpus[k])));
    words.push_back(std::move(w));
    i = j;
  }
  for (int32_t m = 0; m < n_merges; ++m) {
    std::map<std::pair<std::string, std::string>, int> counts;
    for (const auto& w : words)
      for (size_t k = 0; k + 1 < w.size(); ++k) ++counts[{w[k], w[k + 1]}];
    if (counts.empty()) break;
    auto best = std::max_element(counts.begin(), counts.end(),
                                 [](const auto& a, const auto& b) { return a.second < b.second; });
    const auto [left, right] = best->first;
    v.merges.push_back(left + " " + right);
    v.tokens.push_back(left + right);
    v.types.push_back(1);
    for (auto& w : words) {
      std::vector<std::string> merged;
      for (size_t k = 0; k < w.size(); ++k) {
        if (k + 1 < w.size() && w[k] == left && w[k + 1] == right) {
          merged.push_back(left + right);
          ++k;
        } else {
          merged.push_back(w[k]);
        }
      }
      w = std::move(merged);
    }
  }
  v.end_of_text = int32_t(v.tokens.size());
  for (const char* special : {"<|endoftext|>", "<|im_start|>", "<|im_end|>"}) {
    v.tokens.push_back(special);
    v.types.push_back(3);
  }
  return v;
}

// Unused tokens (GGUF type 5) up to `size`: never produced by tokenizing text.
void pad_vocab(Vocab& v, int32_t size) {
  for (int32_t i = int32_t(v.tokens.size()); i < size; ++i) {
    v.tokens.push_back("<|unused_" + std::to_string(i) + "|>");
    v.types.push_back(5);
  }
}

}  // namespace

Status write_synthetic_model(const SyntheticModelSpec& spec, const std::filesystem::path& path) {
  if (spec.n_layers <= 0 || spec.n_embd <= 0 || spec.n_ff <= 0 || spec.n_heads <= 0 || spec.n_kv_heads <= 0 ||
      spec.n_heads % spec.n_kv_heads != 0 || spec.n_embd % spec.n_heads != 0 ||
      (spec.n_embd / spec.n_heads) % 2 != 0 || spec.context_length <= 0)
    return Error{fmt::format("synthetic model '{}': inconsistent shape", spec.name)};
  Vocab vocab = build_vocab(spec.n_merges);
  pad_vocab(vocab, spec.n_vocab);
  const int32_t n_vocab = int32_t(vocab.tokens.size());
  const int32_t head_dim = spec.n_embd / spec.n_heads;

  gguf::Writer w;
  w.set_string("general.architecture", "llama");
  w.set_string("general.name", spec.name);
  w.set_u32("llama.block_count", uint32_t(spec.n_layers));
  w.set_u32("llama.context_length", uint32_t(spec.context_length));
  w.set_u32("llama.embedding_length", uint32_t(spec.n_embd));
  w.set_u32("llama.feed_forward_length", uint32_t(spec.n_ff));
  w.set_u32("llama.attention.head_count", uint32_t(spec.n_heads));
  w.set_u32("llama.attention.head_count_kv", uint32_t(spec.n_kv_heads));
  w.set_u32("llama.rope.dimension_count", uint32_t(head_dim));
  w.set_f32("llama.rope.freq_base", spec.rope_theta);
  w.set_f32("llama.attention.layer_norm_rms_epsilon", spec.rms_eps);
  w.set_u32("llama.vocab_size", uint32_t(n_vocab));
  w.set_string("tokenizer.ggml.model", "gpt2");
  w.set_string("tokenizer.ggml.pre", "default");
  w.set_string_array("tokenizer.ggml.tokens", vocab.tokens);
  w.set_i32_array("tokenizer.ggml.token_type", vocab.types);
  w.set_string_array("tokenizer.ggml.merges", vocab.merges);
  const uint32_t eot = uint32_t(vocab.end_of_text);
  w.set_u32("tokenizer.ggml.bos_token_id", eot);
  w.set_u32("tokenizer.ggml.eos_token_id", eot);
  w.set_bool("tokenizer.ggml.add_bos_token", false);

  std::mt19937_64 rng(spec.seed);
  auto random_matrix = [&](int64_t n, float stddev) {
    std::normal_distribution<float> dist(0.0f, stddev);
    std::vector<float> data(static_cast<size_t>(n));
    for (auto& x : data) x = dist(rng);
    return data;
  };
  auto norm_weight = [&](int64_t n) {
    std::uniform_real_distribution<float> dist(0.8f, 1.2f);
    std::vector<float> data(static_cast<size_t>(n));
    for (auto& x : data) x = dist(rng);
    return data;
  };
  std::vector<std::string> problems;
  auto add = [&](const std::string& name, gguf::TensorType type, std::vector<int64_t> dims,
                 const std::vector<float>& data) {
    auto s = w.add_tensor_f32(name, type, std::move(dims), data);
    if (!s) problems.push_back(s.message());
  };

  ModelConfig shape;
  shape.n_embd = spec.n_embd;
  shape.n_ff = spec.n_ff;
  shape.n_heads = spec.n_heads;
  shape.n_kv_heads = spec.n_kv_heads;
  shape.head_dim = head_dim;
  // Scales keep activations O(1) so attention is neither uniform nor one-hot.
  const float in_scale = 1.0f / std::sqrt(float(spec.n_embd));
  add(kTokenEmbeddingName, spec.weight_type, {spec.n_embd, n_vocab}, random_matrix(int64_t(n_vocab) * spec.n_embd, 1.0f));
  for (int32_t l = 0; l < spec.n_layers; ++l) {
    for (int t = 0; t < kLayerTensorCount; ++t) {
      const auto id = LayerTensor(t);
      auto dims = layer_tensor_dims(shape, id);
      const std::string name = layer_tensor_name(l, id);
      if (dims.size() == 1) {
        add(name, gguf::TensorType::F32, dims, norm_weight(dims[0]));
      } else {
        const float scale = id == LayerTensor::attn_q || id == LayerTensor::attn_k ? 2.0f * in_scale
                            : id == LayerTensor::ffn_down ? 1.0f / std::sqrt(float(spec.n_ff))
                                                          : in_scale;
        add(name, spec.weight_type, dims, random_matrix(dims[0] * dims[1], scale));
      }
    }
  }
  add(kOutputNormName, gguf::TensorType::F32, {spec.n_embd}, norm_weight(spec.n_embd));
  if (!spec.tied_embeddings)
    add(kOutputName, spec.weight_type, {spec.n_embd, n_vocab}, random_matrix(int64_t(n_vocab) * spec.n_embd, in_scale));
  if (!problems.empty()) return Error{fmt::format("synthetic model '{}': {}", spec.name, problems.front())};
  return w.write(path);
}

std::vector<std::string> synthetic_preset_names() {
  return {"llama2-7b", "llama3-8b", "llama2-7b-128k", "llama3-8b-1m", "small", "tiny"};
}

Result<SyntheticModelSpec> synthetic_preset(const std::string& name, int32_t n_layers) {
  SyntheticModelSpec spec;
  spec.name = "synthetic-" + name;
  spec.tied_embeddings = false;
  spec.weight_type = gguf::TensorType::F16;
  if (name == "llama2-7b" || name == "llama2-7b-128k") {
    spec.n_layers = 32;
    spec.n_embd = 4096;
    spec.n_ff = 11008;
    spec.n_heads = 32;
    spec.n_kv_heads = 32;
    spec.n_vocab = 32000;
    spec.context_length = name == "llama2-7b" ? 4096 : 131072;
    spec.rope_theta = name == "llama2-7b" ? 10000.0f : 1.0e6f;
  } else if (name == "llama3-8b" || name == "llama3-8b-1m") {
    spec.n_layers = 32;
    spec.n_embd = 4096;
    spec.n_ff = 14336;
    spec.n_heads = 32;
    spec.n_kv_heads = 8;
    spec.n_vocab = 128256;
    // The 1M variant: the long-context Llama-3-8B shape MInference measured
    // (grouped-query 32/8), its context and RoPE base about as the
    // 1M-token fine-tunes of Llama-3-8B-Instruct set them.
    spec.context_length = name == "llama3-8b" ? 8192 : 1048576;
    spec.rope_theta = name == "llama3-8b" ? 500000.0f : 3.58e9f;
  } else if (name == "tiny") {
    spec.tied_embeddings = true;
    spec.weight_type = gguf::TensorType::F32;
  } else if (name == "small") {  // tiny's kind with 64-dim heads, which the CUDA kernels take
    spec.n_embd = 256;
    spec.n_ff = 512;
    spec.tied_embeddings = true;
    spec.weight_type = gguf::TensorType::F32;
  } else {
    std::string known;
    for (const auto& n : synthetic_preset_names()) known += (known.empty() ? "" : ", ") + n;
    return Error{fmt::format("synthetic model preset \"{}\" is not one of {}", name, known)};
  }
  if (n_layers < 0 || n_layers > spec.n_layers)
    return Error{fmt::format("synthetic model preset {}: layers {} is outside 1..{}", name, n_layers, spec.n_layers)};
  if (n_layers > 0) spec.n_layers = n_layers;
  return spec;
}

ModelConfig synthetic_config(const SyntheticModelSpec& spec) {
  ModelConfig c;
  c.architecture = "llama";
  c.name = spec.name;
  c.n_layers = spec.n_layers;
  c.n_embd = spec.n_embd;
  c.n_ff = spec.n_ff;
  c.n_heads = spec.n_heads;
  c.n_kv_heads = spec.n_kv_heads;
  c.head_dim = spec.n_embd / spec.n_heads;
  c.rope_dim = c.head_dim;
  c.n_vocab = std::max(spec.n_vocab, int32_t(build_vocab(spec.n_merges).tokens.size()));
  c.context_length = spec.context_length;
  c.rope_theta = spec.rope_theta;
  c.rms_eps = spec.rms_eps;
  c.tied_embeddings = spec.tied_embeddings;
  return c;
}

}  // namespace inferlab
