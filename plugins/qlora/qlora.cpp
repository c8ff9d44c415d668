// QLoRA (Dettmers et al., 2023): the frozen base weights in 4 bits (NF4 with
// double quantization by default; FP4 and Int4 for the paper's comparison),
// LoRA adapters unmerged on top in full precision. The method names the
// storage and the adapters; the engine quantizes every layer projection (Q, K,
// V, O, gate, up, down) of this run's copy of the model when the method is
// installed, keeps it in 4 bits only, and multiplies through it: a fused
// dequantizing GEMV for one-row calls (decode), dequantize-then-GEMM for
// prefill. The embedding, the norms and the output layer keep the model's
// precision, as QLoRA keeps them.
#include "inferlab/plugin_export.h"

namespace {

using namespace inferlab;

constexpr const char* kProjections[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};

class Qlora final : public Method {
 public:
  Qlora(WeightStorage storage, std::vector<std::string> adapters, float scale, std::string compute_dtype)
      : storage_(storage), adapters_(std::move(adapters)), scale_(scale), compute_dtype_(std::move(compute_dtype)) {}

  Status on_load(const LoadContext& ctx) override {
    if (ctx.overrides == nullptr) return Error{"qlora: the engine offers no weight editor"};
    if (compute_dtype_ != "auto" && compute_dtype_ != ctx.compute_dtype)
      return Error{"compute_dtype = " + compute_dtype_ + ", but this engine computes in " + ctx.compute_dtype +
                   " (the CPU backend in float32; CUDA as model.dtype says)"};
    for (int32_t l = 0; l < ctx.shape.n_layers; ++l)
      for (const char* name : kProjections)
        if (auto s = ctx.overrides->set_storage(name, l, storage_); !s) return s;
    for (const std::string& path : adapters_)
      if (auto s = ctx.overrides->load_adapter(path, scale_, /*merge=*/false); !s) return s;
    return ok_status();
  }

 private:
  WeightStorage storage_;
  std::vector<std::string> adapters_;
  float scale_;
  std::string compute_dtype_;
};

class QloraPlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    return {"qlora", "1.0.0", "QLoRA: 4-bit base weights (NF4/FP4/Int4, double quantization) with LoRA adapters",
            hooks_of<Qlora>(),
            {ParamSpec::string("quant", "nf4", {"nf4", "fp4", "int4"},
                               "the 4-bit format of the layer projections (bitsandbytes' NF4 and FP4; symmetric Int4)"),
             ParamSpec::boolean("double_quant", true, "the block absmaxes in 8 bits too (blocks of 256)"),
             ParamSpec::integer("block_size", 64, 2, 4096, "values per absmax block (even)"),
             ParamSpec::path_list("adapter", "PEFT folders or llama.cpp GGUF adapters, unmerged on top (optional)"),
             ParamSpec::real("scale", 1.0, -1000.0, 1000.0, "multiplies every adapter's own scale (alpha / r)"),
             ParamSpec::string("compute_dtype", "auto", {"auto", "float32", "float16", "bfloat16"},
                               "the arithmetic the weights are dequantized into: the backend's (float32 on the "
                               "CPU; model.dtype on CUDA); a named one must be it")}};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    WeightStorage storage;
    const std::string& quant = p.get_string("quant");
    storage.format = quant == "fp4" ? WeightFormat::FP4 : quant == "int4" ? WeightFormat::Int4 : WeightFormat::NF4;
    storage.double_quant = p.get_bool("double_quant");
    storage.block_size = int32_t(p.get_int("block_size"));
    if (storage.block_size % 2 != 0)
      return Error{"block_size: " + std::to_string(storage.block_size) + " is odd (two codes share a byte)"};
    return std::unique_ptr<Method>(
        std::make_unique<Qlora>(storage, p.get_path_list("adapter"), float(p.get_float("scale")),
                                p.get_string("compute_dtype")));
  }
};

}  // namespace

INFERLAB_PLUGIN(QloraPlugin)
