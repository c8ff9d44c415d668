// Whole-model timing of the CUDA backend on a synthetic model of a real shape
// (random weights made on the GPU, no file): the time of one decode step at
// batch 1 for several context lengths, against the roofline of reading every
// weight and every cached K/V byte once per token; and the prefill of a prompt
// in TFLOP/s. Prints markdown tables.
//   bench_cuda_decode [--preset llama2-7b-128k] [--contexts 1024,4096,16384,32768]
//                     [--steps 32] [--prefill 4096] [--peak-gbs 0] [--dtype f16] [--no-graphs]
#include <CLI/CLI.hpp>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <chrono>
#include <cstdio>
#include <random>

#include "bench_support.h"
#include "cuda/device_info.cuh"
#include "engine/engine.h"
#include "model/synthetic_model.h"

using namespace inferlab;

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }


std::vector<int32_t> random_tokens(int32_t vocab, int64_t n, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::uniform_int_distribution<int32_t> dist(0, vocab - 1);
  std::vector<int32_t> out(static_cast<size_t>(n));
  for (auto& t : out) t = dist(rng);
  return out;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"CUDA backend: decode step and prefill of a synthetic model at a real shape"};
  std::string preset = "llama2-7b-128k", dtype_name = "f16";
  std::vector<int64_t> contexts = {1024, 4096, 16384, 32768};
  int64_t steps = 32, prefill_tokens = 4096, chunk = 8192;
  double peak_gbs = 0;
  bool no_graphs = false;
  app.add_option("--preset", preset, "synthetic model shape")->capture_default_str();
  app.add_option("--contexts", contexts, "cached tokens before the timed decode steps")->delimiter(',');
  app.add_option("--steps", steps, "decode steps timed per context")->capture_default_str();
  app.add_option("--prefill", prefill_tokens, "prompt length of the prefill timing (0: skip)")->capture_default_str();
  app.add_option("--chunk", chunk, "tokens per forward call while filling the cache")->capture_default_str();
  app.add_option("--peak-gbs", peak_gbs, "memory bandwidth for the roofline (0: from the device)");
  app.add_option("--dtype", dtype_name, "f16 or bf16")->capture_default_str();
  app.add_flag("--no-graphs", no_graphs, "decode without CUDA graphs");
  CLI11_PARSE(app, argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row reaches a log as it is measured (a capped run keeps them)

  auto spec = synthetic_preset(preset);
  if (!spec) return std::fprintf(stderr, "%s\n", spec.message().c_str()), 1;
  auto dtype = parse_gpu_dtype(dtype_name);
  if (!dtype) return std::fprintf(stderr, "--dtype: %s\n", dtype.message().c_str()), 1;
  const ModelConfig config = synthetic_config(*spec);
  EngineOptions options;
  options.backend = BackendKind::Cuda;
  options.gpu_dtype = *dtype;
  options.cuda_graphs = !no_graphs;
  constexpr int64_t kWarmup = 3;  // untimed steps that capture and warm the graph
  int64_t longest = prefill_tokens;
  for (int64_t c : contexts) longest = std::max(longest, c + kWarmup + steps);
  options.max_context = int32_t(std::min<int64_t>(longest, config.context_length));
  auto made = Engine::create_random(config, 1, options);
  if (!made) return std::fprintf(stderr, "%s\n", made.message().c_str()), 1;
  Engine& engine = **made;
  if (peak_gbs <= 0) peak_gbs = kernels::cuda::device_peak_gbs(0);

  const int64_t kv_bytes_per_token =
      int64_t(config.n_layers) * 2 * config.kv_dim() * 2;  // K and V, 16-bit
  fmt::print("# {} ({} layers, {} params), {}\n\n", spec->name, config.n_layers, engine.model().parameter_count(),
             engine.device_description());
  const double weight_bytes = bench::decode_weight_bytes(engine);
  fmt::print("Roofline: (weights read per step {:.2f} GB + cached KV bytes) / {:.0f} GB/s; CUDA graphs {}.\n\n",
             weight_bytes / 1e9, peak_gbs, no_graphs ? "off" : "on");
  fmt::print("| context | ms / token | tokens/s | roofline ms | % of roofline | achieved GB/s |\n");
  fmt::print("|---:|---:|---:|---:|---:|---:|\n");
  for (int64_t context : contexts) {
    if (context + kWarmup + steps > options.max_context) continue;
    auto seq = engine.new_sequence();
    if (auto s = bench::prefill_chunked(engine, *seq, random_tokens(config.n_vocab, context, 2), chunk); !s)
      return std::fprintf(stderr, "prefill %lld: %s\n", (long long)context, s.message().c_str()), 1;
    for (int w = 0; w < kWarmup; ++w)
      if (auto s = engine.forward(*seq, std::vector<int32_t>{w + 1}, 0, [](int64_t, std::span<const float>) {}); !s)
        return std::fprintf(stderr, "decode: %s\n", s.message().c_str()), 1;
    const auto t0 = Clock::now();
    for (int64_t i = 0; i < steps; ++i)
      if (auto s = engine.forward(*seq, std::vector<int32_t>{int32_t(i % 100)}, 0,
                                  [](int64_t, std::span<const float>) {});
          !s)
        return std::fprintf(stderr, "decode: %s\n", s.message().c_str()), 1;
    const double per_token = since(t0) / double(steps);
    const double bytes = weight_bytes + double(context + kWarmup + steps / 2) * double(kv_bytes_per_token);
    const double roofline = bytes / (peak_gbs * 1e9);
    fmt::print("| {} | {:.3f} | {:.1f} | {:.3f} | {:.1f}% | {:.0f} |\n", context, per_token * 1e3, 1.0 / per_token,
               roofline * 1e3, 100.0 * roofline / per_token, bytes / per_token / 1e9);
  }
  if (prefill_tokens > 0 && prefill_tokens <= options.max_context) {
    auto seq = engine.new_sequence();
    const auto tokens = random_tokens(config.n_vocab, prefill_tokens, 3);
    if (auto s = bench::prefill_chunked(engine, *seq, tokens, prefill_tokens); !s)  // warm-up (workspace, cuBLAS heuristics)
      return std::fprintf(stderr, "prefill: %s\n", s.message().c_str()), 1;
    seq = engine.new_sequence();
    const auto t0 = Clock::now();
    if (auto s = bench::prefill_chunked(engine, *seq, tokens, prefill_tokens); !s)
      return std::fprintf(stderr, "prefill: %s\n", s.message().c_str()), 1;
    const double seconds = since(t0);
    const double n = double(prefill_tokens);
    const double layer_gemm = 2.0 * n * double(config.n_embd) *
                              double(config.q_dim() + 2 * config.kv_dim() + config.q_dim() + 3 * int64_t(config.n_ff));
    const double causal_attention = 2.0 * 2.0 * (n * n / 2.0) * double(config.head_dim) * config.n_heads;
    const double flops = double(config.n_layers) * (layer_gemm + causal_attention);
    fmt::print("\n| prefill tokens | seconds | tokens/s | TFLOP/s (GEMMs + causal attention) |\n|---:|---:|---:|---:|\n");
    fmt::print("| {} | {:.3f} | {:.0f} | {:.1f} |\n", prefill_tokens, seconds, n / seconds, flops / seconds / 1e12);
  }
  return 0;
}
