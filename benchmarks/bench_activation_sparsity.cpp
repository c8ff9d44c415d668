// Decode speed of activation and contextual sparsity (TEAL, CATS, Deja Vu;
// issue 19) against dense on one backend, as ratios measured in one run: each
// method and sparsity (Deja Vu: neuron_keep = 1 - sparsity) is
// calibrated by its plugin, then dense and the method decode the same steps
// from copies of one prefill, alternating round by round, and the medians are
// compared. Also the sparsity the engine measured, and the weights plus the
// transposed copies the sparse projections read. Prints a markdown table.
//   bench_activation_sparsity --model smollm2-135m [--context 512] [--steps 32] [--rounds 5]
//                             [--sparsities 0.25,0.5,0.75,0.9] [--methods teal,cats,dejavu] [--corpus kjv]
//                             [--set calibration_samples=32 --set epochs=8 ...]  (numbers, for the plugins that have them)
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <cstdlib>
#include <random>

#include "bench_support.h"
#include "engine/device.h"
#include "experiment/calibration.h"
#include "model/model.h"

using namespace inferlab;

namespace {

using bench::Clock;
using bench::since;

// Milliseconds per step of `steps` decode steps from a copy of `base`.
Result<double> decode_ms(Engine& e, const KvSequence& base, int32_t steps) {
  auto seq = base.clone(e.shared_pool());
  const auto t0 = Clock::now();
  for (int32_t i = 0; i < steps; ++i)
    if (auto s = e.forward(*seq, std::vector<int32_t>{100 + i}, 0, [](int64_t, std::span<const float>) {}); !s)
      return s.error();
  return since(t0) * 1e3 / steps;
}

}  // namespace

