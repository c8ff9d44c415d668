// Prepares a Method for a model: the LoadContext its on_load hook receives
// (shape, model checksum, artifact folder, read-only weights).
#pragma once

#include <filesystem>
#include <string>

#include "engine/engine.h"
#include "plugins/plugin_entry.h"
#include "inferlab/plugin.h"

namespace inferlab {

// Read-only weights of a loaded model under their GGUF names (see WeightView).
class ModelWeightView final : public WeightView {
 public:
  explicit ModelWeightView(const Model& model) : model_(model) {}
  std::span<const float> tensor(const std::string& name, int32_t layer) const override;

 private:
  const Model& model_;
};

// Where a plugin keeps cached artifacts for one model:
// <root>/<plugin>/<first 16 hex digits of the model checksum>; root defaults to
// $INFERLAB_ARTIFACT_DIR or ~/.cache/inferlab/artifacts.
std::filesystem::path artifact_dir(const std::string& plugin, const std::string& model_checksum,
                                   const std::filesystem::path& root = {});

// Calls on_load when the plugin declares kHookLoad (creating its artifact
// folder); errors name the plugin. Weights the method replaces for its runs
// go to `overrides` (give them to Engine::set_method with the method); with
// none given, a method that replaces weights is an error.
// `artifact_dir` (when given) replaces the plugin's folder for this model
// (a calibrated method's folder for its parameters, experiment/calibration.h).
Status load_method(Method& method, const PluginEntry& plugin, const Engine& engine,
                   const std::filesystem::path& artifact_root = {}, WeightOverrides* overrides = nullptr,
                   const std::filesystem::path& artifact_dir = {});

}  // namespace inferlab
