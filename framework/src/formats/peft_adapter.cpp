#include "formats/peft_adapter.h"

#include <fmt/format.h>
#include <fmt/ranges.h>
#include <nlohmann/json.hpp>

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <fstream>
#include <map>
#include <memory>
#include <optional>
#include <regex>
#include <set>
#include <sstream>

#include <unistd.h>

#include "formats/safetensors.h"

namespace inferlab::peft {

namespace {

// A pattern from an adapter's config matched against whole module names, as
// Python's re.fullmatch matches them for PEFT. PCRE2 (Perl/Python syntax)
// rather than std::regex: a hostile pattern there can overflow its compiler
// (a huge back-reference number) or backtrack without end; PCRE2 refuses the
// one and stops the other at a match limit, which is reported, not hidden.
class ModuleRegex {
 public:
  static Result<ModuleRegex> compile(const std::string& pattern) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_ANCHORED | PCRE2_ENDANCHORED | PCRE2_UTF, &error, &offset, nullptr);
    if (code == nullptr) {
      std::array<PCRE2_UCHAR, 256> text{};
      pcre2_get_error_message(error, text.data(), text.size());
      return Error{fmt::format("{} at offset {}", reinterpret_cast<const char*>(text.data()), offset)};
    }
    ModuleRegex r;
    r.code_.reset(code, pcre2_code_free);
    r.context_.reset(pcre2_match_context_create(nullptr), pcre2_match_context_free);
    pcre2_set_match_limit(r.context_.get(), 1000000);
    pcre2_set_depth_limit(r.context_.get(), 10000);
    return r;
  }
  // Whether the whole of `name` matches; an error when the match limit stopped it.
  Result<bool> full_match(const std::string& name) const {
    std::unique_ptr<pcre2_match_data, decltype(&pcre2_match_data_free)> data(
        pcre2_match_data_create_from_pattern(code_.get(), nullptr), pcre2_match_data_free);
    const int rc = pcre2_match(code_.get(), reinterpret_cast<PCRE2_SPTR>(name.data()), name.size(), 0, 0, data.get(),
                               context_.get());
    if (rc >= 0) return true;
    if (rc == PCRE2_ERROR_NOMATCH) return false;
    std::array<PCRE2_UCHAR, 256> text{};
    pcre2_get_error_message(rc, text.data(), text.size());
    return Error{fmt::format("matching {}: {}", name, reinterpret_cast<const char*>(text.data()))};
  }

 private:
  std::shared_ptr<pcre2_code> code_;
  std::shared_ptr<pcre2_match_context> context_;
};

// PEFT's rank_pattern / alpha_pattern keys match a module name by suffix.
std::string pattern_key_regex(const std::string& key) { return "(?:.*\\.)?(?:" + key + ")"; }

struct Target {
  std::string tensor;  // GGUF name
  int32_t layer = -1;
  int64_t out = 0, in = 0;
  int32_t permute_heads = 0;  // q_proj / k_proj: heads whose rows GGUF conversion permuted
};

// A Hugging Face Llama module name as this engine's projection.
std::optional<Target> target_of(const std::string& module, const ModelShape& s) {
  static const std::regex layer_re(R"(model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+))");
  const int64_t hd = s.head_dim, qd = int64_t(s.n_heads) * hd, kvd = int64_t(s.n_kv_heads) * hd;
  if (module == "lm_head") return Target{"output", -1, s.n_vocab, s.n_embd, 0};
  std::smatch m;
  if (!std::regex_match(module, m, layer_re)) return std::nullopt;
  const int64_t layer = std::stoll(m[1].str().substr(0, 9));
  if (layer >= s.n_layers) return std::nullopt;
  const std::string part = m[2].str(), proj = m[3].str();
  const auto l = int32_t(layer);
  if (part == "self_attn") {
    if (proj == "q_proj") return Target{"attn_q", l, qd, s.n_embd, s.n_heads};
    if (proj == "k_proj") return Target{"attn_k", l, kvd, s.n_embd, s.n_kv_heads};
    if (proj == "v_proj") return Target{"attn_v", l, kvd, s.n_embd, 0};
    if (proj == "o_proj") return Target{"attn_output", l, s.n_embd, qd, 0};
  } else {
    if (proj == "gate_proj") return Target{"ffn_gate", l, s.n_ff, s.n_embd, 0};
    if (proj == "up_proj") return Target{"ffn_up", l, s.n_ff, s.n_embd, 0};
    if (proj == "down_proj") return Target{"ffn_down", l, s.n_embd, s.n_ff, 0};
  }
  return std::nullopt;
}

}  // namespace

