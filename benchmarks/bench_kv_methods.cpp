// Decode-step time of the KV-cache methods against dense on the CPU backend:
// one dense prefill per context length, then each method decodes from a copy of
// it. Prints the median per-step time (after --warmup untimed steps; the
// 10th-90th percentile range beside it), the keys attention read per step and
// KV head, and the resident KV memory, as a markdown table.
//   bench_kv_methods [--model smollm2-135m] [--contexts 2048,8000] [--steps 32]
//                    [--warmup 4] [--only quest] [--streaming 1024,2048,4096]
// --streaming adds StreamingLLM's speed comparison (Xiao et al. 2024, Table/Fig.
// "up to 22.2x"): per-token latency of StreamingLLM (4 sinks + window, the cache
// held at L tokens, evicting and re-rotating as tokens arrive) against a sliding
// window with re-computation (each new token re-prefills the last L tokens from
// an empty cache, then decodes), at cache sizes L, in one run.
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <chrono>
#include <random>

#include "engine/device.h"
#include "engine/engine.h"
#include "bench_support.h"

using namespace inferlab;

namespace {
using bench::Clock;
using bench::Setting;
using bench::since;

std::vector<Setting> settings() {
  const auto p = bench::params;
  return {{"dense", "dense", {}},
          {"quest", "quest budget 256", p({{"token_budget", int64_t{256}}})},
          {"quest", "quest budget 1024", p({{"token_budget", int64_t{1024}}})},
          {"streamingllm", "streamingllm 4+508", p({{"sink_tokens", int64_t{4}}, {"window", int64_t{508}}})},
          {"h2o", "h2o 256+256", p({{"heavy", int64_t{256}}, {"recent", int64_t{256}}})},
          {"spatten", "spatten tokens (keep_min 0.3)", p({{"prune_heads", false}, {"prune_values", false}})},
          {"spatten", "spatten tokens + heads (0.3, 0.75)", p({{"prune_values", false}})},
          {"spatten", "spatten tokens + heads + values (0.3, 0.75, 0.3)", p({})},
          {"spatten", "spatten quantization 6+4 (threshold 0.05)",
           p({{"prune_tokens", false}, {"prune_heads", false}, {"prune_values", false}, {"quantize", true}})},
          {"spatten", "spatten tokens + heads + values + quantization", p({{"quantize", true}})}};
}
}  // namespace

