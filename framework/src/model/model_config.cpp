#include "model/model_config.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <array>
#include <string_view>

namespace inferlab {

namespace {

struct LayerTensorEntry {
  LayerTensor id;
  const char* suffix;
};
constexpr std::array<LayerTensorEntry, kLayerTensorCount> kLayerTensors{{
    {LayerTensor::attn_norm, "attn_norm.weight"},
    {LayerTensor::attn_q, "attn_q.weight"},
    {LayerTensor::attn_k, "attn_k.weight"},
    {LayerTensor::attn_v, "attn_v.weight"},
    {LayerTensor::attn_output, "attn_output.weight"},
    {LayerTensor::ffn_norm, "ffn_norm.weight"},
    {LayerTensor::ffn_gate, "ffn_gate.weight"},
    {LayerTensor::ffn_up, "ffn_up.weight"},
    {LayerTensor::ffn_down, "ffn_down.weight"},
}};

// Architectures whose graph is the Llama decoder we implement.
// Qwen2 is Llama with Q/K/V biases and NeoX RoPE pairs (its Q/K rows are not
// permuted by conversion).
constexpr std::array<std::string_view, 2> kSupportedArchitectures{"llama", "qwen2"};

}  // namespace

std::string layer_tensor_name(int32_t layer, LayerTensor tensor) {
  return fmt::format("blk.{}.{}", layer, kLayerTensors[size_t(tensor)].suffix);
}

std::string layer_bias_name(int32_t layer, LayerTensor tensor) {
  std::string name = layer_tensor_name(layer, tensor);
  return name.replace(name.size() - std::string_view("weight").size(), std::string_view::npos, "bias");
}

std::vector<int64_t> layer_tensor_dims(const ModelConfig& c, LayerTensor tensor) {
  switch (tensor) {
    case LayerTensor::attn_norm:
    case LayerTensor::ffn_norm: return {c.n_embd};
    case LayerTensor::attn_q: return {c.n_embd, c.q_dim()};
    case LayerTensor::attn_k:
    case LayerTensor::attn_v: return {c.n_embd, c.kv_dim()};
    case LayerTensor::attn_output: return {c.q_dim(), c.n_embd};
    case LayerTensor::ffn_gate:
    case LayerTensor::ffn_up: return {c.n_embd, c.n_ff};
    case LayerTensor::ffn_down: return {c.n_ff, c.n_embd};
  }
  return {};
}

Result<ModelConfig> read_model_config(const gguf::File& file) {
  const std::string where = file.path().string();
  ModelConfig c;
  auto arch = file.get_string("general.architecture");
  if (!arch) return Error{fmt::format("{}: missing metadata key general.architecture", where)};
  bool supported = false;
  for (auto a : kSupportedArchitectures) supported |= (*arch == a);
  if (!supported)
    return Error{fmt::format("{}: unsupported architecture '{}' (supported: llama, qwen2)", where, *arch)};
  c.architecture = *arch;
  c.name = file.get_string("general.name").value_or("");

  std::vector<std::string> problems;
  auto get_int = [&](const std::string& key, bool required, int64_t fallback) -> int32_t {
    auto v = file.get_int(c.architecture + "." + key);
    if (!v) {
      if (required) problems.push_back(fmt::format("missing metadata key {}.{}", c.architecture, key));
      return int32_t(fallback);
    }
    if (*v <= 0 || *v > (int64_t(1) << 30)) {
      problems.push_back(fmt::format("{}.{} = {} is out of range", c.architecture, key, *v));
      return int32_t(fallback);
    }
    return int32_t(*v);
  };
  c.n_layers = get_int("block_count", true, 1);
  c.n_embd = get_int("embedding_length", true, 1);
  c.n_ff = get_int("feed_forward_length", true, 1);
  c.n_heads = get_int("attention.head_count", true, 1);
  c.n_kv_heads = get_int("attention.head_count_kv", false, c.n_heads);
  c.context_length = get_int("context_length", true, 1);
  c.head_dim = get_int("attention.key_length", false, c.n_heads > 0 ? c.n_embd / c.n_heads : 1);
  c.rope_dim = get_int("rope.dimension_count", false, c.head_dim);
  c.rope_theta = float(file.get_float(c.architecture + ".rope.freq_base").value_or(10000.0));
  c.rms_eps = float(file.get_float(c.architecture + ".attention.layer_norm_rms_epsilon").value_or(1e-5));

  if (file.find(c.architecture + ".rope.scaling.type") != nullptr) {
    auto type = file.get_string(c.architecture + ".rope.scaling.type").value_or("");
    if (type == "linear") {
      const double factor = file.get_float(c.architecture + ".rope.scaling.factor").value_or(1.0);
      if (!(factor > 0)) problems.push_back(fmt::format("rope.scaling.factor {} must be positive", factor));
      c.rope_scaling.kind = kernels::RopeScaling::Kind::Linear;
      c.rope_scaling.factor = float(factor);
    } else if (!type.empty() && type != "none") {
      problems.push_back(fmt::format("RoPE scaling '{}' is not supported (supported: linear, and Llama 3.1's "
                                     "rope_freqs.weight)",
                                     type));
    }
  }
  if (c.n_heads % c.n_kv_heads != 0)
    problems.push_back(fmt::format("head_count {} is not a multiple of head_count_kv {}", c.n_heads, c.n_kv_heads));
  if (c.rope_dim > c.head_dim || c.rope_dim % 2 != 0)
    problems.push_back(fmt::format("rope.dimension_count {} does not fit head dim {}", c.rope_dim, c.head_dim));
  if (!(c.rope_theta > 0.0f)) problems.push_back("rope.freq_base must be positive");
  if (!(c.rms_eps > 0.0f)) problems.push_back("attention.layer_norm_rms_epsilon must be positive");

  const gguf::TensorInfo* embd = file.find_tensor(kTokenEmbeddingName);
  if (embd == nullptr) {
    problems.push_back(fmt::format("missing tensor {}", kTokenEmbeddingName));
  } else if (embd->dims.size() != 2 || embd->dims[0] != c.n_embd) {
    problems.push_back(fmt::format("tensor {} has shape {} but embedding_length is {}", kTokenEmbeddingName,
                                   fmt::join(embd->dims, "x"), c.n_embd));
  } else {
    c.n_vocab = int32_t(embd->dims[1]);
  }
  c.tied_embeddings = file.find_tensor(kOutputName) == nullptr;
  c.rope_neox = c.architecture == "qwen2";
  c.qkv_bias = file.find_tensor(layer_bias_name(0, LayerTensor::attn_q)) != nullptr;
  c.o_bias = file.find_tensor(layer_bias_name(0, LayerTensor::attn_output)) != nullptr;

  if (!problems.empty())
    return Error{fmt::format("{}: {}", where, fmt::join(problems, "; "))};
  return c;
}

}  // namespace inferlab