Result<AdapterConfig> parse_config(const std::string& text, const std::string& origin) {
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(text);
  } catch (const nlohmann::json::exception& e) {
    return Error{fmt::format("{}: not JSON ({})", origin, e.what())};
  }
  if (!j.is_object()) return Error{fmt::format("{}: not a JSON object", origin)};
  auto bad = [&](const char* key, const std::string& why) { return Error{fmt::format("{}: {}: {}", origin, key, why)}; };
  AdapterConfig c;
  if (j.contains("peft_type") && j["peft_type"] != "LORA")
    return bad("peft_type", fmt::format("{} (a LoRA adapter is LORA)", j["peft_type"].dump()));
  // Variants whose weights would be read as plain LoRA, wrongly: refused.
  auto is_true = [&](const char* key) { return j.contains(key) && j[key].is_boolean() && j[key].get<bool>(); };
  if (is_true("use_dora")) return bad("use_dora", "true: DoRA's magnitude vectors are not supported (plain LoRA only)");
  if (is_true("lora_bias")) return bad("lora_bias", "true: lora_B biases are not supported");
  if (is_true("fan_in_fan_out")) return bad("fan_in_fan_out", "true: transposed (Conv1D) weights are not supported");
  if (j.contains("bias") && j["bias"].is_string() && j["bias"] != "none")
    return bad("bias", fmt::format("{}: trained biases are not supported (\"none\" only)", j["bias"].dump()));
  if (!j.contains("r") || !j["r"].is_number_integer() || j["r"].get<int64_t>() < 1 || j["r"].get<int64_t>() > 65536)
    return bad("r", "expected a rank from 1 to 65536");
  c.r = int32_t(j["r"].get<int64_t>());
  if (j.contains("lora_alpha")) {
    if (!j["lora_alpha"].is_number() || !std::isfinite(j["lora_alpha"].get<double>()))
      return bad("lora_alpha", "expected a number");
    c.lora_alpha = j["lora_alpha"].get<double>();
  } else {
    c.lora_alpha = c.r;
  }
  if (j.contains("use_rslora") && !j["use_rslora"].is_null()) {
    if (!j["use_rslora"].is_boolean()) return bad("use_rslora", "expected true or false");
    c.use_rslora = j["use_rslora"].get<bool>();
  }
  if (!j.contains("target_modules") || j["target_modules"].is_null())
    return bad("target_modules", "missing (a list, a regex or \"all-linear\")");
  const auto& t = j["target_modules"];
  if (t.is_string()) {
    const std::string s = t.get<std::string>();
    if (s == "all-linear") {
      c.all_linear = true;
    } else {
      if (auto r = ModuleRegex::compile(s); !r)
        return bad("target_modules", fmt::format("'{}' is not a regular expression ({})", s, r.message()));
      c.target_regex = s;
    }
  } else if (t.is_array()) {
    for (const auto& v : t) {
      if (!v.is_string()) return bad("target_modules", "expected module names");
      c.target_list.push_back(v.get<std::string>());
    }
    if (c.target_list.empty()) return bad("target_modules", "empty");
  } else {
    return bad("target_modules", "expected a list, a regex or \"all-linear\"");
  }
  for (const char* key : {"rank_pattern", "alpha_pattern"}) {
    if (!j.contains(key) || j[key].is_null()) continue;
    if (!j[key].is_object()) return bad(key, "expected an object");
    for (const auto& item : j[key].items()) {
      if (auto r = ModuleRegex::compile(pattern_key_regex(item.key())); !r)
        return bad(key, fmt::format("'{}' is not a regular expression ({})", item.key(), r.message()));
      if (std::string(key) == "rank_pattern") {
        if (!item.value().is_number_integer() || item.value().get<int64_t>() < 1)
          return bad(key, fmt::format("{}: expected a rank", item.key()));
        c.rank_pattern.emplace_back(item.key(), int32_t(item.value().get<int64_t>()));
      } else {
        if (!item.value().is_number()) return bad(key, fmt::format("{}: expected a number", item.key()));
        c.alpha_pattern.emplace_back(item.key(), item.value().get<double>());
      }
    }
  }
  if (j.contains("layers_to_transform") && !j["layers_to_transform"].is_null()) {
    const auto& l = j["layers_to_transform"];
    if (l.is_number_integer()) {
      c.layers_to_transform.push_back(int32_t(l.get<int64_t>()));
    } else if (l.is_array()) {
      for (const auto& v : l) {
        if (!v.is_number_integer()) return bad("layers_to_transform", "expected layer numbers");
        c.layers_to_transform.push_back(int32_t(v.get<int64_t>()));
      }
    } else {
      return bad("layers_to_transform", "expected a layer number or a list of them");
    }
  }
  return c;
}

