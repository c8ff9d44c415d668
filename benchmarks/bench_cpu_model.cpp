// CPU backend speed on a model: prefill tokens/s at given prompt lengths and
// decode tokens/s at given context lengths, printed as a markdown table.
//   bench_cpu_model --model smollm2-135m [--prefill 512,2048] [--decode 512,4096] [--batch 1,8]
// With --batch, each decode row runs B sequences a step through
// Engine::forward_batch (tokens/s counts every sequence's tokens).
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <random>

#include "engine/device.h"
#include "engine/engine.h"

using namespace inferlab;

namespace {
using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

std::vector<int32_t> random_tokens(int32_t n_vocab, int64_t n) {
  std::mt19937 rng(1234);
  std::uniform_int_distribution<int32_t> dist(0, n_vocab - 1);
  std::vector<int32_t> t(static_cast<size_t>(n));
  for (auto& x : t) x = dist(rng);
  return t;
}
}  // namespace

int main(int argc, char** argv) {
  select_blas_kernels(argv);
  CLI::App app{"CPU prefill/decode throughput"};
  std::string model_name = "smollm2-135m";
  std::vector<int32_t> prefill_lengths{512, 2048}, decode_contexts{512, 4096};
  int32_t decode_steps = 32, threads = 0, repeats = 2;
  app.add_option("-m,--model", model_name);
  app.add_option("--prefill", prefill_lengths)->delimiter(',');
  app.add_option("--decode", decode_contexts)->delimiter(',');
  app.add_option("--decode-steps", decode_steps)->check(CLI::PositiveNumber);
  app.add_option("--repeats", repeats)->check(CLI::PositiveNumber);
  app.add_option("-t,--threads", threads);
  std::vector<int32_t> batches{1};
  app.add_option("--batch", batches, "sequences per decode step (a list: one row each)")
      ->delimiter(',')
      ->check(CLI::Range(1, 4096));
  int32_t page_size = 16;
  app.add_option("--page-size", page_size, "KV page size in tokens")->check(CLI::Range(1, 65536));
  std::string weights_name = "f32";
  app.add_option("--weights", weights_name, "f32 or file (the model's quantized blocks)")
      ->check(CLI::IsMember({"f32", "file"}));
  std::string kv_dtype_name = "f32";
  app.add_option("--kv-dtype", kv_dtype_name, "KV cache pages: f32, f16 or bf16")
      ->check(CLI::IsMember({"f32", "f16", "bf16"}));
  CLI11_PARSE(app, argc, argv);

  auto path = resolve_model(model_name);
  if (!path) return fmt::print(stderr, "bench: {}\n", path.message()), 1;
  auto t_load = Clock::now();
  auto model = Model::load(*path);
  if (!model) return fmt::print(stderr, "bench: {}\n", model.message()), 1;
  const double load_s = since(t_load);
  const WeightSource weights = *parse_weight_source(weights_name);
  auto engine = Engine::create(*model, EngineOptions{.page_size = page_size,
                                                     .n_threads = threads,
                                                     .weights = weights,
                                                     .kv_dtype = *parse_kv_dtype(kv_dtype_name)});
  if (!engine) return fmt::print(stderr, "bench: {}\n", engine.message()), 1;
  Engine& e = **engine;
  const int32_t n_vocab = e.config().n_vocab;

  fmt::print("model: {} ({} params, weights {}, KV cache {}), load {:.2f} s\n", path->filename().string(),
             (*model)->parameter_count(), weight_source_name(weights), kv_dtype_name, load_s);
  fmt::print("cpu: {}, BLAS core: {}, threads: {}\n\n", cpu_description(), blas_core_name(), threads > 0 ? fmt::to_string(threads) : "all");
  fmt::print("| test | tokens | seconds | tokens/s |\n|---|---:|---:|---:|\n");
  for (int32_t n : prefill_lengths) {
    const auto tokens = random_tokens(n_vocab, n);
    double best = 1e30;
    for (int32_t r = 0; r < repeats; ++r) {
      auto seq = e.new_sequence();
      auto t0 = Clock::now();
      auto logits = e.prefill(*seq, tokens);
      if (!logits) return fmt::print(stderr, "bench: {}\n", logits.message()), 1;
      best = std::min(best, since(t0));
    }
    fmt::print("| prefill {} | {} | {:.3f} | {:.1f} |\n", n, n, best, n / best);
  }
  for (int32_t ctx : decode_contexts)
    for (int32_t batch : batches) {
      const auto tokens = random_tokens(n_vocab, ctx + decode_steps);
      std::vector<std::unique_ptr<KvSequence>> seqs;
      for (int32_t b = 0; b < batch; ++b) {
        seqs.push_back(e.new_sequence());
        auto logits = e.prefill(*seqs.back(), std::span<const int32_t>(tokens.data(), static_cast<size_t>(ctx)));
        if (!logits) return fmt::print(stderr, "bench: {}\n", logits.message()), 1;
      }
      std::vector<Engine::BatchItem> items(static_cast<size_t>(batch));
      const LogitsSink sink = [](int64_t, std::span<const float>) {};
      auto t0 = Clock::now();
      for (int32_t i = 0; i < decode_steps; ++i) {
        for (int32_t b = 0; b < batch; ++b)
          items[size_t(b)] = {seqs[size_t(b)].get(), std::span<const int32_t>(&tokens[size_t(ctx + i)], 1), 0, sink};
        if (auto st = e.forward_batch(items); !st) return fmt::print(stderr, "bench: {}\n", st.message()), 1;
      }
      const double s = since(t0);
      fmt::print("| decode at context {}, batch {} | {} | {:.3f} | {:.1f} |\n", ctx, batch, decode_steps * batch, s,
                 decode_steps * batch / s);
    }
  return 0;
}
