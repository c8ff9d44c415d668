// The KV-cache methods on the CUDA backend at a long context, on a synthetic
// model of a real shape (random weights made on the GPU): per decode step, the
// whole-step time and the attention kernels' time against dense (for Quest
// including the kernels that refresh page bounds and select pages), the keys
// read, and the resident KV pages (Quest's page bounds add 1/page_size to them). One dense prefill of the context; every method
// decodes from a device copy of it. Prints a markdown table; under it, for the
// rows that exit by confidence, the exit checks, layers run, exits and graph
// replays per decode step.
//   bench_cuda_kv_methods [--preset llama2-7b-128k] [--context 32768] [--steps 16] [--only spatten]
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <random>

#include "engine/engine.h"
#include "model/synthetic_model.h"
#include "bench_support.h"

using namespace inferlab;

namespace {

using bench::Clock;
using bench::Setting;
using bench::since;

std::vector<Setting> settings() {
  const auto p = bench::params;
  std::vector<Setting> out{{"dense", "dense", {}}};
  for (int64_t budget : {256, 512, 1024, 2048, 4096})
    out.push_back({"quest", fmt::format("quest budget {}", budget), p({{"token_budget", budget}})});
  out.push_back({"streamingllm", "streamingllm 4+2044", p({{"sink_tokens", int64_t{4}}, {"window", int64_t{2044}}})});
  out.push_back({"h2o", "h2o 1024+1024", p({{"heavy", int64_t{1024}}, {"recent", int64_t{1024}}})});
  // SpAtten's cascade (keep 0.3 in the last third), tokens, then + heads (0.75), then + values (0.3). Its
  // progressive quantization is not here: its bit-plane pages cannot start from the dense device prefill
  // (clone converts formats between host pools only).
  out.push_back({"spatten", "spatten tokens", p({{"prune_heads", false}, {"prune_values", false}})});
  out.push_back({"spatten", "spatten tokens + heads", p({{"prune_values", false}})});
  out.push_back({"spatten", "spatten tokens + heads + values", p({})});
  // SkipDecode at a fixed budget (max = min exit: the decay is over by then), warm-up 1 + top layers:
  // a plan-only method, so decode steps keep graph replays; 2x and 4x of the 7B shape's 32 layers.
  for (int64_t layers : {16, 8})
    out.push_back({"skipdecode", fmt::format("skipdecode {} layers", layers),
                   p({{"max_exit", layers}, {"min_exit", layers}, {"warmup_layers", int64_t{1}}})});
  // CALM on random weights, where no confidence means anything, so the thresholds force a known behaviour (tau 0:
  // the threshold is lambda at every position). lambda 1 never exits (no margin or cosine exceeds 1): the cost of
  // the checks alone after layers k, 2k, ... (softmax: output norm + LM head + top-2 per check; state: a cosine),
  // one float back per check, so no graph replays. lambda 1e-30 is under every softmax margin (but a tie of the
  // top two logits): one check after layer 16, then the 16 layers above skipped, their K/V from the exit state.
  const auto calm = [&](const std::string& measure, double lambda, int64_t every) {
    return p({{"measure", measure}, {"lambda", lambda}, {"tau", 0.0}, {"first_exit", every}, {"interval", every}});
  };
  for (int64_t every : {4, 8, 16})
    out.push_back({"calm", fmt::format("calm softmax every {} layers, no exit", every), calm("softmax", 1.0, every)});
  out.push_back({"calm", "calm state every 4 layers, no exit", calm("state", 1.0, 4)});
  out.push_back({"calm", "calm softmax exit after layer 16", calm("softmax", 1e-30, 16)});
  return out;
}

struct StepTimes {
  double step_ms = 0, attention_ms = 0, keys_per_head = 0;
  // Early exit by confidence, per decode step: confidences computed, layers run; steps that exited, graph replays.
  double checks = 0, layers_run = 0;
  int64_t exits = 0, replays = 0;
};

// `steps` decode steps of `seq`; attention timed when the engine is told to.
Result<StepTimes> decode_steps(Engine& e, KvSequence& seq, int32_t steps) {
  e.reset_counters();
  const auto t0 = Clock::now();
  for (int32_t i = 0; i < steps; ++i)
    if (auto r = e.forward(seq, std::vector<int32_t>{2 + i % 100}, 0, [](int64_t, std::span<const float>) {}); !r)
      return r.error();
  StepTimes t;
  t.step_ms = since(t0) * 1e3 / steps;
  t.attention_ms = e.counters().attention_seconds * 1e3 / steps;
  t.keys_per_head = double(e.counters().decode_keys_read) / (double(e.config().n_layers) * e.config().n_kv_heads * steps);
  t.checks = double(e.counters().exit_checks) / steps;
  t.layers_run = double(e.counters().decode_layers_run) / steps;
  for (const int64_t n : e.counters().exits_after_layer) t.exits += n;
  t.replays = e.counters().graph_replays;
  return t;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"KV-cache methods on the CUDA backend: decode step and attention time vs dense"};
  std::string preset = "llama2-7b-128k";
  int32_t context = 32768, steps = 16, chunk = 8192;
  app.add_option("--preset", preset)->capture_default_str();
  app.add_option("--context", context)->capture_default_str();
  app.add_option("--steps", steps)->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--chunk", chunk, "tokens per prefill call")->capture_default_str();
  std::string only;
  app.add_option("--only", only,
                 "run dense and the settings whose label contains this text (the spatten, skipdecode and calm rows "
                 "run only so)");
  CLI11_PARSE(app, argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row reaches a log as it is measured (a capped run keeps them)

  auto spec = synthetic_preset(preset);
  if (!spec) return fmt::print(stderr, "bench: {}\n", spec.message()), 1;
  EngineOptions options;
  options.backend = BackendKind::Cuda;
  options.max_context = context + 2 * steps + 2;
  auto made = Engine::create_random(synthetic_config(*spec), 1, options);
  if (!made) return fmt::print(stderr, "bench: {}\n", made.message()), 1;
  Engine& e = **made;
  PluginRegistry registry;
  if (auto s = registry.scan(PluginRegistry::default_search_path()); !s)
    return fmt::print(stderr, "bench: {}\n", s.message()), 1;

  std::mt19937 rng(7);
  const std::vector<int32_t> prompt = bench::random_tokens(rng, e, context);
  auto base = e.new_sequence();
  if (auto s = bench::prefill_chunked(e, *base, prompt, chunk); !s)
    return fmt::print(stderr, "bench: prefill: {}\n", s.message()), 1;
  fmt::print("# {} at context {}, {}; {} decode steps per setting\n\n", spec->name, context, e.device_description(),
             steps);
  fmt::print("| method | ms/step | speed-up vs dense | attention ms/step | attention speed-up vs dense | keys read/step/head "
             "| KV MiB resident |\n");
  fmt::print("|---|---:|---:|---:|---:|---:|---:|\n");
  StepTimes dense;
  std::vector<std::string> exit_notes;  // under the table
  for (const Setting& s : settings()) {
    // Without --only: the rows the GPU validation's bench-kv step times under its cap.
    if (s.plugin != "dense" && (only.empty() ? s.plugin == "spatten" || s.plugin == "skipdecode" || s.plugin == "calm"
                                             : s.label.find(only) == std::string::npos))
      continue;
    auto active = bench::start_setting(registry, e, s, *base);
    if (!active) return fmt::print(stderr, "bench: {}\n", active.message()), 1;
    KvSequence* seq = active->seq.get();
    e.set_time_attention(false);
    auto whole = decode_steps(e, *seq, steps);
    e.set_time_attention(true);
    auto timed = decode_steps(e, *seq, steps);
    e.set_time_attention(false);
    if (!whole || !timed) return fmt::print(stderr, "bench: {}\n", (whole ? timed : whole).message()), 1;
    StepTimes t = *whole;
    t.attention_ms = timed->attention_ms;
    if (s.plugin == "dense") dense = t;
    fmt::print("| {} | {:.2f} | {:.2f}× | {:.3f} | {:.2f}× | {:.0f} | {:.0f} |\n", s.label, t.step_ms,
               dense.step_ms / t.step_ms, t.attention_ms, dense.attention_ms / t.attention_ms, t.keys_per_head,
               double(seq->pages_held() * e.pool().page_bytes()) / (1 << 20));
    if (t.checks > 0 || t.exits > 0)
      exit_notes.push_back(fmt::format("- {}: {:.1f} exit checks/step, {:.1f} layers run/step, {} of {} steps exited, "
                                       "{} graph replays",
                                       s.label, t.checks, t.layers_run, t.exits, steps, t.replays));
    (void)e.set_method(nullptr, 0);
  }
  if (!exit_notes.empty()) fmt::print("\n{}\n", fmt::join(exit_notes, "\n"));
  return 0;
}
