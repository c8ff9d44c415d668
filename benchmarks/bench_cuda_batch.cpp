// Decode throughput against batch size at a fixed KV memory budget on the CUDA
// backend, on a synthetic model of a real shape (random weights made on the
// GPU): dense, H2O, StreamingLLM and Quest. Weights are read once per step
// whatever the batch, KV bytes once per sequence, so tokens/s grows with the
// batch until KV traffic dominates; a method that keeps less KV fits more
// sequences in the budget.
//
// One dense prefill of the context. Per method: a copy of it decodes one step
// under the method (an eviction method trims it to its budget there), and is
// the template every row clones; a probe clone decodes as many steps as a row
// does, and its pages (KvSequence::pages_held, origin pages of re-rotated keys
// included; for Quest also the engine's key bounds of its pages, 1/page_size
// of them) give the bytes one sequence holds, hence the largest batch that
// fits: floor(budget / bytes per sequence). Per row: B clones of the template,
// one untimed Engine::forward_batch step (workspace, graph capture at B = 1),
// then `steps` timed steps, logits computed for every sequence. tokens/s =
// B * steps / time; "× dense" is against dense at its largest fitting batch.
//
// Rows run in two passes, printed as they finish: every method's largest
// fitting batch (the comparison at the budget: dense, then the others quickest
// first as their probes predict), then the requested batches that fit,
// smallest first. With --time-limit no row starts whose predicted time (per
// sequence and step: the probe's, then the method's largest batch's) would end
// past that many seconds from the start; those not run are listed under the
// table.
//   bench_cuda_batch [--preset llama2-7b-128k] [--context 4096] [--budget-gb 16] [--steps 8]
//                    [--batches 1,4,16,64] [--only h2o] [--time-limit 45] [--peak-gbs 0]
#include <CLI/CLI.hpp>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <new>
#include <random>

#include "cuda/device_info.cuh"
#include "engine/engine.h"
#include "model/synthetic_model.h"
#include "bench_support.h"

using namespace inferlab;

namespace {

using bench::Clock;
using bench::Setting;
using bench::since;

constexpr double kGB = 1e9;


struct MethodRow {
  Setting setting;
  bool by_default = true;  // false: runs only when --only names it
};

// H2O keeps heavy = recent = context / 8 (25% of the KV); StreamingLLM 4 sinks and a window of context / 4
// (at cache positions, as the paper: moved keys are re-rotated from saved originals, whose origin pages it holds
// too; the row at original positions holds none); Quest reads 1024 tokens per head and keeps every page.
std::vector<MethodRow> methods(int32_t context) {
  const auto p = bench::params;
  const int64_t heavy = std::max(1, context / 8), window = std::max(1, context / 4);
  return {
      {{"dense", "dense", {}}},
      {{"h2o", fmt::format("h2o {}+{}", heavy, heavy), p({{"heavy", heavy}, {"recent", heavy}})}},
      {{"streamingllm", fmt::format("streamingllm 4+{}", window),
        p({{"sink_tokens", int64_t{4}}, {"window", window}})}},
      {{"streamingllm", fmt::format("streamingllm 4+{} original positions", window),
        p({{"sink_tokens", int64_t{4}}, {"window", window}, {"positions", std::string("original")}})},
       false},
      {{"quest", "quest budget 1024", p({{"token_budget", int64_t{1024}}})}},
  };
}

// A method started on the engine: its template sequence, and what one sequence holds at the end of a row.
struct Prepared {
  Setting setting;
  bench::ActiveSetting active;
  // What one sequence holds after a row's steps: pages_held * page_bytes, and for a method that reads pages by key
  // bound (page_budget) the engine's bounds of those pages (a min and a max row each: 1/page_size of a page).
  double bound_fraction = 0;
  int64_t seq_bytes = 0, bound_bytes = 0;
  int32_t seq_tokens = 0;
  double pages_per_table = 0;
  int64_t max_batch = 0;
  // Seconds per sequence and decode step, to predict a row's time: the probe's single-sequence steps, then the
  // method's largest batch once it ran.
  double seq_step_s = 0;
};

struct RowResult {
  double ms_step = 0, tokens_s = 0, kv_held_gb = 0, kv_read_gb = 0;
  int64_t batched_calls = 0, fallbacks = 0, replays = 0;
};

const LogitsSink kDiscard = [](int64_t, std::span<const float>) {};

Status install(PluginRegistry& registry, Engine& e, Prepared& m) {
  const PluginEntry* entry = registry.find(m.setting.plugin);
  if (entry == nullptr) return Error{fmt::format("no plugin {}", m.setting.plugin)};
  return e.set_method(m.setting.plugin == "dense" ? nullptr : m.active.handle.get(), entry->hooks,
                      m.active.overrides.get(), m.setting.plugin);
}

// `batch` clones of `tmpl`: one untimed step, then `steps` timed steps of forward_batch over all of them.
Result<RowResult> run_row(Engine& e, const KvSequence& tmpl, int32_t batch, int32_t steps, double bound_fraction) {
  std::vector<std::unique_ptr<KvSequence>> seqs;
  try {
    for (int32_t b = 0; b < batch; ++b) seqs.push_back(tmpl.clone());
  } catch (const std::bad_alloc&) {
    return Error{fmt::format("out of GPU memory for the KV pages of sequence {} of {}", seqs.size() + 1, batch)};
  }
  std::vector<int32_t> tokens(static_cast<size_t>(batch));
  std::vector<Engine::BatchItem> items(static_cast<size_t>(batch));
  const auto step = [&](int32_t i) {
    for (size_t b = 0; b < items.size(); ++b) {
      tokens[b] = 2 + int32_t((size_t(i) + b) % 100);
      items[b] = {seqs[b].get(), std::span<const int32_t>(&tokens[b], 1), 0, kDiscard};
    }
    return e.forward_batch(items);  // the engine's end_call waits for the GPU
  };
  if (auto s = step(0); !s) return s.error();
  e.reset_counters();
  const auto t0 = Clock::now();
  for (int32_t i = 1; i <= steps; ++i)
    if (auto s = step(i); !s) return s.error();
  const double seconds = since(t0);
  RowResult r;
  r.ms_step = seconds * 1e3 / steps;
  r.tokens_s = double(batch) * steps / seconds;
  int64_t held = 0;
  for (const auto& s : seqs) held += s->pages_held() * s->pool().page_bytes();
  r.kv_held_gb = double(held) * (1 + bound_fraction) / kGB;
  r.kv_read_gb = double(e.counters().decode_kv_bytes_read) / steps / kGB;
  r.batched_calls = e.counters().batched_calls;
  r.fallbacks = e.counters().batch_fallbacks;
  r.replays = e.counters().graph_replays;
  return r;
}

}  // namespace