int main(int argc, char** argv) {
  select_blas_kernels(argv);
  CLI::App app{"KV-cache methods: decode step time vs dense"};
  std::string model_name = "smollm2-135m";
  std::vector<int32_t> contexts{2048, 8000};
  int32_t steps = 32, warmup = 4, threads = 0;
  std::string only;
  app.add_option("-m,--model", model_name);
  app.add_option("--contexts", contexts)->delimiter(',');
  app.add_option("--steps", steps, "timed decode steps per method")->check(CLI::PositiveNumber);
  app.add_option("--warmup", warmup, "untimed decode steps before them")->check(CLI::NonNegativeNumber);
  app.add_option("--only", only, "run dense and the settings whose label contains this text");
  app.add_option("-t,--threads", threads);
  std::vector<int32_t> streaming;
  app.add_option("--streaming", streaming, "cache sizes for StreamingLLM vs sliding window with re-computation")
      ->delimiter(',');
  CLI11_PARSE(app, argc, argv);

  auto path = resolve_model(model_name);
  if (!path) return fmt::print(stderr, "bench: {}\n", path.message()), 1;
  auto model = Model::load(*path);
  if (!model) return fmt::print(stderr, "bench: {}\n", model.message()), 1;
  auto engine = Engine::create(*model, EngineOptions{.n_threads = threads});
  if (!engine) return fmt::print(stderr, "bench: {}\n", engine.message()), 1;
  Engine& e = **engine;
  PluginRegistry registry;
  if (auto s = registry.scan(PluginRegistry::default_search_path()); !s) return fmt::print(stderr, "bench: {}\n", s.message()), 1;

  fmt::print("model: {}, cpu: {}, BLAS core: {}, threads: {}, decode steps: {}\n\n", path->filename().string(),
             cpu_description(), blas_core_name(), threads > 0 ? fmt::to_string(threads) : "all", steps);
  fmt::print("| context | method | ms/step (median) | p10–p90 | × dense | keys read/step/head | KV MiB resident |\n");
  fmt::print("|---:|---|---:|---:|---:|---:|---:|\n");
  std::mt19937 rng(7);
  for (int32_t ctx : contexts) {
    const std::vector<int32_t> prompt = bench::random_tokens(rng, e, ctx);
    (void)e.set_method(nullptr, 0);
    auto base = e.new_sequence();
    if (auto r = e.prefill(*base, prompt); !r) return fmt::print(stderr, "bench: {}\n", r.message()), 1;
    double dense_ms = 0;
    for (const Setting& s : settings()) {
      if (s.plugin != "dense" && s.label.find(only) == std::string::npos) continue;
      auto active = bench::start_setting(registry, e, s, *base);
      if (!active) return fmt::print(stderr, "bench: {}\n", active.message()), 1;
      KvSequence* seq = active->seq.get();
      for (int32_t i = 0; i < warmup; ++i)
        if (auto r = e.decode(*seq, 2 + i % 100); !r) return fmt::print(stderr, "bench: {}\n", r.message()), 1;
      e.reset_counters();
      std::vector<double> step_ms;
      for (int32_t i = 0; i < steps; ++i) {
        const auto t0 = Clock::now();
        if (auto r = e.decode(*seq, 2 + (warmup + i) % 100); !r)
          return fmt::print(stderr, "bench: {}\n", r.message()), 1;
        step_ms.push_back(since(t0) * 1e3);
      }
      std::sort(step_ms.begin(), step_ms.end());  // median (as bench::median) and percentiles from one sort
      const double ms = step_ms[step_ms.size() / 2], p10 = step_ms[step_ms.size() / 10],
                   p90 = step_ms[step_ms.size() * 9 / 10];
      if (s.plugin == "dense") dense_ms = ms;
      const double heads = double(e.config().n_layers) * e.config().n_kv_heads * steps;
      fmt::print("| {} | {} | {:.2f} | {:.1f}–{:.1f} | {:.2f}× | {:.0f} | {:.1f} |\n", ctx, s.label, ms, p10, p90,
                 dense_ms / ms, double(e.counters().decode_keys_read) / heads,
                 double(seq->pages_held() * e.pool().page_bytes()) / (1 << 20));
      (void)e.set_method(nullptr, 0);
    }
  }
  if (streaming.empty()) return 0;

  // StreamingLLM against the sliding window with re-computation, per token.
  fmt::print("\n| cache L | sliding window + re-computation ms/token | StreamingLLM ms/token | speedup |\n");
  fmt::print("|---:|---:|---:|---:|\n");
  for (int32_t cache : streaming) {
    const std::vector<int32_t> stream = bench::random_tokens(rng, e, int64_t(cache) + steps + 1);
    // Re-computation: token i is produced from the L tokens before it, prefilled afresh.
    (void)e.set_method(nullptr, 0);
    const auto t0 = Clock::now();
    for (int32_t i = 0; i < steps; ++i) {
      auto seq = e.new_sequence();
      const std::span<const int32_t> window(stream.data() + i, size_t(cache));
      if (auto r = e.prefill(*seq, window); !r) return fmt::print(stderr, "bench: {}\n", r.message()), 1;
    }
    const double recompute_ms = since(t0) * 1e3 / steps;
    // StreamingLLM: the cache holds L tokens; each step appends one and evicts one.
    auto base = e.new_sequence();
    if (auto r = e.prefill(*base, std::span<const int32_t>(stream.data(), size_t(cache))); !r)
      return fmt::print(stderr, "bench: {}\n", r.message()), 1;
    const Setting s{"streamingllm", "streamingllm",
                    bench::params({{"sink_tokens", int64_t{4}}, {"window", int64_t{cache - 4}}})};
    auto active = bench::start_setting(registry, e, s, *base);
    if (!active) return fmt::print(stderr, "bench: {}\n", active.message()), 1;
    const auto t1 = Clock::now();
    for (int32_t i = 0; i < steps; ++i)
      if (auto r = e.decode(*active->seq, stream[size_t(cache) + size_t(i)]); !r)
        return fmt::print(stderr, "bench: {}\n", r.message()), 1;
    const double streaming_ms = since(t1) * 1e3 / steps;
    (void)e.set_method(nullptr, 0);
    fmt::print("| {} | {:.1f} | {:.2f} | {:.1f}× |\n", cache, recompute_ms, streaming_ms, recompute_ms / streaming_ms);
  }
  return 0;
}
