// Methods that store projections in 4 bits for their runs (QLoRA's base weights),
// and the reference that replaces the same projections by their dequantized
// values: the engine's per-run weight storage, driven as the QLoRA plugin will.
#pragma once

#include <string>
#include <vector>

#include "adapter_method.h"
#include "cpu/quant4.h"
#include "engine/backend.h"

namespace inferlab::test {

inline const std::vector<std::string>& layer_projections() {
  static const std::vector<std::string> names = {"attn_q", "attn_k", "attn_v", "attn_output",
                                                 "ffn_gate", "ffn_up", "ffn_down"};
  return names;
}

// Every layer projection in 4 bits (or, as `reference`, replaced by its 4-bit
// values dequantized); W_q of layer 0 first scaled by `q_scale` (a replacement
// the storage then quantizes); optional adapters on top.
class StorageMethod final : public Method {
 public:
  StorageMethod(WeightStorage storage, bool reference, float q_scale = 1.0f, std::vector<AdapterSpec> adapters = {})
      : storage_(storage), reference_(reference), q_scale_(q_scale), adapters_(std::move(adapters)) {}

  Status on_load(const LoadContext& ctx) override {
    for (int32_t l = 0; l < ctx.shape.n_layers; ++l)
      for (const std::string& name : layer_projections()) {
        const auto w = ctx.weights->tensor(name, l);
        std::vector<float> data(w.begin(), w.end());
        const bool scaled = q_scale_ != 1.0f && name == "attn_q" && l == 0;
        if (scaled)
          for (float& x : data) x *= q_scale_;
        if (reference_) {
          const int64_t cols = name == "attn_output" ? ctx.shape.n_heads * ctx.shape.head_dim
                               : name == "ffn_down"  ? ctx.shape.n_ff
                                                     : ctx.shape.n_embd;
          const auto q = kernels::cpu::quant4_quantize(data.data(), int64_t(data.size()) / cols, cols,
                                                       quant4_format(storage_.format), storage_.block_size,
                                                       storage_.double_quant);
          kernels::cpu::quant4_dequantize(q, data.data());
          if (auto s = ctx.overrides->replace(name, l, data); !s) return s;
        } else {
          if (scaled)
            if (auto s = ctx.overrides->replace(name, l, data); !s) return s;
          if (auto s = ctx.overrides->set_storage(name, l, storage_); !s) return s;
        }
      }
    for (const AdapterSpec& a : adapters_)
      if (auto s = ctx.overrides->add_adapter(a.tensor, a.layer, a.adapter); !s) return s;
    return ok_status();
  }

 private:
  WeightStorage storage_;
  bool reference_;
  float q_scale_;
  std::vector<AdapterSpec> adapters_;
};

inline Result<std::vector<float>> run_with_storage(Engine& engine, Method* method, const std::vector<int32_t>& tokens,
                                                   int64_t decode) {
  return run_with_method(engine, method, kHookLoad, tokens, decode);
}

}  // namespace inferlab::test