int main(int argc, char** argv) {
  const auto started = Clock::now();
  CLI::App app{"Decode throughput vs batch size at a fixed KV memory budget on the CUDA backend: dense, H2O, "
               "StreamingLLM, Quest"};
  std::string preset = "llama2-7b-128k";
  int32_t context = 4096, steps = 8, chunk = 8192;
  double budget_gb = 16, time_limit = 0, peak_gbs = 0;
  std::vector<int32_t> batches = {1, 4, 16, 64};
  std::string only;
  app.add_option("--preset", preset)->capture_default_str();
  app.add_option("--context", context, "prompt tokens per sequence")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--budget-gb", budget_gb, "KV memory of the whole batch, GB (1e9 bytes)")
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--steps", steps, "timed decode steps per row")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--batches", batches, "batch sizes (those that fit the budget run, and the largest that fits)")
      ->delimiter(',')
      ->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--chunk", chunk, "tokens per prefill call")->check(CLI::PositiveNumber)->capture_default_str();
  bool no_graphs = false;
  app.add_flag("--no-graphs", no_graphs,
               "run every decode step eagerly (by default a batch of replayable one-token steps is a CUDA graph)");
  app.add_option("--only", only,
                 "run the rows whose label (\"<setting>, batch <B>\") contains this text, and dense at its largest "
                 "batch (the reference); the streamingllm row at original positions runs only so");
  app.add_option("--peak-gbs", peak_gbs, "memory bandwidth the achieved GB/s are compared with (0: from the device)")
      ->check(CLI::NonNegativeNumber);
  app.add_option("--time-limit", time_limit,
                 "seconds from the start: no row starts whose time, predicted from the method's steps so far, would "
                 "end past it (0: no limit)")
      ->check(CLI::NonNegativeNumber)
      ->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row reaches a log as it is measured (a capped run keeps them)

  auto spec = synthetic_preset(preset);
  if (!spec) return fmt::print(stderr, "bench: {}\n", spec.message()), 1;
  EngineOptions options;
  options.backend = BackendKind::Cuda;
  options.cuda_graphs = !no_graphs;
  options.max_context = context + steps + 8;  // prefill, the template's step, the untimed and timed steps
  auto made = Engine::create_random(synthetic_config(*spec), 1, options);
  if (!made) return fmt::print(stderr, "bench: {}\n", made.message()), 1;
  Engine& e = **made;
  if (peak_gbs <= 0) peak_gbs = kernels::cuda::device_peak_gbs(0);
  PluginRegistry registry;
  if (auto s = registry.scan(PluginRegistry::default_search_path()); !s)
    return fmt::print(stderr, "bench: {}\n", s.message()), 1;

  std::mt19937 rng(7);
  const std::vector<int32_t> prompt = bench::random_tokens(rng, e, context);
  auto base = e.new_sequence();
  const auto prefill_t0 = Clock::now();
  if (auto s = bench::prefill_chunked(e, *base, prompt, chunk); !s)
    return fmt::print(stderr, "bench: prefill: {}\n", s.message()), 1;
  const double prefill_s = since(prefill_t0);

  // Each method's template and its bytes per sequence.
  const int64_t budget = int64_t(budget_gb * kGB);
  const int64_t tables = int64_t(e.config().n_layers) * e.config().n_kv_heads;
  std::vector<Prepared> prepared;
  for (const MethodRow& m : methods(context)) {
    if (only.empty() && !m.by_default) continue;
    auto active = bench::start_setting(registry, e, m.setting, *base);
    if (!active) return fmt::print(stderr, "bench: {}: {}\n", m.setting.label, active.message()), 1;
    Prepared p{m.setting, std::move(*active)};
    auto probe = p.active.seq->clone();
    const auto probe_t0 = Clock::now();
    for (int32_t i = 0; i <= steps; ++i) {  // as many steps as a row's sequences take
      const int32_t token = 2 + i % 100;
      if (auto s = e.forward(*probe, std::span<const int32_t>(&token, 1), 0, kDiscard); !s)
        return fmt::print(stderr, "bench: {}: {}\n", m.setting.label, s.message()), 1;
    }
    p.seq_step_s = since(probe_t0) / (steps + 1);
    const PluginEntry* entry = registry.find(m.setting.plugin);
    const uint32_t hooks = entry->hooks & ~p.active.handle->unused_hooks();
    if (m.setting.plugin != "dense" && (hooks & kHookPageBudget) != 0) p.bound_fraction = 1.0 / e.options().page_size;
    const int64_t page_bytes = probe->pages_held() * probe->pool().page_bytes();
    p.bound_bytes = int64_t(double(page_bytes) * p.bound_fraction);
    p.seq_bytes = page_bytes + p.bound_bytes;
    p.seq_tokens = probe->n_past();
    p.pages_per_table = double(probe->pages_held()) / double(tables);
    p.max_batch = p.seq_bytes > 0 ? budget / p.seq_bytes : 0;
    prepared.push_back(std::move(p));
  }
  (void)e.set_method(nullptr, 0);

  fmt::print("# {} at context {}, {}; weights {:.2f} GB resident; KV budget {:g} GB for the batch\n\n", spec->name,
             context, e.device_description(), double(e.weight_bytes()) / kGB, budget_gb);
  fmt::print("Prefill of {} tokens: {:.2f} s (once; every sequence is a device copy of it). Per row: B copies, 1 "
             "untimed + {} timed forward_batch decode steps, logits for every sequence. Achieved GB/s: (weights + "
             "KV read) / step time{}.\n\n",
             context, prefill_s, steps, peak_gbs > 0 ? fmt::format(", in % of {:.0f} GB/s", peak_gbs) : std::string());
  const double dense_seq = double(prepared.front().seq_bytes);
  for (const Prepared& p : prepared) {
    std::vector<std::string> too_big;
    for (int32_t b : batches)
      if (b > p.max_batch) too_big.push_back(std::to_string(b));
    fmt::print("- {}: {:.3f} GB per sequence at {} tokens ({:.1f} pages of {} tokens per (layer, kv head){}, {:.0f}% "
               "of dense); {} fit in {:g} GB{}\n",
               p.setting.label, double(p.seq_bytes) / kGB, p.seq_tokens, p.pages_per_table, e.options().page_size,
               p.bound_bytes > 0 ? fmt::format(", {:.3f} GB of it key bounds", double(p.bound_bytes) / kGB)
                                 : std::string(),
               100.0 * double(p.seq_bytes) / dense_seq, p.max_batch, budget_gb,
               too_big.empty() ? std::string()
                               : fmt::format(" (not batch {})", fmt::to_string(fmt::join(too_big, ", "))));
  }
  fmt::print("\n| setting | batch | KV GB held | ms/step | tokens/s | × dense at its max batch | KV GB read/step | "
             "achieved GB/s | batched calls | graph replays |\n");
  fmt::print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n");
  std::fflush(stdout);

  // Pass 1: each method's largest fitting batch; pass 2: the requested batches that fit, smallest first.
  struct Row {
    size_t method;
    int32_t batch;
  };
  std::vector<Row> rows;
  for (size_t i = 0; i < prepared.size(); ++i)
    if (prepared[i].max_batch > 0) rows.push_back({i, int32_t(prepared[i].max_batch)});
  // Dense (the reference) first, then the quickest by the probes, so a time limit drops the slowest.
  const auto predicted_s = [&](const Row& r) { return double(r.batch) * prepared[r.method].seq_step_s; };
  std::stable_sort(rows.begin(), rows.end(), [&](const Row& a, const Row& b) {
    if ((a.method == 0) != (b.method == 0)) return a.method == 0;
    return predicted_s(a) < predicted_s(b);
  });
  std::vector<int32_t> asked = batches;
  std::sort(asked.begin(), asked.end());
  asked.erase(std::unique(asked.begin(), asked.end()), asked.end());
  for (int32_t b : asked)
    for (size_t i = 0; i < prepared.size(); ++i)
      if (b < prepared[i].max_batch) rows.push_back({i, b});

  const double weights_gb = bench::decode_weight_bytes(e) / kGB;  // read once per step, as bench_cuda_decode counts them
  double dense_tokens_s = 0;
  bool failed = false;
  std::vector<std::string> skipped;
  for (const Row& row : rows) {
    Prepared& p = prepared[row.method];
    const bool reference = row.method == 0 && row.batch == p.max_batch;  // dense at its largest batch
    const std::string label = fmt::format("{}, batch {}", p.setting.label, row.batch);
    if (!reference && !only.empty() && label.find(only) == std::string::npos) continue;
    const double predicted = (steps + 1) * row.batch * p.seq_step_s;
    if (time_limit > 0 && since(started) + predicted > time_limit) {
      skipped.push_back(fmt::format("{} (~{:.1f} s)", label, predicted));
      continue;
    }
    if (auto s = install(registry, e, p); !s) {
      fmt::print(stderr, "bench: {}: {}\n", label, s.message());
      failed = true;
      continue;
    }
    auto r = run_row(e, *p.active.seq, row.batch, steps, p.bound_fraction);
    (void)e.set_method(nullptr, 0);
    if (!r) {
      fmt::print(stderr, "bench: {}: {}\n", label, r.message());
      fmt::print("| {} | {} | – | failed | | | | | | |\n", p.setting.label, row.batch);
      std::fflush(stdout);
      failed = true;
      continue;
    }
    if (reference) dense_tokens_s = r->tokens_s;
    if (row.batch == p.max_batch) p.seq_step_s = r->ms_step * 1e-3 / row.batch;
    const double gbs = (weights_gb + r->kv_read_gb) / (r->ms_step * 1e-3);
    fmt::print("| {} | {}{} | {:.2f} | {:.2f} | {:.0f} | {} | {:.2f} | {:.0f}{} | {} of {}{} | {} |\n", p.setting.label,
               row.batch, row.batch == p.max_batch ? " (max)" : "", r->kv_held_gb, r->ms_step, r->tokens_s,
               dense_tokens_s > 0 ? fmt::format("{:.2f}×", r->tokens_s / dense_tokens_s) : std::string("–"),
               r->kv_read_gb, gbs, peak_gbs > 0 ? fmt::format(" ({:.0f}%)", 100 * gbs / peak_gbs) : std::string(),
               r->batched_calls, steps,
               r->fallbacks > 0 ? fmt::format(" ({} one by one)", r->fallbacks) : std::string(), r->replays);
    std::fflush(stdout);
  }
  if (!skipped.empty())
    fmt::print("\nNot run (time limit {:g} s): {}\n", time_limit, fmt::to_string(fmt::join(skipped, "; ")));
  fmt::print("\nTotal {:.1f} s.\n", since(started));
  return failed ? 1 : 0;
}
