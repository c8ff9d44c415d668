// Prefill time of MInference's sparse patterns against dense prefill
// (MInference, Jiang et al. 2024: "1.78x at 100K, 9.9x at 1M tokens on an
// A100; slower than dense below ~10K"): one whole-prompt prefill per (context,
// setting), settings alternating within each repeat, the median reported, with
// the time spent estimating the indices and in attention shown apart, and the
// keys the sparse heads computed as a share of the causal keys.
//   bench_sparse_prefill [--model smollm2-135m | PATH.gguf] [--contexts 2048,4096,8192]
//                        [--repeats 3] [--reference-context 131072] [--backend cpu|cuda]
// A synthetic model of a real shape with random weights (made where the
// backend runs, so nothing is loaded), e.g. one layer of the Llama-3-8B-1M
// shape the paper timed, or the whole model:
//   bench_sparse_prefill --backend cuda --preset llama3-8b-1m --layers 1
//       --contexts 32768,65536,131072,262144 --reference-context 0 --repeats 1
// On the CPU, longer contexts on a long-context shape cut to a few layers:
//   bench_sparse_prefill --preset llama2-7b-128k --layers 2 --contexts 16384,32768 --repeats 1
// Prompts are random tokens: the budgets, not the text, fix how many keys a
// head computes (the estimated indices differ with the text).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <random>

#include "bench_support.h"
#include "engine/device.h"
#include "engine/engine.h"
#include "model/synthetic_model.h"

using namespace inferlab;

namespace {
using bench::median;

using bench::Clock;
using bench::Setting;
using bench::since;

struct Measure {
  std::vector<double> ms, attention_ms, plan_ms;
  double keys_read = 0, keys_causal = 0;
};


}  // namespace

