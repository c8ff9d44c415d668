// Activation capture (CalibrationRequest::stored, `inferlab capture`): dense
// passes over calibration windows whose per-layer intermediates are written to
// an activation store on disk (layout: inferlab/activations.h), streamed layer
// by layer (memory: one sample), committed sample by sample and resumable.
#pragma once

#include <filesystem>

#include "engine/engine.h"
#include "inferlab/activations.h"

namespace inferlab {

// <artifact root>/activations (root: as plugins/method_context.h's artifact_dir
// defaults it, $INFERLAB_ARTIFACT_DIR or ~/.cache/inferlab/artifacts).
std::filesystem::path default_activation_root(const std::filesystem::path& artifact_root = {});

// The store's key: a hash of the corpus (a file by its content), samples,
// tokens, stored taps and arithmetic (16 hex); calibration_dir takes it in too.
Result<std::string> activation_store_key(const CalibrationRequest& request, const std::string& arithmetic);

// The store's folder: <root>/<model checksum, 16 hex>/<hash of the corpus
// (a file by its content), samples, tokens, taps and arithmetic, 16 hex>.
Result<std::filesystem::path> activation_store_dir(const Engine& engine, const CalibrationRequest& request,
                                                   const std::filesystem::path& root);

struct CaptureOptions {
  // Stop after this many samples were committed by this call (-1: all): an
  // interrupted capture, for tests.
  int32_t max_new_samples = -1;
  // The free bytes the disk check assumes (-1: std::filesystem::space's), for tests.
  int64_t free_bytes = -1;
};

// Captures the request's taps (kTapLogits is not stored) into its store and
// returns the folder: a complete store is reused without a forward pass, a
// partial one continues after its last committed sample (files cut back to
// it). Refused before any pass when the disk lacks room for what remains.
// The engine's method is left unset.
Result<std::filesystem::path> capture_activations(Engine& engine, const CalibrationRequest& request,
                                                  const std::filesystem::path& root, const CaptureOptions& options = {});

}  // namespace inferlab
