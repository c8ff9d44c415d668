// Model::merge_adapter: a fine-tuned model from its base and a LoRA adapter.
#include <fmt/format.h>

#include <cmath>

#include "cpu/sgemm_tiles.h"
#include "formats/lora_file.h"
#include "model/model.h"

namespace inferlab {

Status Model::merge_adapter(const std::filesystem::path& path, float scale) {
  const std::string where = path.string();
  if (!adapter_digest_.empty())
    return Error{fmt::format("{}: the model already has an adapter merged ({})", where, adapter_digest_)};
  if (!has_weights() || projections_released_)
    return Error{fmt::format("{}: the model has no float32 projections to merge an adapter into", where)};
  if (!std::isfinite(scale)) return Error{fmt::format("{}: the scale {} is not finite", where, scale)};
  auto found = read_lora_adapter(where, config_);
  if (!found) return found.error();
  auto digest = sha256_path(path);
  if (!digest) return digest.error();
  // Every target and shape checked before any weight changes.
  auto weight = [&](const peft::ProjectionAdapter& p) -> WeightVector* {
    if (p.layer < 0) return p.tensor == "output" && !weights_.output.empty() ? &weights_.output : nullptr;
    if (p.layer >= int32_t(weights_.layers.size())) return nullptr;
    LayerWeights& w = weights_.layers[size_t(p.layer)];
    if (p.tensor == "attn_q") return &w.wq;
    if (p.tensor == "attn_k") return &w.wk;
    if (p.tensor == "attn_v") return &w.wv;
    if (p.tensor == "attn_output") return &w.wo;
    if (p.tensor == "ffn_gate") return &w.w_gate;
    if (p.tensor == "ffn_up") return &w.w_up;
    if (p.tensor == "ffn_down") return &w.w_down;
    return nullptr;
  };
  for (const auto& p : *found) {
    const WeightVector* w = weight(p);
    const int64_t r = p.adapter.rank;
    if (w == nullptr || r <= 0)
      return Error{fmt::format("{}: no weight of this model for {} (layer {})", where, p.tensor, p.layer)};
    const int64_t in = int64_t(p.adapter.a.size()) / r, out = int64_t(p.adapter.b.size()) / r;
    if (in * r != int64_t(p.adapter.a.size()) || out * r != int64_t(p.adapter.b.size()) ||
        out * in != int64_t(w->size()))
      return Error{fmt::format("{}: the adapter on {} (layer {}) is ({} x {}) at rank {}; the weight has {} values",
                               where, p.tensor, p.layer, out, in, r, w->size())};
    for (const auto* v : {&p.adapter.a, &p.adapter.b})
      for (const float x : *v)
        if (!std::isfinite(x))
          return Error{fmt::format("{}: the adapter on {} (layer {}) has a value that is not finite", where, p.tensor,
                                   p.layer)};
  }
  for (const auto& p : *found) {
    WeightVector& w = *weight(p);
    const int64_t r = p.adapter.rank, in = int64_t(p.adapter.a.size()) / r, out = int64_t(p.adapter.b.size()) / r;
    // W (out, in) += (scale * s) B (out, r) A (r, in)
    kernels::cpu::sgemm_tiles(false, out, in, r, scale * p.adapter.scale, p.adapter.b.data(), r,
                              p.adapter.a.data(), in, 1.0f, w.data(), in);
  }
  adapter_digest_ = "sha256:" + *digest;
  adapter_scale_ = scale;
  weights_checksum_ = sha256_hex(fmt::format("{}\nadapter {} scale {}", file_checksum(), adapter_digest_, scale));
  return ok_status();
}

}  // namespace inferlab
