// Shared helpers for unit tests: temp paths and tiny synthetic models.
#pragma once

#include <gtest/gtest.h>

#include <atomic>
#include <cstdlib>
#include <filesystem>
#include <map>
#include <memory>
#include <string>
#include <unistd.h>

#include "model/model.h"
#include "model/synthetic_model.h"

namespace inferlab::test {

// A fresh path under $INFERLAB_TEST_TMP (or the system temp dir), unique per process.
inline std::filesystem::path temp_path(const std::string& name) {
  static std::atomic<int> counter{0};
  const char* root = std::getenv("INFERLAB_TEST_TMP");
  std::filesystem::path dir = root != nullptr ? std::filesystem::path(root) : std::filesystem::temp_directory_path();
  dir /= "inferlab-tests-" + std::to_string(::getpid());
  // Removed when the test process exits.
  static const struct Cleanup {
    std::filesystem::path dir;
    ~Cleanup() {
      std::error_code ignored;
      std::filesystem::remove_all(dir, ignored);
    }
  } cleanup{dir};
  std::filesystem::create_directories(dir);
  return dir / (std::to_string(counter++) + "-" + name);
}

inline std::shared_ptr<Model> load_synthetic(const SyntheticModelSpec& spec) {
  const auto path = temp_path(spec.name + ".gguf");
  auto written = write_synthetic_model(spec, path);
  EXPECT_TRUE(written.ok()) << (written.ok() ? "" : written.message());
  auto model = Model::load(path);
  EXPECT_TRUE(model.ok()) << (model.ok() ? "" : model.message());
  return model.ok() ? *model : nullptr;
}

// A small model with grouped-query attention (4 query heads, 2 kv heads), the
// shape the engine mechanism tests share; one per (name, seed) for the process.
inline std::shared_ptr<Model> gqa_test_model(const std::string& name, uint64_t seed) {
  static std::map<std::pair<std::string, uint64_t>, std::shared_ptr<Model>> models;
  auto& model = models[{name, seed}];
  if (!model) {
    SyntheticModelSpec spec;
    spec.name = name;
    spec.n_layers = 2;
    spec.n_heads = 4;
    spec.n_kv_heads = 2;
    spec.seed = seed;
    model = load_synthetic(spec);
  }
  return model;
}

// Real default model, or nullptr when it is not installed (tests then skip).
inline std::filesystem::path default_model_path() {
  auto resolved = resolve_model("smollm2-135m");
  return resolved.ok() ? *resolved : std::filesystem::path();
}

}  // namespace inferlab::test
