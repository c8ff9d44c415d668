// Test helpers of the author's kit (inferlab/testing.h), also used by the
// project's own tests: temp paths, tiny synthetic models, random tokens, and
// the normalized error every logits comparison uses.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <random>
#include <vector>
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

// A synthetic model loaded once per process for its spec's (name, seed): a
// test file's model in one line, e.g.
//   shared_synthetic({.name = "calm-4", .n_layers = 4, .seed = 11})
inline std::shared_ptr<Model> shared_synthetic(const SyntheticModelSpec& spec) {
  static std::map<std::pair<std::string, uint64_t>, std::shared_ptr<Model>> models;
  auto& model = models[{spec.name, spec.seed}];
  if (!model) model = load_synthetic(spec);
  return model;
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

// The real default model, loaded once per process; nullptr when it is not
// installed (tests then skip). A file that is there but does not load fails
// the calling test.
inline std::shared_ptr<Model> default_model() {
  static std::shared_ptr<Model> model = [] {
    const auto path = default_model_path();
    if (path.empty()) return std::shared_ptr<Model>();
    auto loaded = Model::load(path);
    EXPECT_TRUE(loaded.ok()) << (loaded.ok() ? "" : loaded.message());
    return loaded.ok() ? *loaded : std::shared_ptr<Model>();
  }();
  return model;
}

inline std::vector<int32_t> random_tokens(int32_t n_vocab, int n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, n_vocab - 1);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = dist(rng);
  return t;
}

// n standard normal floats from `seed` (mt19937_64).
inline std::vector<float> normal_floats(int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  return v;
}

// Max |a-b| relative to the largest |b|.
template <typename A, typename B>
double normalized_max_error(const A& a, const B& b) {
  double err = 0, scale = 1e-12;
  for (size_t i = 0; i < a.size(); ++i) {
    err = std::max(err, std::abs(double(a[i]) - double(b[i])));
    scale = std::max(scale, std::abs(double(b[i])));
  }
  return err / scale;
}

}  // namespace inferlab::test
