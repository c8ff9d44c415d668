#include "model/hf_checkpoint.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#include <array>
#include <fstream>
#include <map>
#include <set>
#include <sstream>

#include "formats/json_file.h"
#include "formats/safetensors.h"
#include "model/model.h"

namespace inferlab {
namespace hf {

namespace {

namespace fs = std::filesystem;
using nlohmann::json;

constexpr const char* kIndexName = "model.safetensors.index.json";
constexpr const char* kSingleName = "model.safetensors";

// config.json's keys, each read with its type checked; problems collect so one
// error lists them all.
class ConfigReader {
 public:
  ConfigReader(const json& j, std::string where) : j_(j), where_(std::move(where)) {}

  bool has(const char* key) const { return j_.contains(key) && !j_.at(key).is_null(); }
  int32_t count(const char* key, bool required, int32_t fallback) {
    if (!has(key)) {
      if (required) problems.push_back(fmt::format("missing key \"{}\"", key));
      return fallback;
    }
    const json& v = j_.at(key);
    if (!v.is_number_integer() || v.get<int64_t>() <= 0 || v.get<int64_t>() > (int64_t(1) << 30)) {
      problems.push_back(fmt::format("\"{}\" = {} is not a positive integer", key, v.dump()));
      return fallback;
    }
    return int32_t(v.get<int64_t>());
  }
  double number(const json& obj, const char* key, double fallback, const std::string& shown) {
    if (!obj.contains(key) || obj.at(key).is_null()) return fallback;
    const json& v = obj.at(key);
    if (!v.is_number() || !(v.get<double>() > 0)) {
      problems.push_back(fmt::format("\"{}\" = {} is not a positive number", shown, v.dump()));
      return fallback;
    }
    return v.get<double>();
  }
  double number(const char* key, double fallback) { return number(j_, key, fallback, key); }
  bool flag(const char* key, bool fallback) {
    if (!has(key)) return fallback;
    if (!j_.at(key).is_boolean()) {
      problems.push_back(fmt::format("\"{}\" = {} is not true or false", key, j_.at(key).dump()));
      return fallback;
    }
    return j_.at(key).get<bool>();
  }
  std::string text(const char* key, const std::string& fallback) {
    if (!has(key)) return fallback;
    if (!j_.at(key).is_string()) {
      problems.push_back(fmt::format("\"{}\" = {} is not a string", key, j_.at(key).dump()));
      return fallback;
    }
    return j_.at(key).get<std::string>();
  }

  std::vector<std::string> problems;