int main(int argc, char** argv) {
  select_blas_kernels(argv);
  CLI::App app{"Activation sparsity (TEAL, CATS): decode speed against dense, ratios from one run"};
  std::string model_name = "smollm2-135m", corpus = "kjv", backend = "cpu";
  std::vector<std::string> methods{"teal", "cats"};
  std::vector<double> sparsities{0.25, 0.5, 0.75, 0.9};
  int32_t context = 512, steps = 32, rounds = 5, threads = 0;
  app.add_option("-m,--model", model_name)->capture_default_str();
  app.add_option("--backend", backend, "cpu or cuda")->capture_default_str();
  app.add_option("--context", context, "tokens prefilled before the timed steps")->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--steps", steps, "decode steps per timing")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--rounds", rounds, "dense/method alternations; the medians are compared")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--sparsities", sparsities)->delimiter(',')->check(CLI::Range(0.0, 0.99));
  app.add_option("--methods", methods)->delimiter(',')->check(CLI::IsMember({"teal", "cats", "dejavu"}));
  std::vector<std::string> sets;
  app.add_option("--set", sets, "NAME=NUMBER for every method that has the parameter");
  app.add_option("--corpus", corpus, "calibration corpus (kjv, kv_retrieval or a text file)")->capture_default_str();
  app.add_option("-t,--threads", threads, "CPU threads (0: all)");
  CLI11_PARSE(app, argc, argv);

  auto path = resolve_model(model_name);
  if (!path) return fmt::print(stderr, "bench: {}\n", path.message()), 1;
  auto model = Model::load(*path);
  if (!model) return fmt::print(stderr, "bench: {}\n", model.message()), 1;
  EngineOptions options;
  options.n_threads = threads;
  auto kind = parse_backend(backend);
  if (!kind) return fmt::print(stderr, "bench: --backend: {}\n", kind.message()), 1;
  options.backend = *kind;
  auto made = Engine::create(*model, options);
  if (!made) return fmt::print(stderr, "bench: {}\n", made.message()), 1;
  Engine& e = **made;
  PluginRegistry registry;
  if (auto s = registry.scan(PluginRegistry::default_search_path()); !s)
    return fmt::print(stderr, "bench: {}\n", s.message()), 1;

  std::mt19937 rng(11);
  const std::vector<int32_t> prompt = bench::random_tokens(rng, e, context);
  auto base = e.new_sequence();
  if (auto s = e.forward(*base, prompt, int64_t(prompt.size()), {}); !s)
    return fmt::print(stderr, "bench: prefill: {}\n", s.message()), 1;
  const double dense_gib = double(e.weight_bytes()) / double(1ull << 30);
  fmt::print("# Activation sparsity: decode at context {}, {} ({}), {} steps x {} rounds, calibration corpus {}\n\n",
             context, model_name, e.device_description(), steps, rounds, corpus);
  fmt::print("| method | sparsity | measured | dense ms/step | method ms/step | speed × dense | weights GiB (dense {:.2f}) |\n",
             dense_gib);
  fmt::print("|---|---:|---:|---:|---:|---:|---:|\n");
  for (const std::string& name : methods)
    for (const double sparsity : sparsities) {
      const PluginEntry* entry = registry.find(name);
      if (entry == nullptr) return fmt::print(stderr, "bench: plugin {} not found\n", name), 1;
      ParamValues params;
      for (const ParamSpec& spec : entry->params) params.set(spec.name, spec.default_value);
      params.set(name == "dejavu" ? "neuron_keep" : "sparsity", name == "dejavu" ? 1.0 - sparsity : sparsity);
      params.set("corpus", corpus);
      for (const std::string& kv : sets) {
        const size_t eq = kv.find('=');
        if (eq == std::string::npos) return fmt::print(stderr, "bench: --set {}: expected NAME=NUMBER\n", kv), 1;
        const std::string key = kv.substr(0, eq);
        for (const ParamSpec& spec : entry->params) {
          if (spec.name != key) continue;
          char* end = nullptr;
          const std::string text = kv.substr(eq + 1);
          const double v = std::strtod(text.c_str(), &end);
          if (text.empty() || *end != '\0') return fmt::print(stderr, "bench: --set {}: not a number\n", kv), 1;
          if (spec.type == ParamType::Int) params.set(key, int64_t(v));
          else params.set(key, v);
        }
      }
      auto handle = registry.create(name, params);
      if (!handle) return fmt::print(stderr, "bench: {}\n", handle.message()), 1;
      WeightOverrides overrides;
      if (auto s = prepare_method(*handle->get(), *entry, params, e, {}, &overrides); !s)
        return fmt::print(stderr, "bench: {} {}: {}\n", name, sparsity, s.message()), 1;
      std::vector<double> dense_ms, method_ms;
      double measured = 0;
      for (int32_t r = 0; r < rounds; ++r) {
        if (auto s = e.set_method(nullptr, 0); !s) return fmt::print(stderr, "bench: {}\n", s.message()), 1;
        auto d = decode_ms(e, *base, steps);
        if (auto s = e.set_method(handle->get(), entry->hooks, &overrides, name); !s)
          return fmt::print(stderr, "bench: {}\n", s.message()), 1;
        e.reset_counters();
        auto m = decode_ms(e, *base, steps);
        if (!d || !m) return fmt::print(stderr, "bench: {}\n", (d ? m : d).message()), 1;
        dense_ms.push_back(*d);
        method_ms.push_back(*m);
        const auto counters = e.counters().as_map();
        if (auto it = counters.find("activation_sparsity"); it != counters.end()) measured = it->second;
        const ModelConfig& c = e.config();
        if (const double steps_run = counters.at("decode_steps"); name == "dejavu" && steps_run > 0)
          measured = counters.at("neurons_skipped") / (steps_run * c.n_layers * c.n_ff);  // neurons not computed
      }
      const double gib = double(e.weight_bytes()) / double(1ull << 30);
      (void)e.set_method(nullptr, 0);
      const double d = bench::median(dense_ms), m = bench::median(method_ms);
      fmt::print("| {} | {:.2f} | {:.3f} | {:.2f} | {:.2f} | {:.2f}× | {:.2f} |\n", name, sparsity, measured, d, m,
                 d / m, gib);
    }
  return 0;
}
