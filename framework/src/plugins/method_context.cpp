#include "plugins/method_context.h"

#include <fmt/format.h>

#include <cstdlib>

namespace inferlab {

std::span<const float> ModelWeightView::tensor(const std::string& name, int32_t layer) const {
  const ModelWeights& w = model_.weights();
  if (layer < 0) {
    if (name == "token_embd") return w.token_embd;
    if (name == "output") return w.output.empty() ? w.token_embd : w.output;  // tied: the embedding is the head
    if (name == "output_norm") return w.output_norm;
    return {};
  }
  // A shape-only model (random weights made on the GPU) has no host weights.
  if (layer >= model_.config().n_layers || size_t(layer) >= w.layers.size()) return {};
  const LayerWeights& lw = w.layers[size_t(layer)];
  if (name == "attn_q") return lw.wq;
  if (name == "attn_k") return lw.wk;
  if (name == "attn_v") return lw.wv;
  if (name == "attn_output") return lw.wo;
  if (name == "attn_norm") return lw.attn_norm;
  if (name == "ffn_gate") return lw.w_gate;
  if (name == "ffn_up") return lw.w_up;
  if (name == "ffn_down") return lw.w_down;
  if (name == "ffn_norm") return lw.ffn_norm;
  return {};
}

std::filesystem::path artifact_dir(const std::string& plugin, const std::string& model_checksum,
                                   const std::filesystem::path& root) {
  std::filesystem::path base = root;
  if (base.empty()) {
    if (const char* env = std::getenv("INFERLAB_ARTIFACT_DIR"); env != nullptr && *env != '\0')
      base = env;
    else
      base = model_cache_dir().parent_path() / "artifacts";
  }
  return base / plugin / model_checksum.substr(0, 16);
}

Status load_method(Method& method, const PluginEntry& plugin, const Engine& engine,
                   const std::filesystem::path& artifact_root, WeightOverrides* overrides,
                   const std::filesystem::path& exact_dir) {
  if ((plugin.hooks & kHookLoad) == 0) return ok_status();
  const std::string& checksum = engine.model().checksum();
  const auto dir = exact_dir.empty() ? artifact_dir(plugin.name, checksum, artifact_root) : exact_dir;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return Error{fmt::format("plugin {}: cannot create artifact folder {}: {}", plugin.name, dir.string(),
                                   ec.message())};
  const ModelWeightView weights(engine.model());
  WeightOverrides local;
  WeightOverrides& edits = overrides != nullptr ? *overrides : local;
  edits.config = &engine.config();
  edits.items.clear();
  edits.adapters.clear();
  edits.storages.clear();
  edits.base = &weights;  // for merged adapters, while on_load runs
  const std::string dtype = engine.backend() == BackendKind::Cpu                   ? "float32"
                            : engine.options().gpu_dtype == GpuDType::BF16 ? "bfloat16"
                                                                               : "float16";
  const LoadContext context{engine.shape(), checksum, dir.string(), &weights, &edits, dtype};
  Status loaded = ok_status();
  try {
    loaded = method.on_load(context);
  } catch (const std::exception& e) {
    edits.base = nullptr;
    return Error{fmt::format("plugin {}: on_load threw: {}", plugin.name, e.what())};
  }
  edits.base = nullptr;
  if (!loaded) return Error{fmt::format("plugin {}: on_load: {}", plugin.name, loaded.message())};
  if (overrides == nullptr && !local.empty())
    return Error{fmt::format("plugin {}: replaces weights, which this caller cannot apply", plugin.name)};
  return ok_status();
}

}  // namespace inferlab