namespace {

// Row h*D + 2i + j of GGUF's order is row h*D + j*D/2 + i of Hugging Face's.
std::vector<float> permute_rows(const std::vector<float>& rows, int32_t heads, int32_t head_dim, int64_t cols,
                                bool to_gguf) {
  std::vector<float> out(rows.size());
  const int32_t half = head_dim / 2;
  for (int32_t h = 0; h < heads; ++h)
    for (int32_t i = 0; i < half; ++i)
      for (int32_t j = 0; j < 2; ++j) {
        const int64_t gguf = int64_t(h) * head_dim + 2 * i + j, hf = int64_t(h) * head_dim + int64_t(j) * half + i;
        const int64_t from = to_gguf ? hf : gguf, to = to_gguf ? gguf : hf;
        std::copy_n(rows.begin() + from * cols, cols, out.begin() + to * cols);
      }
  return out;
}

}  // namespace

std::vector<float> permute_rows_for_gguf(const std::vector<float>& rows, int32_t heads, int32_t head_dim,
                                         int64_t cols) {
  return permute_rows(rows, heads, head_dim, cols, true);
}

std::vector<float> permute_rows_from_gguf(const std::vector<float>& rows, int32_t heads, int32_t head_dim,
                                          int64_t cols) {
  return permute_rows(rows, heads, head_dim, cols, false);
}

