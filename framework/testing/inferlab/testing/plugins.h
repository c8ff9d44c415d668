// Plugin test helpers of the author's kit (inferlab/testing.h): a registry
// holding the built plugins (the host's plugin folder and the test-only
// plugins), methods made and installed on an engine, traces of logits, and the
// dense-equivalence check every plugin test can call: configured to keep
// everything, a method must reproduce dense logits.
#pragma once

#include <gtest/gtest.h>

#include <cstdlib>
#include <iostream>
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

// Batch invariance: three sequences (prompts of 40, 23 and 31 random
// tokens; the logits of each prompt's last row, then of each decode step)
// run alone, one after another, and the same through
// Engine::forward_batch as a continuous batch would run them: the first two
// prefilled together, the third joining (its prefill beside their decode
// steps), then decode steps of all three, every sequence fed the tokens its
// alone run chose greedily. Logits are compared per sequence and position.
struct BatchInvariance {
  double max_error = 0;          // normalized max |batched - alone| per row, the largest
  int64_t positions = 0;
  int64_t top1_differences = 0;  // rows whose argmax differs
  int64_t near_ties = 0;         // ... of them, rows whose alone top-2 margin is below 1e-4 of the row's scale
  int64_t batched_calls = 0;     // calls that ran several sequences' rows together
  int64_t batch_fallbacks = 0;   // batches whose sequences ran one by one
};

inline BatchInvariance compare_batched(std::shared_ptr<const Model> model, const std::string& plugin,
                                       const ParamValues& params, int decode_steps = 6, int32_t page_size = 4) {
  BatchInvariance result;
  auto engine = Engine::create(model, EngineOptions{page_size, 0, 0});
  EXPECT_TRUE(engine.ok());
  if (!engine.ok()) return result;
  Engine& e = **engine;
  const int64_t v = model->config().n_vocab;
  ActiveMethod active = activate_method(e, plugin, params);
  if (active.handle.get() == nullptr) return result;
  const std::vector<int> lengths = {40, 23, 31};
  std::vector<std::vector<int32_t>> prompts;
  std::vector<ForwardTrace> alone;
  for (size_t i = 0; i < lengths.size(); ++i) {
    prompts.push_back(random_tokens(int32_t(v), lengths[i], 11 + i));
    ForwardTrace t;  // the prompt's last row, then greedy decode steps (a method may prune prompt rows)
    auto seq = e.new_sequence();
    auto sink = [&](int64_t, std::span<const float> l) { t.logits.insert(t.logits.end(), l.begin(), l.end()); };
    auto s = e.forward(*seq, prompts[i], lengths[i] - 1, sink);
    for (int step = 0; step < decode_steps && s.ok(); ++step) {
      const float* last = t.logits.data() + t.logits.size() - size_t(v);
      t.tokens.push_back(int32_t(std::max_element(last, last + v) - last));
      s = e.forward(*seq, std::vector<int32_t>{t.tokens.back()}, 0, sink);
    }
    EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
    alone.push_back(std::move(t));
  }
  e.reset_counters();
  const size_t n = lengths.size();
  std::vector<std::unique_ptr<KvSequence>> seqs;
  std::vector<std::vector<float>> got(n);
  std::vector<int> fed(n, -1);  // -1: not started; else decode steps fed
  std::vector<std::vector<int32_t>> tokens(n);
  for (size_t i = 0; i < n; ++i) seqs.push_back(e.new_sequence());
  for (int step = 0; step <= decode_steps + 1; ++step) {
    std::vector<Engine::BatchItem> items;
    for (size_t i = 0; i < n; ++i) {
      if (i == 2 && step == 0) continue;  // the third joins a step later
      if (fed[i] >= decode_steps) continue;
      if (fed[i] < 0) tokens[i] = prompts[i];
      else tokens[i] = {alone[i].tokens[size_t(fed[i])]};
      ++fed[i];
      auto* out = &got[i];
      items.push_back({seqs[i].get(), tokens[i], int64_t(tokens[i].size()) - 1,
                       [out](int64_t, std::span<const float> l) { out->insert(out->end(), l.begin(), l.end()); }});
    }
    if (items.empty()) break;
    auto s = e.forward_batch(items);
    EXPECT_TRUE(s.ok()) << (s.ok() ? "" : s.message());
    if (!s.ok()) return result;
  }
  result.batched_calls = e.counters().batched_calls;
  result.batch_fallbacks = e.counters().batch_fallbacks;
  (void)e.set_method(nullptr, 0);
  for (size_t i = 0; i < n; ++i) {
    EXPECT_EQ(got[i].size(), alone[i].logits.size()) << "sequence " << i;
    for (size_t r = 0; (r + 1) * size_t(v) <= std::min(got[i].size(), alone[i].logits.size()); ++r) {
      const float* a = alone[i].logits.data() + r * size_t(v);
      const float* b = got[i].data() + r * size_t(v);
      result.max_error = std::max(result.max_error, normalized_max_error(std::span(b, size_t(v)), std::span(a, size_t(v))));
      ++result.positions;
      const auto ta = std::max_element(a, a + v) - a, tb = std::max_element(b, b + v) - b;
      if (ta == tb) continue;
      ++result.top1_differences;
      float scale = 0;
      for (int64_t j = 0; j < v; ++j) scale = std::max(scale, std::abs(a[j]));
      if (std::abs(a[ta] - a[tb]) < 1e-4f * scale) ++result.near_ties;
    }
  }
  return result;
}

// The check: every row within 1e-4 (normalized) of the alone run's, and the
// same greedy choice except at near-ties (reported).
#define EXPECT_BATCH_INVARIANT(model, plugin, params)                                                            \
  do {                                                                                                           \
    const auto batch_inv = ::inferlab::test::compare_batched((model), (plugin), (params));                       \
    EXPECT_GT(batch_inv.positions, 0);                                                                           \
    EXPECT_LT(batch_inv.max_error, 1e-4) << "plugin " << (plugin) << " differs inside a batch";                  \
    EXPECT_EQ(batch_inv.top1_differences, batch_inv.near_ties) << "plugin " << (plugin);                         \
    if (batch_inv.near_ties > 0) std::cout << "[ batch    ] near-ties: " << batch_inv.near_ties << "\n";          \
    std::cout << "[ batch    ] " << (plugin) << ": max error " << batch_inv.max_error << ", batched calls "     \
              << batch_inv.batched_calls << ", fallbacks " << batch_inv.batch_fallbacks << "\n";                 \
  } while (0)

}  // namespace inferlab::test
