#include "formats/gguf_adapter.h"

#include <fmt/format.h>
#include <fmt/ranges.h>

#include <cmath>
#include <fstream>
#include <map>
#include <regex>

#include "gguf/gguf.h"

namespace inferlab::gguf_adapter {

namespace {

struct Target {
  std::string tensor;
  int32_t layer = -1;
  int64_t out = 0, in = 0;
};

std::optional<Target> target_of(const std::string& base, const ModelShape& s) {
  const int64_t qd = int64_t(s.n_heads) * s.head_dim, kvd = int64_t(s.n_kv_heads) * s.head_dim;
  if (base == "output") return Target{"output", -1, s.n_vocab, s.n_embd};
  static const std::regex layer_re(R"(blk\.(\d{1,9})\.(\w+))");
  std::smatch m;
  if (!std::regex_match(base, m, layer_re)) return std::nullopt;
  const int64_t layer = std::stoll(m[1].str());
  if (layer >= s.n_layers) return std::nullopt;
  const auto l = int32_t(layer);
  const std::string t = m[2].str();
  if (t == "attn_q") return Target{t, l, qd, s.n_embd};
  if (t == "attn_k" || t == "attn_v") return Target{t, l, kvd, s.n_embd};
  if (t == "attn_output") return Target{t, l, s.n_embd, qd};
  if (t == "ffn_gate" || t == "ffn_up") return Target{t, l, s.n_ff, s.n_embd};
  if (t == "ffn_down") return Target{t, l, s.n_embd, s.n_ff};
  return std::nullopt;
}

}  // namespace

bool looks_like_gguf(const std::filesystem::path& path) {
  std::ifstream in(path, std::ios::binary);
  char magic[4] = {};
  return in.read(magic, 4) && std::string(magic, 4) == "GGUF";
}

Result<std::vector<peft::ProjectionAdapter>> read_adapter(const std::filesystem::path& path, const ModelShape& shape,
                                                          const std::string& architecture, bool tied) {
  auto file = gguf::File::open(path);
  if (!file) return file.error();
  return read_adapter(**file, path.string(), shape, architecture, tied);
}

Result<std::vector<peft::ProjectionAdapter>> read_adapter(const gguf::File& f, const std::string& origin,
                                                          const ModelShape& shape, const std::string& architecture,
                                                          bool tied) {
  const auto type = f.get_string("general.type");
  if (type != "adapter")
    return Error{fmt::format("{}: general.type is {}; a LoRA adapter has \"adapter\" (is this a model?)", origin,
                             type ? "\"" + *type + "\"" : std::string("missing"))};
  const auto kind = f.get_string("adapter.type");
  if (kind != "lora")
    return Error{fmt::format("{}: adapter.type is {}; only \"lora\" adapters are read", origin,
                             kind ? "\"" + *kind + "\"" : std::string("missing"))};
  if (const auto arch = f.get_string("general.architecture"); arch && !architecture.empty() && *arch != architecture)
    return Error{fmt::format("{}: an adapter for architecture \"{}\"; the model is \"{}\"", origin, *arch,
                             architecture)};
  double alpha = 0;
  if (f.find("adapter.lora.alpha") != nullptr) {
    const auto a = f.get_float("adapter.lora.alpha");
    if (!a || !std::isfinite(*a)) return Error{fmt::format("{}: adapter.lora.alpha is not a number", origin)};
    alpha = *a;
  }
  std::map<std::string, std::pair<const gguf::TensorInfo*, const gguf::TensorInfo*>> pairs;
  static const std::regex name_re(R"((.+)\.weight\.lora_(a|b))");
  for (const auto& t : f.tensors()) {
    std::smatch m;
    if (!std::regex_match(t.name, m, name_re))
      return Error{fmt::format("{}: tensor {}: not a LoRA weight (expected <tensor>.weight.lora_a or .lora_b)", origin,
                               t.name)};
    auto& entry = pairs[m[1].str()];
    (m[2].str() == "a" ? entry.first : entry.second) = &t;
  }
  if (pairs.empty()) return Error{fmt::format("{}: no LoRA tensors", origin)};
  std::vector<peft::ProjectionAdapter> out;
  for (const auto& [base, ab] : pairs) {
    const auto* a = ab.first;
    const auto* b = ab.second;
    if (a == nullptr || b == nullptr)
      return Error{fmt::format("{}: {}.weight has lora_{} without lora_{}", origin, base, a ? "a" : "b",
                               a ? "b" : "a")};
    const auto target = target_of(base, shape);
    if (!target)
      return Error{fmt::format("{}: {}.weight is not a projection of this model ({} layers; attn_q/k/v/output, "
                               "ffn_gate/up/down, output)",
                               origin, base, shape.n_layers)};
    if (target->tensor == "output" && tied)
      return Error{fmt::format("{}: {}.weight: this model ties its output head to the embedding; an output adapter "
                               "would change both, and is refused",
                               origin, base)};
    const int64_t r = a->dims.size() == 2 ? a->dims[1] : 0;
    if (a->dims.size() != 2 || b->dims.size() != 2 || a->dims[0] != target->in || b->dims[1] != target->out ||
        b->dims[0] != r || r < 1 || r > std::min(target->in, target->out))
      return Error{fmt::format("{}: {}.weight: lora_a [{}] and lora_b [{}] (ggml order); this model's {} needs "
                               "[{}, r] and [r, {}]",
                               origin, base, fmt::join(a->dims, ", "), fmt::join(b->dims, ", "), target->tensor,
                               target->in, target->out)};
    auto va = gguf::dequantize(*a);
    if (!va) return Error{fmt::format("{}: {}: {}", origin, a->name, va.message())};
    auto vb = gguf::dequantize(*b);
    if (!vb) return Error{fmt::format("{}: {}: {}", origin, b->name, vb.message())};
    peft::ProjectionAdapter p;
    p.tensor = target->tensor;
    p.layer = target->layer;
    p.adapter.rank = int32_t(r);
    p.adapter.a = std::move(*va);
    p.adapter.b = std::move(*vb);
    p.adapter.scale = alpha != 0 ? float(alpha / double(r)) : 1.0f;
    out.push_back(std::move(p));
  }
  return out;
}

Status write_adapter(const std::filesystem::path& path, const std::vector<peft::ProjectionAdapter>& adapters,
                     const std::string& architecture) {
  const std::string where = path.string();
  if (adapters.empty()) return Error{fmt::format("{}: no adapters to write", where)};
  const double alpha = double(adapters[0].adapter.scale) * adapters[0].adapter.rank;
  gguf::Writer w;
  w.set_string("general.architecture", architecture);
  w.set_string("general.type", "adapter");
  w.set_string("adapter.type", "lora");
  w.set_f32("adapter.lora.alpha", float(alpha));
  for (const auto& p : adapters) {
    const LowRankAdapter& a = p.adapter;
    const double this_alpha = double(a.scale) * a.rank;
    if (std::fabs(this_alpha - alpha) > 1e-6 * std::fabs(alpha))
      return Error{fmt::format("{}: {} of layer {} has scale x rank {} but the first adapter {}: a GGUF adapter has one "
                               "alpha for all (write a PEFT folder instead)",
                               where, p.tensor, p.layer, this_alpha, alpha)};
    if (a.rank <= 0 || a.a.size() % size_t(a.rank) != 0 || a.b.size() % size_t(a.rank) != 0)
      return Error{fmt::format("{}: {} of layer {}: rank {} with {} A and {} B values", where, p.tensor, p.layer, a.rank,
                               a.a.size(), a.b.size())};
    const std::string base = p.layer < 0 ? p.tensor : fmt::format("blk.{}.{}", p.layer, p.tensor);
    const int64_t in = int64_t(a.a.size()) / a.rank, out = int64_t(a.b.size()) / a.rank;
    if (auto st = w.add_tensor_f32(base + ".weight.lora_a", gguf::TensorType::F32, {in, a.rank}, a.a); !st)
      return Error{fmt::format("{}: {}", where, st.message())};
    if (auto st = w.add_tensor_f32(base + ".weight.lora_b", gguf::TensorType::F32, {a.rank, out}, a.b); !st)
      return Error{fmt::format("{}: {}", where, st.message())};
  }
  const std::filesystem::path tmp = path.string() + ".tmp";
  if (auto st = w.write(tmp); !st) return st;
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return Error{fmt::format("{}: cannot rename {} into place: {}", where, tmp.string(), ec.message())};
  return ok_status();
}

}  // namespace inferlab::gguf_adapter