Result<std::vector<ProjectionAdapter>> read_adapter(const std::filesystem::path& dir, const ModelShape& shape,
                                                    bool tied, bool gguf_rows) {
  const auto config_path = dir / "adapter_config.json", weights_path = dir / "adapter_model.safetensors";
  std::ifstream in(config_path);
  if (!in) return Error{fmt::format("{}: cannot open for reading (a PEFT adapter folder has it)", config_path.string())};
  std::stringstream text;
  text << in.rdbuf();
  auto config = parse_config(text.str(), config_path.string());
  if (!config) return config.error();
  auto file = safetensors::File::open(weights_path);
  if (!file) return file.error();
  const std::string origin = weights_path.string();
  // module name -> its A and B tensors
  std::map<std::string, std::pair<const safetensors::TensorInfo*, const safetensors::TensorInfo*>> modules;
  static const std::regex key_re(R"((?:base_model\.model\.)?(.+)\.(lora_A|lora_B)\.weight)");
  for (const auto& t : file->tensors()) {
    std::smatch m;
    if (t.name.find("lora_embedding_") != std::string::npos)
      return Error{fmt::format("{}: tensor {}: LoRA on the embedding is not supported", origin, t.name)};
    if (!std::regex_match(t.name, m, key_re))
      return Error{fmt::format("{}: tensor {}: not a LoRA weight (expected <module>.lora_A.weight or .lora_B.weight)",
                               origin, t.name)};
    auto& entry = modules[m[1].str()];
    (m[2].str() == "lora_A" ? entry.first : entry.second) = &t;
  }
  if (modules.empty()) return Error{fmt::format("{}: no LoRA weights", origin)};
  // The config's patterns, compiled once (parse_config checked that they compile).
  std::optional<ModuleRegex> target_regex;
  if (!config->target_regex.empty()) {
    auto r = ModuleRegex::compile(config->target_regex);
    if (!r) return Error{fmt::format("{}: target_modules: {}", config_path.string(), r.message())};
    target_regex = std::move(*r);
  }
  auto compile_keys = [&](const auto& pattern, const char* key)
      -> Result<std::vector<std::pair<ModuleRegex, typename std::decay_t<decltype(pattern)>::value_type::second_type>>> {
    std::vector<std::pair<ModuleRegex, typename std::decay_t<decltype(pattern)>::value_type::second_type>> out;
    for (const auto& item : pattern) {
      auto r = ModuleRegex::compile(pattern_key_regex(item.first));
      if (!r) return Error{fmt::format("{}: {}: '{}': {}", config_path.string(), key, item.first, r.message())};
      out.emplace_back(std::move(*r), item.second);
    }
    return out;
  };
  auto rank_keys = compile_keys(config->rank_pattern, "rank_pattern");
  if (!rank_keys) return rank_keys.error();
  auto alpha_keys = compile_keys(config->alpha_pattern, "alpha_pattern");
  if (!alpha_keys) return alpha_keys.error();
  std::vector<ProjectionAdapter> out;
  for (const auto& entry : modules) {  // not a structured binding: a lambda below captures the name
    const std::string& module = entry.first;
    const safetensors::TensorInfo* a = entry.second.first;
    const safetensors::TensorInfo* b = entry.second.second;
    if (a == nullptr || b == nullptr)
      return Error{fmt::format("{}: module {} has lora_{} without lora_{}", origin, module, a ? "A" : "B",
                               a ? "B" : "A")};
    const auto target = target_of(module, shape);
    if (!target)
      return Error{fmt::format("{}: module {} is not a projection of this model ({} layers; q/k/v/o_proj, "
                               "gate/up/down_proj, lm_head)",
                               origin, module, shape.n_layers)};
    bool listed = false;
    if (config->all_linear) {
      listed = target->tensor != "output";
    } else if (target_regex) {
      auto m = target_regex->full_match(module);
      if (!m) return Error{fmt::format("{}: target_modules: {}", config_path.string(), m.message())};
      listed = *m;
    } else {
      listed = std::any_of(config->target_list.begin(), config->target_list.end(), [&](const std::string& name) {
        return module == name ||
               (module.size() > name.size() &&
                module.compare(module.size() - name.size() - 1, std::string::npos, "." + name) == 0);
      });
    }
    if (!listed)
      return Error{fmt::format("{}: module {} has weights but {}'s target_modules do not name it", origin, module,
                               config_path.string())};
    if (!config->layers_to_transform.empty() && target->layer >= 0 &&
        std::find(config->layers_to_transform.begin(), config->layers_to_transform.end(), target->layer) ==
            config->layers_to_transform.end())
      return Error{fmt::format("{}: module {} is outside layers_to_transform", origin, module)};
    if (target->tensor == "output" && tied)
      return Error{fmt::format("{}: module lm_head: this model ties its output head to the embedding; an lm_head "
                               "adapter would change both, and is refused",
                               origin)};
    int32_t r = config->r;
    double alpha = config->lora_alpha;
    // The first key that matches, in the config's order.
    auto first_match = [&](const auto& keys, auto& into, const char* name) -> Status {
      for (const auto& item : keys) {
        auto m = item.first.full_match(module);
        if (!m) return Error{fmt::format("{}: {}: {}", config_path.string(), name, m.message())};
        if (*m) {
          into = item.second;
          break;
        }
      }
      return ok_status();
    };
    if (auto st = first_match(*rank_keys, r, "rank_pattern"); !st) return st.error();
    if (auto st = first_match(*alpha_keys, alpha, "alpha_pattern"); !st) return st.error();
    if (a->shape != std::vector<int64_t>{r, target->in} || b->shape != std::vector<int64_t>{target->out, r})
      return Error{fmt::format("{}: module {}: lora_A {} and lora_B {}; this model's {} needs ({}, {}) and ({}, {}) "
                               "at rank {}",
                               origin, module, fmt::format("({})", fmt::join(a->shape, ", ")),
                               fmt::format("({})", fmt::join(b->shape, ", ")), target->tensor, r, target->in,
                               target->out, r, r)};
    ProjectionAdapter p;
    p.tensor = target->tensor;
    p.layer = target->layer;
    p.adapter.rank = r;
    p.adapter.a = file->read_f32(*a);
    p.adapter.b = file->read_f32(*b);
    if (target->permute_heads > 0 && gguf_rows)
      p.adapter.b = permute_rows_for_gguf(p.adapter.b, target->permute_heads, shape.head_dim, r);
    p.adapter.scale = float(config->use_rslora ? alpha / std::sqrt(double(r)) : alpha / double(r));
    out.push_back(std::move(p));
  }
  return out;
}

