#include "model/model.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <openssl/evp.h>

#include <algorithm>
#include <cmath>
#include <array>
#include <cstdlib>
#include <fstream>

#include "gguf/gguf.h"
#include "model/hf_checkpoint.h"

namespace inferlab {

namespace {

struct KnownModel {
  const char* short_name;
  const char* file_name;
};
constexpr std::array<KnownModel, 1> kKnownModels{{
    {"smollm2-135m", "SmolLM2-135M-Instruct.Q4_1.gguf"},
}};

// A block-quantized tensor's bytes (empty for float types).
FileTensor file_tensor(const gguf::File& file, const std::string& name, const WeightAllocator<unsigned char>& in) {
  const gguf::TensorInfo* t = file.find_tensor(name);
  FileTensor out;
  out.bytes = WeightBytes(in);
  const auto traits = t != nullptr ? gguf::type_traits(uint32_t(t->type)) : std::nullopt;
  if (!traits || traits->block_elems == 1 || t->dims.size() != 2) return out;
  out.type = uint32_t(t->type);
  out.cols = t->dims[0];
  out.rows = t->dims[1];
  out.bytes.assign(t->data, t->data + t->n_bytes);
  return out;
}

// Dequantized to float32, into `dst` (allocated from dst's arena).
Status load_tensor(const gguf::File& file, const std::string& name, const std::vector<int64_t>& dims,
                   WeightVector& dst) {
  const gguf::TensorInfo* t = file.find_tensor(name);
  if (t == nullptr) return Error{fmt::format("{}: missing tensor {}", file.path().string(), name)};
  if (t->dims != dims)
    return Error{fmt::format("{}: tensor {} has shape {} but the model needs {}", file.path().string(), name,
                             fmt::join(t->dims, "x"), fmt::join(dims, "x"))};
  const int64_t n = t->n_elems();
  if (t->data == nullptr || gguf::type_bytes(t->type, n) != t->n_bytes)
    return Error{fmt::format("{}: tensor {}: {} bytes do not hold {} elements of {}", file.path().string(), name,
                             t->n_bytes, n, gguf::type_name(t->type))};
  dst.resize(size_t(n));
  Status status = gguf::dequantize(t->type, t->data, dst.data(), n);
  if (!status) return Error{fmt::format("{}: tensor {}: {}", file.path().string(), name, status.message())};
  return ok_status();
}

}  // namespace

Result<std::shared_ptr<Model>> Model::load(const std::filesystem::path& path) {
  if (hf::is_checkpoint(path)) return load_hf(path);
  auto file_result = gguf::File::open(path);
  if (!file_result) return file_result.error();
  const gguf::File& file = **file_result;
  auto config = read_model_config(file);
  if (!config) return config.error();
  auto tokenizer = Tokenizer::from_gguf(file);
  if (!tokenizer) return tokenizer.error();

  auto model = std::make_shared<Model>();
  model->path_ = path;
  model->file_size_ = file.file_size();
  model->config_ = *config;
  model->tokenizer_ = std::move(tokenizer).value();
  if (const auto chat = file.get_string("tokenizer.chat_template")) model->chat_template_ = *chat;
  const ModelConfig& c = model->config_;
  if (model->tokenizer_->vocab_size() != c.n_vocab)
    return Error{fmt::format("{}: tokenizer has {} tokens but {} has {} rows", path.string(),
                             model->tokenizer_->vocab_size(), kTokenEmbeddingName, c.n_vocab)};

  ModelWeights& w = model->weights_;
  const WeightAllocator<float> arena(std::make_shared<WeightArena>());
  const WeightAllocator<unsigned char> arena_bytes(arena);
  std::vector<std::string> problems;
  auto take = [&](WeightVector& dst, const std::string& name, const std::vector<int64_t>& dims) {
    dst = WeightVector(arena);
    if (Status s = load_tensor(file, name, dims, dst); !s) {
      problems.push_back(s.message());
      return;
    }
    model->parameter_count_ += int64_t(dst.size());
  };
  take(w.token_embd, kTokenEmbeddingName, {c.n_embd, c.n_vocab});
  w.token_embd_file = file_tensor(file, kTokenEmbeddingName, arena_bytes);
  take(w.output_norm, kOutputNormName, {c.n_embd});
  if (!c.tied_embeddings) {
    take(w.output, kOutputName, {c.n_embd, c.n_vocab});
    w.output_file = file_tensor(file, kOutputName, arena_bytes);
  }
  w.layers.resize(size_t(c.n_layers));
  for (int32_t l = 0; l < c.n_layers && problems.empty(); ++l) {
    LayerWeights& lw = w.layers[size_t(l)];
    std::array<std::pair<LayerTensor, WeightVector*>, kLayerTensorCount> slots{{
        {LayerTensor::attn_norm, &lw.attn_norm}, {LayerTensor::attn_q, &lw.wq},
        {LayerTensor::attn_k, &lw.wk},           {LayerTensor::attn_v, &lw.wv},
        {LayerTensor::attn_output, &lw.wo},      {LayerTensor::ffn_norm, &lw.ffn_norm},
        {LayerTensor::ffn_gate, &lw.w_gate},     {LayerTensor::ffn_up, &lw.w_up},
        {LayerTensor::ffn_down, &lw.w_down},
    }};
    for (auto& [id, dst] : slots) {
      take(*dst, layer_tensor_name(l, id), layer_tensor_dims(c, id));
      lw.file[size_t(id)] = file_tensor(file, layer_tensor_name(l, id), arena_bytes);
    }
    if (c.qkv_bias) {
      take(lw.bq, layer_bias_name(l, LayerTensor::attn_q), {c.q_dim()});
      take(lw.bk, layer_bias_name(l, LayerTensor::attn_k), {c.kv_dim()});
      take(lw.bv, layer_bias_name(l, LayerTensor::attn_v), {c.kv_dim()});
    }
    if (c.o_bias) take(lw.bo, layer_bias_name(l, LayerTensor::attn_output), {c.n_embd});
  }
  if (const gguf::TensorInfo* t = file.find_tensor("rope_freqs.weight"); t != nullptr) {
    // Llama 3.1's scaling as llama.cpp converts it: one divisor per rotary pair.
    WeightVector factors(arena);
    take(factors, "rope_freqs.weight", {c.rope_dim / 2});
    model->config_.rope_freq_factors.assign(factors.begin(), factors.end());
    for (size_t i = 0; i < factors.size(); ++i)
      if (!(factors[i] > 0.0f) || !std::isfinite(factors[i]))
        problems.push_back(fmt::format("{}: rope_freqs.weight[{}] = {} is not a positive factor", path.string(), i,
                                       factors[i]));
  }
  if (!problems.empty()) {
    // Each problem already names the file; report the first few.
    if (problems.size() > 3) problems.resize(3), problems.push_back("...");
    return Error{fmt::format("{}", fmt::join(problems, "\n"))};
  }
  return model;
}

int64_t ModelWeights::file_tensor_bytes() const {
  int64_t n = int64_t(token_embd_file.bytes.size() + output_file.bytes.size());
  for (const LayerWeights& lw : layers)
    for (const FileTensor& t : lw.file) n += int64_t(t.bytes.size());
  return n;
}

std::shared_ptr<Model> Model::shape_only(const ModelConfig& config, const std::string& checksum) {
  auto model = std::make_shared<Model>();
  model->config_ = config;
  model->checksum_ = checksum;
  const int64_t e = config.n_embd, per_layer = 2 * e + e * (config.q_dim() + 2 * config.kv_dim()) +
                                                config.q_dim() * e + 3 * e * int64_t(config.n_ff);
  model->parameter_count_ = int64_t(config.n_layers) * per_layer + e +
                            int64_t(config.n_vocab) * e * (config.tied_embeddings ? 1 : 2);
  return model;
}

const std::string& Model::checksum() const {
  return adapter_digest_.empty() ? file_checksum() : weights_checksum_;
}

const std::string& Model::file_checksum() const {
  if (checksum_.empty()) {
    auto sum = sha256_path(path_);
    checksum_ = sum ? *sum : std::string("unavailable");
  }
  return checksum_;
}

Result<std::string> sha256_file(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return Error{fmt::format("{}: cannot open for reading", path.string())};
  std::unique_ptr<EVP_MD_CTX, decltype(&EVP_MD_CTX_free)> ctx(EVP_MD_CTX_new(), EVP_MD_CTX_free);
  if (!ctx || EVP_DigestInit_ex(ctx.get(), EVP_sha256(), nullptr) != 1)
    return Error{"sha256: OpenSSL digest initialisation failed"};
  std::vector<char> buffer(1 << 20);
  while (in) {
    in.read(buffer.data(), std::streamsize(buffer.size()));
    if (in.gcount() > 0) EVP_DigestUpdate(ctx.get(), buffer.data(), size_t(in.gcount()));
  }
  if (in.bad()) return Error{fmt::format("{}: read error", path.string())};
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned int len = 0;
  EVP_DigestFinal_ex(ctx.get(), digest.data(), &len);
  return fmt::format("{:02x}", fmt::join(digest.begin(), digest.begin() + len, ""));
}

std::string sha256_hex(std::string_view bytes) {
  std::array<unsigned char, EVP_MAX_MD_SIZE> digest{};
  unsigned int length = 0;
  EVP_Digest(bytes.data(), bytes.size(), digest.data(), &length, EVP_sha256(), nullptr);
  return fmt::format("{:02x}", fmt::join(digest.begin(), digest.begin() + length, ""));
}

Result<std::string> sha256_path(const std::filesystem::path& path) {
  std::error_code ec;
  if (!std::filesystem::is_directory(path, ec)) return sha256_file(path);
  std::vector<std::string> names;
  for (auto it = std::filesystem::recursive_directory_iterator(path, ec); !ec && it != std::filesystem::end(it);
       it.increment(ec))
    if (it->is_regular_file(ec)) names.push_back(std::filesystem::relative(it->path(), path, ec).generic_string());
  if (ec) return Error{fmt::format("{}: cannot list the folder: {}", path.string(), ec.message())};
  std::sort(names.begin(), names.end());
  std::string listing;
  for (const auto& name : names) {
    auto digest = sha256_file(path / name);
    if (!digest) return digest.error();
    listing += *digest + "  " + name + "\n";
  }
  return sha256_hex(listing);
}

std::filesystem::path model_cache_dir() {
  if (const char* dir = std::getenv("INFERLAB_MODEL_DIR"); dir != nullptr && *dir != '\0') return dir;
  const char* home = std::getenv("HOME");
  return std::filesystem::path(home != nullptr ? home : ".") / ".cache" / "inferlab" / "models";
}

Result<std::filesystem::path> resolve_model(const std::string& name_or_path) {
  for (const auto& known : kKnownModels) {
    if (name_or_path != known.short_name) continue;
    auto path = model_cache_dir() / known.file_name;
    if (!std::filesystem::exists(path))
      return Error{fmt::format("model '{}' is not installed (expected {}); run scripts/fetch-model.sh",
                               name_or_path, path.string())};
    return path;
  }
  std::filesystem::path path(name_or_path);
  if (!std::filesystem::exists(path)) {
    std::vector<std::string> names;
    for (const auto& known : kKnownModels) names.push_back(known.short_name);
    return Error{fmt::format("model '{}': no such file (known short names: {})", name_or_path,
                             fmt::join(names, ", "))};
  }
  if (std::filesystem::is_directory(path) && !hf::is_checkpoint(path))
    return Error{fmt::format("model '{}' is a folder without config.json: neither a .gguf file nor a Hugging Face "
                             "checkpoint", name_or_path)};
  return path;
}

void Model::release_layer_projections() {
  for (LayerWeights& w : weights_.layers)
    for (WeightVector* t : {&w.wq, &w.wk, &w.wv, &w.wo, &w.w_gate, &w.w_up, &w.w_down}) {
      release_pages(t->data(), t->size() * sizeof(float));
      t->clear();
      t->shrink_to_fit();  // an arena's memory is never handed back but through release_pages
    }
  projections_released_ = true;
}

}  // namespace inferlab
