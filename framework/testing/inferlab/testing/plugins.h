// Plugin test helpers of the author's kit (inferlab/testing.h): a registry
// holding the built plugins (the host's plugin folder and the test-only
// plugins), methods made and installed on an engine, traces of logits, and the
// dense-equivalence check every plugin test can call: configured to keep
// everything, a method must reproduce dense logits.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "engine/engine.h"
#include "experiment/calibration.h"
#include "inferlab/testing/support.h"
#include "plugins/method_context.h"
#include "plugins/plugin_host.h"

namespace inferlab::test {

// The folders the build put the plugins in, unless the environment names others
// (a bundle of the test binaries run on another machine, e.g. the GPU machine).
inline std::string plugin_dir(const char* variable, const char* built) {
  const char* value = std::getenv(variable);
  return value != nullptr && *value != '\0' ? value : built;
}

inline PluginRegistry& plugin_registry() {
  static PluginRegistry* registry = [] {
    auto* r = new PluginRegistry();
    auto s = r->scan({plugin_dir("INFERLAB_HOST_PLUGIN_DIR", INFERLAB_HOST_PLUGIN_DIR),
                      plugin_dir("INFERLAB_TEST_PLUGIN_DIR", INFERLAB_TEST_PLUGIN_DIR) + "/inferlab-plugin-probe.so"});
    EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
    return r;
  }();
  return *registry;
}

// A method ready to run on `engine`: created, loaded, installed on the engine.
struct ActiveMethod {
  MethodHandle handle;
  const PluginEntry* entry = nullptr;
  std::unique_ptr<WeightOverrides> overrides = std::make_unique<WeightOverrides>();
};

// Every parameter of `entry`: its defaults, then `given` (calibration keys on all of them).
inline ParamValues resolved_params(const PluginEntry& entry, const ParamValues& given) {
  ParamValues resolved;
  for (const ParamSpec& spec : entry.params) resolved.set(spec.name, spec.default_value);
  for (const auto& [name, value] : given.all()) resolved.set(name, value);
  return resolved;
}

inline ActiveMethod activate_method(Engine& engine, const std::string& plugin, const ParamValues& params) {
  ActiveMethod active;
  active.entry = plugin_registry().find(plugin);
  EXPECT_NE(active.entry, nullptr) << "plugin " << plugin << " not found";
  if (active.entry == nullptr) return active;
  auto handle = plugin_registry().create(plugin, params);
  EXPECT_TRUE(handle.ok()) << (handle.ok() ? "" : handle.message());
  if (!handle.ok()) return active;
  active.handle = std::move(*handle);
  auto loaded = prepare_method(*active.handle.get(), *active.entry, resolved_params(*active.entry, params), engine,
                               temp_path("artifacts"), active.overrides.get());
  EXPECT_TRUE(loaded.ok()) << (loaded.ok() ? "" : loaded.message());
  auto set = engine.set_method(active.handle.get(), active.entry->hooks, active.overrides.get(), plugin);
  EXPECT_TRUE(set.ok()) << (set.ok() ? "" : set.message());
  return active;
}

struct ForwardTrace {
  std::vector<float> logits;  // (prompt + decode steps, n_vocab)
  std::vector<int32_t> tokens;
};

// Prefill `prompt` in one call, then `decode_steps` single-token calls fed with
// `forced` tokens (teacher forcing) or, when empty, the greedy choice.
inline ForwardTrace run_trace(Engine& engine, Method* method, const std::vector<int32_t>& prompt, int decode_steps,
                              const std::vector<int32_t>& forced = {}) {
  ForwardTrace trace;
  auto seq = engine.new_sequence();
  if (method != nullptr) method->begin_sequence(engine.shape());
  const int64_t v = engine.config().n_vocab;
  auto sink = [&](int64_t, std::span<const float> l) { trace.logits.insert(trace.logits.end(), l.begin(), l.end()); };
  auto s = engine.forward(*seq, prompt, 0, sink);
  EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
  for (int step = 0; step < decode_steps && s.ok(); ++step) {
    const float* last = trace.logits.data() + trace.logits.size() - size_t(v);
    const int32_t next = forced.empty() ? int32_t(std::max_element(last, last + v) - last) : forced[size_t(step)];
    trace.tokens.push_back(next);
    s = engine.forward(*seq, std::vector<int32_t>{next}, 0, sink);
    EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
  }
  return trace;
}

struct DenseEquivalence {
  double max_error = 0;      // normalized max |method - dense| over all positions
  double top1_agreement = 0; // fraction of positions with the same argmax
  int64_t positions = 0;
};

// Runs `plugin` with `params` and the dense engine on the same prompts (random
// tokens), prefill plus greedy decode with dense's tokens forced on both.
inline DenseEquivalence compare_with_dense(std::shared_ptr<const Model> model, const std::string& plugin,
                                           const ParamValues& params, int prompt_tokens = 40,
                                           int decode_steps = 12, int32_t page_size = 4) {
  DenseEquivalence result;
  auto engine = Engine::create(model, EngineOptions{page_size, 0, 0});
  EXPECT_TRUE(engine.ok());
  if (!engine.ok()) return result;
  const int64_t v = model->config().n_vocab;
  int64_t agree = 0;
  for (uint64_t seed : {1u, 2u}) {
    const auto prompt = random_tokens(int32_t(v), prompt_tokens, seed);
    (void)(*engine)->set_method(nullptr, 0);
    const ForwardTrace dense = run_trace(**engine, nullptr, prompt, decode_steps);
    ActiveMethod active = activate_method(**engine, plugin, params);
    if (active.handle.get() == nullptr) return result;
    const ForwardTrace got = run_trace(**engine, active.handle.get(), prompt, decode_steps, dense.tokens);
    (void)(*engine)->set_method(nullptr, 0);
    result.max_error = std::max(result.max_error, normalized_max_error(got.logits, dense.logits));
    for (size_t r = 0; r * size_t(v) < dense.logits.size() && r * size_t(v) < got.logits.size(); ++r) {
      const float* a = dense.logits.data() + r * size_t(v);
      const float* b = got.logits.data() + r * size_t(v);
      agree += (std::max_element(a, a + v) - a) == (std::max_element(b, b + v) - b);
      ++result.positions;
    }
  }
  result.top1_agreement = result.positions > 0 ? double(agree) / double(result.positions) : 0.0;
  return result;
}

// The check itself: logits within 1e-5 (normalized) of dense at every position.
#define EXPECT_DENSE_EQUIVALENT(model, plugin, params)                                              \
  do {                                                                                             \
    const auto dense_eq = ::inferlab::test::compare_with_dense((model), (plugin), (params));       \
    EXPECT_GT(dense_eq.positions, 0);                                                              \
    EXPECT_LT(dense_eq.max_error, 1e-5) << "plugin " << (plugin) << " diverges from dense";        \
    EXPECT_EQ(dense_eq.top1_agreement, 1.0);                                                       \
  } while (0)

}  // namespace inferlab::test