namespace {

// The Hugging Face module of one of this engine's projections.
std::optional<std::string> hf_module(const std::string& tensor, int32_t layer) {
  static const std::map<std::string, std::string> modules = {
      {"attn_q", "self_attn.q_proj"}, {"attn_k", "self_attn.k_proj"}, {"attn_v", "self_attn.v_proj"},
      {"attn_output", "self_attn.o_proj"}, {"ffn_gate", "mlp.gate_proj"}, {"ffn_up", "mlp.up_proj"},
      {"ffn_down", "mlp.down_proj"}};
  if (tensor == "output" && layer == -1) return "lm_head";
  const auto it = modules.find(tensor);
  if (it == modules.end() || layer < 0) return std::nullopt;
  return fmt::format("model.layers.{}.{}", layer, it->second);
}

std::string escape_dots(const std::string& name) {
  std::string out;
  for (char c : name) {
    if (c == '.') out += '\\';
    out += c;
  }
  return out;
}

// The most frequent value (the smallest of equally frequent ones).
template <typename T>
T most_common(const std::vector<T>& values) {
  std::map<T, int> count;
  for (const T& v : values) ++count[v];
  return std::max_element(count.begin(), count.end(), [](const auto& a, const auto& b) { return a.second < b.second; })
      ->first;
}

}  // namespace