int main(int argc, char** argv) {
  select_blas_kernels(argv);
  CLI::App app{"MInference sparse prefill vs dense prefill"};
  std::string model_name = "smollm2-135m", preset, backend = "cpu";
  std::vector<std::string> only;
  int32_t layers = 0;
  std::vector<int32_t> contexts{2048, 4096, 8192};
  int32_t repeats = 3, threads = 0;
  int64_t reference_context = 131072, vertical = 1000, slash = 6096, n_init = 128, n_local = 3968, top_k = 100;
  app.add_option("-m,--model", model_name, "model name or GGUF path");
  app.add_option("--preset", preset, "synthetic model of this shape with random weights, instead of --model")
      ->check(CLI::IsMember(synthetic_preset_names()));
  app.add_option("--layers", layers, "with --preset: the first N layers (0: all)")->check(CLI::NonNegativeNumber);
  app.add_option("--backend", backend)->check(CLI::IsMember({"cpu", "cuda"}));
  app.add_option("--settings", only, "of dense, vertical_and_slash, stream_llm, block_sparse (default: all)")
      ->delimiter(',')
      ->check(CLI::IsMember({"dense", "vertical_and_slash", "stream_llm", "block_sparse"}));
  app.add_option("--contexts", contexts)->delimiter(',');
  app.add_option("--repeats", repeats)->check(CLI::PositiveNumber);
  app.add_option("-t,--threads", threads);
  app.add_option("--reference-context", reference_context,
                 "budgets scale by context / this (the reference's budgets are for ~128K; 0: as written)");
  app.add_option("--vertical", vertical);
  app.add_option("--slash", slash);
  app.add_option("--n-init", n_init);
  app.add_option("--n-local", n_local);
  app.add_option("--block-top-k", top_k);
  CLI11_PARSE(app, argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row reaches a log as it is measured (a capped run keeps them)

  const int32_t max_context = *std::max_element(contexts.begin(), contexts.end());
  EngineOptions options{.max_context = max_context, .n_threads = threads, .time_attention = true};
  options.backend = backend == "cuda" ? BackendKind::Cuda : BackendKind::Cpu;
  Result<std::unique_ptr<Engine>> engine = Error{""};
  std::string model_label;
  if (!preset.empty()) {
    auto spec = synthetic_preset(preset, layers);
    if (!spec) return fmt::print(stderr, "bench: {}\n", spec.message()), 1;
    model_label = fmt::format("synthetic {} ({} layers, random weights)", preset, synthetic_config(*spec).n_layers);
    if (options.backend == BackendKind::Cuda) {
      engine = Engine::create_random(synthetic_config(*spec), 1, options);
    } else {  // the CPU backend loads weights: written once to a temporary file
      const auto file = std::filesystem::temp_directory_path() /
                        fmt::format("inferlab-bench-{}-{}layers.gguf", preset, synthetic_config(*spec).n_layers);
      if (auto st = write_synthetic_model(*spec, file); !st) return fmt::print(stderr, "bench: {}\n", st.message()), 1;
      auto model = Model::load(file);
      std::filesystem::remove(file);
      if (!model) return fmt::print(stderr, "bench: {}\n", model.message()), 1;
      engine = Engine::create(*model, options);
    }
  } else {
    auto path = resolve_model(model_name);
    if (!path) return fmt::print(stderr, "bench: {}\n", path.message()), 1;
    auto model = Model::load(*path);
    if (!model) return fmt::print(stderr, "bench: {}\n", model.message()), 1;
    engine = Engine::create(*model, options);
    model_label = path->filename().string();
  }
  if (!engine) return fmt::print(stderr, "bench: {}\n", engine.message()), 1;
  Engine& e = **engine;
  PluginRegistry registry;
  if (auto s = registry.scan(PluginRegistry::default_search_path()); !s)
    return fmt::print(stderr, "bench: {}\n", s.message()), 1;

  const auto p = bench::params;
  // Every head the same pattern: the search is not run here.
  const ParamValues common = p({{"reference_context", reference_context}, {"search", std::string("off")}});
  auto with = [&](std::initializer_list<std::pair<const std::string, ParamValue>> extra) {
    ParamValues v = common;
    for (const auto& [name, value] : extra) v.set(name, value);
    return v;
  };
  std::vector<Setting> settings = {
      {"dense", "dense", {}},
      {"minference", fmt::format("vertical_and_slash {}/{}", vertical, slash),
       with({{"default_pattern", std::string("vertical_and_slash")}, {"vertical", vertical}, {"slash", slash}})},
      {"minference", fmt::format("A-shape {}/{}", n_init, n_local),
       with({{"default_pattern", std::string("stream_llm")}, {"n_init", n_init}, {"n_local", n_local}})},
      {"minference", fmt::format("block_sparse top {}", top_k),
       with({{"default_pattern", std::string("block_sparse")}, {"block_top_k", top_k}})},
  };
  if (!only.empty()) {  // dense stays first: the ratios are against it
    const char* kinds[] = {"dense", "vertical_and_slash", "stream_llm", "block_sparse"};
    std::vector<Setting> kept{settings[0]};
    for (size_t i = 1; i < settings.size(); ++i)
      if (std::find(only.begin(), only.end(), kinds[i]) != only.end()) kept.push_back(settings[i]);
    settings = kept;
  }

  if (options.backend == BackendKind::Cuda)
    fmt::print("model: {}, backend: cuda, device: {}, repeats: {}, budgets {}\n\n", model_label, e.device_description(),
               repeats, reference_context > 0 ? fmt::format("scaled by context / {}", reference_context) : "as written");
  else
    fmt::print("model: {}, backend: cpu, cpu: {}, BLAS core: {}, threads: {}, repeats: {}, budgets {}\n\n", model_label,
               cpu_description(), blas_core_name(), threads > 0 ? fmt::to_string(threads) : "all", repeats,
               reference_context > 0 ? fmt::format("scaled by context / {}", reference_context) : "as written");
  fmt::print("| context | setting | prefill ms | × dense | attention ms | estimation ms | keys computed / causal |\n");
  fmt::print("|---:|---|---:|---:|---:|---:|---:|\n");
  std::mt19937 rng(11);
  for (const int32_t ctx : contexts) {
    const std::vector<int32_t> prompt = bench::random_tokens(rng, e, ctx);
    std::vector<Measure> m(settings.size());
    for (int32_t r = 0; r < repeats; ++r)
      for (size_t i = 0; i < settings.size(); ++i) {
        const Setting& s = settings[i];
        auto handle = registry.create(s.plugin, s.params);
        if (!handle) return fmt::print(stderr, "bench: {}\n", handle.message()), 1;
        const PluginEntry* entry = registry.find(s.plugin);
        auto overrides = std::make_unique<WeightOverrides>();
        if (auto st = load_method(*handle->get(), *entry, e, {}, overrides.get()); !st)
          return fmt::print(stderr, "bench: {}\n", st.message()), 1;
        (*handle)->begin_sequence(e.shape());
        if (auto st = e.set_method(s.plugin == "dense" ? nullptr : handle->get(), entry->hooks, overrides.get(),
                                   s.plugin);
            !st)
          return fmt::print(stderr, "bench: {}\n", st.message()), 1;
        e.reset_counters();
        auto seq = e.new_sequence();
        const auto t0 = Clock::now();
        if (auto st = e.forward(*seq, prompt, ctx - 1, [](int64_t, std::span<const float>) {}); !st)
          return fmt::print(stderr, "bench: {}\n", st.message()), 1;
        m[i].ms.push_back(since(t0) * 1e3);
        const auto counters = e.counters().as_map();
        m[i].attention_ms.push_back(counters.count("attention_ms") ? counters.at("attention_ms") : 0.0);
        m[i].plan_ms.push_back(counters.count("sparse_plan_ms") ? counters.at("sparse_plan_ms") : 0.0);
        m[i].keys_read = counters.at("sparse_prefill_keys_read");
        m[i].keys_causal = counters.at("sparse_prefill_keys_causal");
        (void)e.set_method(nullptr, 0);
      }
    const double dense_ms = median(m[0].ms);
    for (size_t i = 0; i < settings.size(); ++i) {
      const double ms = median(m[i].ms);
      fmt::print("| {} | {} | {:.0f} | {:.2f}× | {:.0f} | {:.0f} | {} |\n", ctx, settings[i].label, ms,
                 dense_ms / ms, median(m[i].attention_ms), median(m[i].plan_ms),
                 m[i].keys_causal > 0 ? fmt::format("{:.1f}%", 100.0 * m[i].keys_read / m[i].keys_causal) : "—");
    }
  }
  return 0;
}