 private:
  const json& j_;
  std::string where_;
};

struct HfLayerTensor {
  LayerTensor id;
  const char* suffix;
};
constexpr std::array<HfLayerTensor, kLayerTensorCount> kHfLayerTensors{{
    {LayerTensor::attn_norm, "input_layernorm.weight"},
    {LayerTensor::attn_q, "self_attn.q_proj.weight"},
    {LayerTensor::attn_k, "self_attn.k_proj.weight"},
    {LayerTensor::attn_v, "self_attn.v_proj.weight"},
    {LayerTensor::attn_output, "self_attn.o_proj.weight"},
    {LayerTensor::ffn_norm, "post_attention_layernorm.weight"},
    {LayerTensor::ffn_gate, "mlp.gate_proj.weight"},
    {LayerTensor::ffn_up, "mlp.up_proj.weight"},
    {LayerTensor::ffn_down, "mlp.down_proj.weight"},
}};

}  // namespace

bool is_checkpoint(const fs::path& path) {
  std::error_code ec;
  return fs::is_directory(path, ec) && fs::is_regular_file(path / "config.json", ec);
}

std::string layer_tensor_name(int32_t layer, LayerTensor tensor) {
  return fmt::format("model.layers.{}.{}", layer, kHfLayerTensors[size_t(tensor)].suffix);
}

Result<ModelConfig> read_config(const fs::path& config_json) {
  auto parsed = read_json_object(config_json);
  if (!parsed) return parsed.error();
  const json& j = *parsed;
  const std::string where = config_json.string();
  ConfigReader r(j, where);
  ModelConfig c;
  c.architecture = r.text("model_type", "");
  if (c.architecture != "llama" && c.architecture != "mistral" && c.architecture != "qwen2")
    return Error{fmt::format("{}: \"model_type\" {} is not supported (supported: llama, mistral, qwen2)", where,
                             j.contains("model_type") ? j.at("model_type").dump() : "(missing)")};
  if (r.has("_name_or_path") && j.at("_name_or_path").is_string()) c.name = j.at("_name_or_path").get<std::string>();
  c.n_layers = r.count("num_hidden_layers", true, 1);
  c.n_embd = r.count("hidden_size", true, 1);
  c.n_ff = r.count("intermediate_size", true, 1);
  c.n_heads = r.count("num_attention_heads", true, 1);
  c.n_kv_heads = r.count("num_key_value_heads", false, c.n_heads);
  c.head_dim = r.count("head_dim", false, c.n_embd / std::max(1, c.n_heads));
  c.rope_dim = c.head_dim;
  c.n_vocab = r.count("vocab_size", true, 1);
  c.context_length = r.count("max_position_embeddings", true, 1);
  c.rms_eps = float(r.number("rms_norm_eps", 1e-6));
  c.tied_embeddings = r.flag("tie_word_embeddings", false);
  c.rope_neox = true;  // rotate_half: see hf_checkpoint.h

  // RoPE: transformers 5 writes rope_parameters; earlier files rope_theta and rope_scaling.
  c.rope_theta = float(r.number("rope_theta", 10000.0));
  auto rope_kind = [&](const json& obj, const std::string& shown) {
    if (obj.is_null()) return;
    if (!obj.is_object()) {
      r.problems.push_back(fmt::format("\"{}\" is not an object", shown));
      return;
    }
    const json& named = obj.contains("rope_type") ? obj.at("rope_type") : obj.contains("type") ? obj.at("type") : json();
    const std::string type = named.is_string() ? named.get<std::string>() : "default";
    using Kind = kernels::RopeScaling::Kind;
    kernels::RopeScaling& s = c.rope_scaling;
    if (type == "linear" || type == "llama3") {
      s.kind = type == "linear" ? Kind::Linear : Kind::Llama3;
      s.factor = float(r.number(obj, "factor", 0.0, shown + ".factor"));
      if (!(s.factor > 0)) r.problems.push_back(fmt::format("\"{}.factor\" is missing", shown));
      if (s.kind == Kind::Llama3) {
        s.low_freq_factor = float(r.number(obj, "low_freq_factor", 0.0, shown + ".low_freq_factor"));
        s.high_freq_factor = float(r.number(obj, "high_freq_factor", 0.0, shown + ".high_freq_factor"));
        s.original_context = float(r.number(obj, "original_max_position_embeddings", 0.0,
                                            shown + ".original_max_position_embeddings"));
        if (!(s.low_freq_factor > 0) || !(s.high_freq_factor > s.low_freq_factor) || !(s.original_context > 0))
          r.problems.push_back(fmt::format("\"{}\" llama3 needs low_freq_factor < high_freq_factor and "
                                           "original_max_position_embeddings, all positive",
                                           shown));
      }
    } else if (type != "default") {
      r.problems.push_back(fmt::format("\"{}.rope_type\" '{}' is not supported (supported: default, linear, llama3)",
                                       shown, type));
    }
    if (obj.contains("partial_rotary_factor") && obj.at("partial_rotary_factor") != 1.0 &&
        obj.at("partial_rotary_factor") != 1)
      r.problems.push_back(fmt::format("\"{}.partial_rotary_factor\" {} is not supported (only 1)", shown,
                                       obj.at("partial_rotary_factor").dump()));
  };
  if (j.contains("rope_parameters")) {
    const json& rp = j.at("rope_parameters");
    rope_kind(rp, "rope_parameters");
    if (rp.is_object()) c.rope_theta = float(r.number(rp, "rope_theta", c.rope_theta, "rope_parameters.rope_theta"));
  }
  if (j.contains("rope_scaling")) rope_kind(j.at("rope_scaling"), "rope_scaling");
  if (r.has("partial_rotary_factor") && j.at("partial_rotary_factor") != 1.0 && j.at("partial_rotary_factor") != 1)
    r.problems.push_back(fmt::format("\"partial_rotary_factor\" {} is not supported (only 1)",
                                     j.at("partial_rotary_factor").dump()));

  const std::string act = r.text("hidden_act", "silu");
  if (act != "silu") r.problems.push_back(fmt::format("\"hidden_act\" '{}' is not supported (only silu)", act));
  if (r.flag("mlp_bias", false)) r.problems.push_back("\"mlp_bias\" true is not supported");
  if (c.architecture == "qwen2") {
    c.qkv_bias = true;  // Qwen2's Q/K/V always carry a bias, O never
  } else if (r.flag("attention_bias", false)) {
    c.qkv_bias = c.o_bias = true;
  }

  // Sliding windows: layer_types when given (transformers 5), else the
  // model's own rule (Mistral: every layer; Qwen2: from max_window_layers on
  // when use_sliding_window).
  int32_t window = 0;
  if (r.has("sliding_window")) window = r.count("sliding_window", false, 0);
  std::vector<int32_t> layers(size_t(std::max(0, c.n_layers)), 0);
  if (r.has("layer_types")) {
    const json& types = j.at("layer_types");
    if (!types.is_array() || types.size() != layers.size()) {
      r.problems.push_back(fmt::format("\"layer_types\" is not a list of {} layer types", c.n_layers));
    } else {
      for (size_t l = 0; l < layers.size(); ++l) {
        const std::string type = types[l].is_string() ? types[l].get<std::string>() : types[l].dump();
        if (type == "sliding_attention") {
          if (window == 0) r.problems.push_back(fmt::format("\"layer_types[{}]\" is sliding_attention but \"sliding_window\" is not set", l));
          layers[l] = window;
        } else if (type != "full_attention") {
          r.problems.push_back(fmt::format("\"layer_types[{}]\" '{}' is not supported (full_attention, sliding_attention)", l, type));
        }
      }
    }
  } else if (c.architecture == "mistral") {
    std::fill(layers.begin(), layers.end(), window);
  } else if (c.architecture == "qwen2" && r.flag("use_sliding_window", false)) {
    const int32_t from = r.count("max_window_layers", false, 0);
    for (size_t l = size_t(std::max(0, from)); l < layers.size(); ++l) layers[l] = window;
  }
  for (int32_t w : layers)
    if (w > 0) c.layer_window = layers;

  if (c.n_kv_heads > 0 && c.n_heads % c.n_kv_heads != 0)
    r.problems.push_back(fmt::format("\"num_attention_heads\" {} is not a multiple of \"num_key_value_heads\" {}",
                                     c.n_heads, c.n_kv_heads));
  if (c.head_dim % 2 != 0) r.problems.push_back(fmt::format("head dim {} is odd (RoPE rotates pairs)", c.head_dim));
  if (!r.problems.empty()) return Error{fmt::format("{}: {}", where, fmt::join(r.problems, "; "))};
  return c;
}

Result<WeightFiles> weight_files(const fs::path& folder) {
  WeightFiles out;
  std::error_code ec;
  const fs::path index = folder / kIndexName;
  if (!fs::exists(index, ec)) {
    if (!fs::exists(folder / kSingleName, ec))
      return Error{fmt::format("{}: neither {} nor {} (only safetensors weights are read)", folder.string(),
                               kSingleName, kIndexName)};
    out.files.push_back(folder / kSingleName);
    return out;
  }
  auto parsed = read_json_object(index);
  if (!parsed) return parsed.error();
  const json& j = *parsed;
  if (!j.contains("weight_map") || !j.at("weight_map").is_object())
    return Error{fmt::format("{}: no \"weight_map\" object", index.string())};
  std::map<std::string, size_t> file_of;
  for (const auto& item : j.at("weight_map").items()) {
    if (!item.value().is_string())
      return Error{fmt::format("{}: \"weight_map.{}\" is not a file name", index.string(), item.key())};
    const std::string name = item.value().get<std::string>();
    const fs::path shard(name);
    if (name.empty() || shard.is_absolute() || shard.has_parent_path() || name == "." || name == "..")
      return Error{fmt::format("{}: \"weight_map.{}\" = \"{}\" is not a file name inside the folder", index.string(),
                               item.key(), name)};
    auto [it, fresh] = file_of.emplace(name, out.files.size());
    if (fresh) out.files.push_back(folder / shard);
    out.map.emplace_back(item.key(), it->second);
  }
  return out;
}

}  // namespace hf

// The checkpoint's tensors, each checked against the shape config.json implies
// and widened to float32 into the model's arena. Shards are read one at a time.
Result<std::shared_ptr<Model>> Model::load_hf(const std::filesystem::path& folder) {
  namespace fs = std::filesystem;
  auto config = hf::read_config(folder / "config.json");
  if (!config) return config.error();
  if (config->name.empty()) {  // save_pretrained leaves _name_or_path out: the folder's name
    const fs::path named = folder.filename().empty() ? folder.parent_path() : folder;
    config->name = named.filename().string();
  }
  auto files = hf::weight_files(folder);
  if (!files) return files.error();
  const fs::path tokenizer_json = folder / "tokenizer.json";
  auto tokenizer = Tokenizer::from_hf(tokenizer_json);
  if (!tokenizer) return tokenizer.error();

  auto model = std::make_shared<Model>();
  model->path_ = folder;
  model->config_ = *config;
  model->tokenizer_ = std::move(tokenizer).value();
  const ModelConfig& c = model->config_;
  if (model->tokenizer_->vocab_size() > c.n_vocab)
    return Error{fmt::format("{}: the tokenizer has {} tokens but \"vocab_size\" is {}", tokenizer_json.string(),
                             model->tokenizer_->vocab_size(), c.n_vocab)};
  {  // the chat template lives in tokenizer_config.json (or, newer, chat_template.jinja)
    std::error_code ec;
    if (fs::exists(folder / "chat_template.jinja", ec)) {
      std::ifstream in(folder / "chat_template.jinja");
      std::stringstream text;
      text << in.rdbuf();
      model->chat_template_ = text.str();
    } else if (fs::exists(folder / "tokenizer_config.json", ec)) {
      auto tc = read_json_object(folder / "tokenizer_config.json");
      if (!tc) return tc.error();
      if (tc->contains("chat_template") && tc->at("chat_template").is_string())
        model->chat_template_ = tc->at("chat_template").get<std::string>();
    }
  }

  // Every tensor the graph needs: name -> (destination, HF shape (out, in) or (n)).
  struct Want {
    WeightVector* dst;
    std::vector<int64_t> shape;
    bool found = false;
  };
  ModelWeights& w = model->weights_;
  const WeightAllocator<float> arena(std::make_shared<WeightArena>());
  std::map<std::string, Want> wanted;
  auto want = [&](const std::string& name, WeightVector& dst, std::vector<int64_t> shape) {
    dst = WeightVector(arena);
    wanted.emplace(name, Want{&dst, std::move(shape)});
  };
  want(hf::kEmbeddingName, w.token_embd, {c.n_vocab, c.n_embd});
  want(hf::kNormName, w.output_norm, {c.n_embd});
  if (!c.tied_embeddings) want(hf::kLmHeadName, w.output, {c.n_vocab, c.n_embd});
  w.layers.resize(size_t(c.n_layers));
  for (int32_t l = 0; l < c.n_layers; ++l) {
    LayerWeights& lw = w.layers[size_t(l)];
    const std::array<WeightVector*, kLayerTensorCount> slots{&lw.attn_norm, &lw.wq,     &lw.wk,
                                                             &lw.wv,        &lw.wo,     &lw.ffn_norm,
                                                             &lw.w_gate,    &lw.w_up,   &lw.w_down};
    for (int32_t t = 0; t < kLayerTensorCount; ++t) {
      const auto dims = layer_tensor_dims(c, LayerTensor(t));  // GGUF order: input dim first
      std::vector<int64_t> shape(dims.rbegin(), dims.rend());
      want(hf::layer_tensor_name(l, LayerTensor(t)), *slots[size_t(t)], shape);
    }
    const std::string prefix = fmt::format("model.layers.{}.self_attn.", l);
    if (c.qkv_bias) {
      want(prefix + "q_proj.bias", lw.bq, {c.q_dim()});
      want(prefix + "k_proj.bias", lw.bk, {c.kv_dim()});
      want(prefix + "v_proj.bias", lw.bv, {c.kv_dim()});
    }
    if (c.o_bias) want(prefix + "o_proj.bias", lw.bo, {c.n_embd});
  }

  // Tensors by file: the index's map, or the single file's own list.
  std::vector<std::vector<std::string>> by_file(files->files.size());
  for (const auto& [name, file] : files->map) by_file[file].push_back(name);
  std::vector<std::string> problems;
  for (size_t f = 0; f < files->files.size() && problems.empty(); ++f) {
    auto st = safetensors::File::open(files->files[f]);
    if (!st) return st.error();
    std::error_code ec;
    model->file_size_ += fs::file_size(files->files[f], ec);
    if (files->map.empty())
      for (const auto& t : st->tensors()) by_file[f].push_back(t.name);
    for (const std::string& name : by_file[f]) {
      const safetensors::TensorInfo* info = st->find(name);
      if (info == nullptr) {
        problems.push_back(fmt::format("{}: tensor {} (listed in {}) is missing", files->files[f].string(), name,
                                       "model.safetensors.index.json"));
        continue;
      }
      auto it = wanted.find(name);
      if (it == wanted.end()) {
        // Buffers some exporters save, and an lm_head that repeats a tied embedding.
        if (name.ends_with("rotary_emb.inv_freq") || (name == hf::kLmHeadName && c.tied_embeddings)) continue;
        problems.push_back(fmt::format("{}: unexpected tensor {} (not part of a {} decoder as config.json describes it)",
                                       files->files[f].string(), name, c.architecture));
        continue;
      }
      if (info->shape != it->second.shape) {
        problems.push_back(fmt::format("{}: tensor {} has shape {} but config.json implies {}",
                                       files->files[f].string(), name, fmt::join(info->shape, "x"),
                                       fmt::join(it->second.shape, "x")));
        continue;
      }
      const std::vector<float> values = st->read_f32(*info);
      it->second.dst->assign(values.begin(), values.end());
      it->second.found = true;
      model->parameter_count_ += int64_t(values.size());
    }
  }
  const bool read_cleanly = problems.empty();
  for (const auto& [name, slot] : wanted)
    if (!slot.found && read_cleanly)
      problems.push_back(fmt::format("{}: no file holds tensor {}", folder.string(), name));
  if (!problems.empty()) {
    if (problems.size() > 3) problems.resize(3), problems.push_back("...");
    return Error{fmt::format("{}", fmt::join(problems, "\n"))};
  }
  return model;
}

}  // namespace inferlab