Status write_adapter(const std::filesystem::path& dir, const std::vector<ProjectionAdapter>& adapters,
                     const ModelShape& shape, const WriteOptions& options) {
  namespace fs = std::filesystem;
  const std::string where = dir.string();
  if (adapters.empty()) return Error{fmt::format("{}: no adapters to write", where)};
  std::error_code ec;
  if (fs::exists(dir, ec)) {
    if (!fs::is_directory(dir, ec)) return Error{fmt::format("{}: exists and is not a folder", where)};
    if (!options.overwrite && !fs::is_empty(dir, ec))
      return Error{fmt::format("{}: the folder already holds files (another adapter?); choose another folder or "
                               "allow overwriting",
                               where)};
  }
  struct Item {
    std::string module, proj;
    int32_t layer, r;
    double alpha;
    const ProjectionAdapter* p;
    Target target;
  };
  std::vector<Item> items;
  std::vector<int32_t> ranks;
  std::vector<double> alphas;
  std::set<std::string> seen;
  for (const auto& p : adapters) {
    const auto module = hf_module(p.tensor, p.layer);
    if (!module) return Error{fmt::format("{}: {} of layer {} has no Hugging Face module", where, p.tensor, p.layer)};
    const auto target = target_of(*module, shape);
    if (!target) return Error{fmt::format("{}: {} is not in a model of {} layers", where, *module, shape.n_layers)};
    const int32_t r = p.adapter.rank;
    if (r <= 0 || p.adapter.a.size() != size_t(int64_t(r) * target->in) ||
        p.adapter.b.size() != size_t(target->out * int64_t(r)))
      return Error{fmt::format("{}: {}: rank {} with {} A and {} B values; ({}, {}) needs {} and {}", where, *module, r,
                               p.adapter.a.size(), p.adapter.b.size(), target->out, target->in, r * target->in,
                               target->out * r)};
    if (!seen.insert(*module).second) return Error{fmt::format("{}: two adapters on {}", where, *module)};
    const double alpha = double(p.adapter.scale) * (options.use_rslora ? std::sqrt(double(r)) : double(r));
    const std::string proj = module->substr(module->rfind('.') + 1);
    items.push_back({*module, proj, p.layer, r, alpha, &p, *target});
    ranks.push_back(r);
    alphas.push_back(alpha);
  }
  const int32_t r = most_common(ranks);
  const double alpha = most_common(alphas);
  nlohmann::json rank_pattern = nlohmann::json::object(), alpha_pattern = nlohmann::json::object();
  std::set<std::string> projs;
  std::set<int32_t> layers;
  bool head = false;
  for (const Item& it : items) {
    if (it.r != r) rank_pattern[escape_dots(it.module)] = it.r;
    if (it.alpha != alpha) alpha_pattern[escape_dots(it.module)] = it.alpha;
    if (it.layer < 0) head = true;
    projs.insert(it.proj);
    if (it.layer >= 0) layers.insert(it.layer);
  }
  // A module list with layers_to_transform says "these modules in these
  // layers": exact only when every such pair holds an adapter.
  const bool product = !head && items.size() == projs.size() * layers.size();
  nlohmann::json config = {{"peft_type", "LORA"},
                           {"task_type", "CAUSAL_LM"},
                           {"base_model_name_or_path", options.base_model},
                           {"r", r},
                           {"lora_alpha", alpha},
                           {"use_rslora", options.use_rslora},
                           {"lora_dropout", options.lora_dropout},
                           {"bias", "none"},
                           {"fan_in_fan_out", false},
                           {"use_dora", false},
                           {"init_lora_weights", true},
                           {"inference_mode", true},
                           {"rank_pattern", rank_pattern},
                           {"alpha_pattern", alpha_pattern},
                           {"modules_to_save", nullptr}};
  if (product) {
    config["target_modules"] = std::vector<std::string>(projs.begin(), projs.end());
    config["layers_to_transform"] =
        layers.size() == size_t(shape.n_layers) ? nlohmann::json(nullptr)
                                                : nlohmann::json(std::vector<int32_t>(layers.begin(), layers.end()));
  } else {
    std::vector<std::string> names;
    for (const Item& it : items) names.push_back(escape_dots(it.module));
    config["target_modules"] = fmt::format("(?:{})", fmt::join(names, "|"));
    config["layers_to_transform"] = nullptr;
  }
  std::vector<safetensors::F32Tensor> tensors;
  for (const Item& it : items) {
    const std::string key = "base_model.model." + it.module;
    const LowRankAdapter& a = it.p->adapter;
    tensors.push_back({key + ".lora_A.weight", {it.r, it.target.in}, a.a});
    tensors.push_back({key + ".lora_B.weight",
                       {it.target.out, it.r},
                       it.target.permute_heads > 0 && options.gguf_rows
                           ? permute_rows_from_gguf(a.b, it.target.permute_heads, shape.head_dim, it.r)
                           : a.b});
  }

  const fs::path tmp = dir.parent_path() / fmt::format(".{}.tmp-{}", dir.filename().string(), ::getpid());
  fs::remove_all(tmp, ec);
  fs::create_directories(tmp, ec);
  if (ec) return Error{fmt::format("{}: cannot create {}: {}", where, tmp.string(), ec.message())};
  auto cleanup = [&] { fs::remove_all(tmp, ec); };
  {
    std::ofstream out(tmp / "adapter_config.json");
    out << config.dump(2) << "\n";
    out.close();
    if (!out) {
      cleanup();
      return Error{fmt::format("{}: cannot write adapter_config.json", where)};
    }
  }
  if (auto st = safetensors::write_f32(tmp / "adapter_model.safetensors", tensors, {{"format", "pt"}}); !st) {
    cleanup();
    return st.error();
  }
  const fs::path old = dir.parent_path() / fmt::format(".{}.old-{}", dir.filename().string(), ::getpid());
  const bool replacing = fs::exists(dir);
  if (replacing) {
    fs::rename(dir, old, ec);
    if (ec) {
      cleanup();
      return Error{fmt::format("{}: cannot move the old folder aside: {}", where, ec.message())};
    }
  }
  fs::rename(tmp, dir, ec);
  if (ec) {
    const std::string why = ec.message();
    if (replacing) fs::rename(old, dir, ec);
    cleanup();
    return Error{fmt::format("{}: cannot rename {} into place: {}", where, tmp.string(), why)};
  }
  if (replacing) fs::remove_all(old, ec);
  return ok_status();
}

}  // namespace inferlab::peft
