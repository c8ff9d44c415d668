// Shared by the benchmarks that run KV-cache methods against dense: timing,
// the settings they compare, and starting a method on a copy of a prefill.
#pragma once

#include <algorithm>
#include <chrono>
#include <initializer_list>
#include <map>
#include <memory>
#include <random>
#include <span>
#include <string>
#include <utility>
#include <vector>

#include "engine/engine.h"
#include "plugins/method_context.h"
#include "plugins/plugin_host.h"

namespace inferlab::bench {

using Clock = std::chrono::steady_clock;
inline double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

// `n` tokens drawn uniformly from the engine's vocabulary by rng.
inline std::vector<int32_t> random_tokens(std::mt19937& rng, const Engine& e, int64_t n) {
  std::vector<int32_t> tokens(static_cast<size_t>(n));
  for (auto& t : tokens) t = int32_t(rng() % uint32_t(e.config().n_vocab));
  return tokens;
}

// The prompt into `seq`, `chunk` tokens a call, no logits.
inline Status prefill_chunked(Engine& e, KvSequence& seq, std::span<const int32_t> prompt, int64_t chunk) {
  for (size_t at = 0; at < prompt.size(); at += size_t(chunk)) {
    const size_t len = std::min(prompt.size() - at, size_t(chunk));
    if (auto s = e.forward(seq, prompt.subspan(at, len), int64_t(len), {}); !s) return s;
  }
  return ok_status();
}

// The weight bytes a decode step reads on the CUDA backend (16-bit
// matrices): all but the embedding table, of which it reads one row, unless
// the table is also the LM head.
inline double decode_weight_bytes(const Engine& e) {
  const ModelConfig& c = e.config();
  return double(e.weight_bytes()) - (c.tied_embeddings ? 0.0 : 2.0 * double(c.n_vocab) * double(c.n_embd));
}

// The median (upper middle for an even count); 0 for none.
inline double median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

inline ParamValues params(std::initializer_list<std::pair<const std::string, ParamValue>> values) {
  return ParamValues(std::map<std::string, ParamValue>(values));
}

struct Setting {
  std::string plugin, label;
  ParamValues params;
};

struct ActiveSetting {
  MethodHandle handle;
  std::unique_ptr<KvSequence> seq;
  std::unique_ptr<WeightOverrides> overrides = std::make_unique<WeightOverrides>();
};

// Creates and loads the setting's method, installs it on `engine` (dense: no
// method) and decodes one step from a copy of `base`: eviction methods trim the
// prefill to their budget there, and a decode graph is captured.
inline Result<ActiveSetting> start_setting(PluginRegistry& registry, Engine& engine, const Setting& setting,
                                           const KvSequence& base) {
  auto handle = registry.create(setting.plugin, setting.params);
  if (!handle) return handle.error();
  const PluginEntry* entry = registry.find(setting.plugin);
  auto overrides = std::make_unique<WeightOverrides>();
  if (auto s = load_method(*handle->get(), *entry, engine, {}, overrides.get()); !s) return s.error();
  ActiveSetting active{std::move(*handle), nullptr, std::move(overrides)};
  active.handle->begin_sequence(engine.shape());
  if (auto s = engine.set_method(setting.plugin == "dense" ? nullptr : active.handle.get(), entry->hooks,
                                 active.overrides.get(), setting.plugin);
      !s)
    return s.error();
  active.seq = base.clone(engine.shared_pool());  // in the method's page format (bit planes: rows converted)
  if (auto r = engine.decode(*active.seq, 1); !r) return r.error();
  return active;
}

}  // namespace inferlab::bench
