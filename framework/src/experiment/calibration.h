// Calibration (kHookCalibrate): before a method's runs, dense passes over
// corpus windows whose intermediates the method condenses into artifacts, kept
// by model checksum, plugin version and the values of all its parameters, so
// each combination is calibrated once. `inferlab calibrate CONFIG.toml` runs
// the calibration of every method in a config on its own.
#pragma once

#include <filesystem>
#include <string>

#include "engine/engine.h"
#include "experiment/catalog.h"
#include "inferlab/plugin.h"

namespace inferlab {

// The folder of a calibrating method's artifacts:
// <root>/<plugin>/<model checksum, 16 hex>/<hash of version, parameters,
// request and arithmetic, 16 hex> (a Path parameter and a corpus file enter by
// their content; a calibration on the GPU in f16 is not one on the CPU).
Result<std::filesystem::path> calibration_dir(const PluginEntry& plugin, const ParamValues& params,
                                              const CalibrationRequest& request,
                                              const std::string& model_checksum, const std::string& arithmetic,
                                              const std::filesystem::path& artifact_root = {});

// A corpus as a key: the built-in "kv_retrieval" by its name, a file ("kjv"
// too) by its content ("sha256:<hex>").
Result<std::string> corpus_key(const std::string& corpus);

// The arithmetic an engine's dense passes use: "cpu-f32", "cuda-f16", "cuda-bf16".
std::string arithmetic(const Engine& engine);

struct PreparedMethod {
  bool calibrated = false;        // calibration ran now
  bool reused = false;            // its artifacts were there already
  std::filesystem::path artifact_dir;  // empty: the method does not calibrate
  std::filesystem::path activation_dir;  // CalibrationRequest::stored: the activation store it reads
  CalibrationRequest request;
};

// Calibrates `method` when it asks for it and its artifacts are not there yet
// (the engine runs dense passes; its method is left unset); loads nothing.
// A request with `stored` captures (or continues, or reuses) its activation
// store under <artifact root>/activations (experiment/activation_store.h),
// then calls finish_stored_calibration instead of on_calibration; the
// artifact folder's hash takes the store's key in.
Result<PreparedMethod> ensure_calibrated(Method& method, const PluginEntry& plugin, const ParamValues& params,
                                         Engine& engine, const std::filesystem::path& artifact_root = {});

// ensure_calibrated, then loads the method (on_load with the calibration's
// folder, weights it replaces into `overrides`).
Result<PreparedMethod> prepare_method(Method& method, const PluginEntry& plugin, const ParamValues& params,
                                      Engine& engine, const std::filesystem::path& artifact_root = {},
                                      WeightOverrides* overrides = nullptr);

}  // namespace inferlab
