// LoRA and QLoRA decode cost against dense on one backend (issue 20), as
// ratios measured in one run: random adapters of rank r on all seven layer
// projections of every layer, merged (folded into this run's weights: dense
// cost) and unmerged (two skinny GEMMs after each projection); the layer
// projections in NF4 with double quantization (QLoRA's storage), alone and
// with unmerged adapters. Every setting decodes the same steps from copies of
// one prefill, the settings alternating round by round; medians are compared.
// Then, on the CPU, one projection's GEMV through f32 weights against the
// fused NF4 GEMV (kernels only, one row, the model's and the 7B shapes).
//   bench_lora --model smollm2-135m [--backend cpu] [--context 256] [--steps 32] [--rounds 5]
//              [--ranks 8,16,64] [--gemv-reps 200]
#include <CLI/CLI.hpp>
#include <fmt/format.h>

#include <random>

#include "bench_support.h"
#include "cpu/cpu_ops.h"
#include "cpu/quant4.h"
#include "engine/device.h"
#include "model/model.h"

using namespace inferlab;

namespace {

using bench::Clock;
using bench::since;

constexpr const char* kProjections[] = {"attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down"};

// Random rank-r adapters on every layer projection and/or 4-bit storage.
class BenchMethod final : public Method {
 public:
  BenchMethod(int32_t rank, bool merge, WeightStorage storage) : rank_(rank), merge_(merge), storage_(storage) {}
  Status on_load(const LoadContext& ctx) override {
    std::mt19937 rng(7);
    std::normal_distribution<float> dist(0.0f, 0.02f);
    for (int32_t l = 0; l < ctx.shape.n_layers; ++l)
      for (const char* name : kProjections) {
        if (storage_.format != WeightFormat::Model)
          if (auto s = ctx.overrides->set_storage(name, l, storage_); !s) return s;
        if (rank_ == 0) continue;
        const auto w = ctx.weights->tensor(name, l);
        const int64_t in = std::string(name) == "attn_output" ? int64_t(ctx.shape.n_heads) * ctx.shape.head_dim
                           : std::string(name) == "ffn_down"  ? ctx.shape.n_ff
                                                              : ctx.shape.n_embd;
        const int64_t out = int64_t(w.size()) / in;
        LowRankAdapter a;
        a.rank = rank_;
        a.a.resize(size_t(rank_ * in));
        a.b.resize(size_t(out * rank_));
        for (float& x : a.a) x = dist(rng);
        for (float& x : a.b) x = dist(rng);
        a.scale = 2.0f;
        a.merge = merge_;
        if (auto s = ctx.overrides->add_adapter(name, l, a); !s) return s;
      }
    return ok_status();
  }

 private:
  int32_t rank_;
  bool merge_;
  WeightStorage storage_;
};

struct Setting {
  std::string label;
  int32_t rank = 0;
  bool merge = false;
  bool nf4 = false;
};

Result<double> decode_ms(Engine& e, const KvSequence& base, int32_t steps) {
  auto seq = base.clone(e.shared_pool());
  if (auto r = e.decode(*seq, 1); !r) return r.error();  // warm (a decode graph captured)
  const auto t0 = Clock::now();
  for (int32_t i = 0; i < steps; ++i)
    if (auto s = e.forward(*seq, std::vector<int32_t>{100 + i}, 0, [](int64_t, std::span<const float>) {}); !s)
      return s.error();
  return since(t0) * 1e3 / steps;
}

// Median milliseconds of `reps` calls of `f`, in 5 timed batches.
template <class F>
double time_ms(int reps, F&& f) {
  std::vector<double> batches;
  for (int b = 0; b < 5; ++b) {
    const auto t0 = Clock::now();
    for (int i = 0; i < reps; ++i) f();
    batches.push_back(since(t0) * 1e3 / reps);
  }
  return bench::median(batches);
}

}  // namespace

int main(int argc, char** argv) {
  select_blas_kernels(argv);
  CLI::App app{"LoRA / QLoRA: decode cost of merged and unmerged adapters and NF4 weights against dense"};
  std::string model_name = "smollm2-135m", backend = "cpu";
  std::vector<int32_t> ranks{8, 16, 64};
  int32_t context = 256, steps = 32, rounds = 5, threads = 0, gemv_reps = 200;
  app.add_option("-m,--model", model_name)->capture_default_str();
  app.add_option("--backend", backend, "cpu or cuda")->capture_default_str();
  app.add_option("--context", context, "tokens prefilled before the timed steps")->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--steps", steps, "decode steps per timing")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--rounds", rounds, "alternations of the settings; medians are compared")
      ->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--ranks", ranks)->delimiter(',')->check(CLI::Range(1, 512));
  app.add_option("--gemv-reps", gemv_reps, "GEMV calls per timing (0: skip the kernel table)")
      ->check(CLI::NonNegativeNumber)->capture_default_str();
  app.add_option("-t,--threads", threads, "CPU threads (0: all)");
  CLI11_PARSE(app, argc, argv);

  auto kind = parse_backend(backend);  // before the model loads: no GPU is said at once
  if (!kind) return fmt::print(stderr, "bench: --backend: {}\n", kind.message()), 1;
  auto path = resolve_model(model_name);
  if (!path) return fmt::print(stderr, "bench: {}\n", path.message()), 1;
  auto model = Model::load(*path);
  if (!model) return fmt::print(stderr, "bench: {}\n", model.message()), 1;
  EngineOptions options;
  options.n_threads = threads;
  options.backend = *kind;
  auto made = Engine::create(*model, options);
  if (!made) return fmt::print(stderr, "bench: {}\n", made.message()), 1;
  Engine& e = **made;

  std::vector<Setting> settings{{"dense", 0, false, false}};
  for (const int32_t r : ranks) {
    settings.push_back({fmt::format("LoRA r={} merged", r), r, true, false});
    settings.push_back({fmt::format("LoRA r={} unmerged", r), r, false, false});
  }
  settings.push_back({"NF4+DQ base (QLoRA storage)", 0, false, true});
  const int32_t qr = ranks.size() > 1 ? ranks[1] : ranks.front();
  settings.push_back({fmt::format("NF4+DQ base + LoRA r={} unmerged", qr), qr, false, true});

  std::vector<std::unique_ptr<BenchMethod>> methods;
  std::vector<std::unique_ptr<WeightOverrides>> overrides;
  PluginEntry entry;
  entry.name = "bench-lora";
  entry.hooks = kHookLoad;
  for (const Setting& s : settings) {
    const WeightStorage storage{s.nf4 ? WeightFormat::NF4 : WeightFormat::Model, 64, true};
    methods.push_back(std::make_unique<BenchMethod>(s.rank, s.merge, storage));
    overrides.push_back(std::make_unique<WeightOverrides>());
    if (auto st = load_method(*methods.back(), entry, e, {}, overrides.back().get()); !st)
      return fmt::print(stderr, "bench: {}: {}\n", s.label, st.message()), 1;
  }

  std::mt19937 rng(11);
  const std::vector<int32_t> prompt = bench::random_tokens(rng, e, context);
  auto base = e.new_sequence();
  if (auto s = e.forward(*base, prompt, int64_t(prompt.size()), {}); !s)
    return fmt::print(stderr, "bench: prefill: {}\n", s.message()), 1;

  std::vector<std::vector<double>> ms(settings.size());
  std::vector<double> bits(settings.size(), 0);
  for (int32_t r = 0; r < rounds; ++r)
    for (size_t i = 0; i < settings.size(); ++i) {
      Method* m = settings[i].label == "dense" ? nullptr : methods[i].get();
      if (auto s = e.set_method(m, m ? uint32_t(kHookLoad) : 0u, m ? overrides[i].get() : nullptr, "bench-lora"); !s)
        return fmt::print(stderr, "bench: {}: {}\n", settings[i].label, s.message()), 1;
      auto t = decode_ms(e, *base, steps);
      if (!t) return fmt::print(stderr, "bench: {}: {}\n", settings[i].label, t.message()), 1;
      ms[i].push_back(*t);
      if (const auto st = e.stored_weights(); st.values > 0) bits[i] = 8.0 * double(st.bytes) / double(st.values);
    }
  (void)e.set_method(nullptr, 0);

  fmt::print("# LoRA / QLoRA decode: {} ({}), context {}, {} steps x {} rounds\n\n", model_name,
             e.device_description(), context, steps, rounds);
  fmt::print("| setting | ms/step | × dense | layer weights bits/param |\n|---|---:|---:|---:|\n");
  const double dense = bench::median(ms[0]);
  for (size_t i = 0; i < settings.size(); ++i) {
    const double m = bench::median(ms[i]);
    fmt::print("| {} | {:.2f} | {:.2f} | {} |\n", settings[i].label, m, m / dense,
               bits[i] > 0 ? fmt::format("{:.3f}", bits[i]) : std::string("32 (f32)"));
  }

  if (gemv_reps == 0) return 0;
  fmt::print("\n# One GEMV (one row) on the CPU: f32 weights (OpenBLAS sgemv) against the fused NF4+DQ GEMV\n\n");
  fmt::print("| shape (out x in) | f32 ms | NF4 ms | NF4 / f32 time | f32 MB | NF4 MB |\n|---|---:|---:|---:|---:|---:|\n");
  const ModelConfig& c = e.config();
  const std::vector<std::pair<int64_t, int64_t>> shapes = {
      {c.n_embd, c.n_embd}, {c.n_ff, c.n_embd}, {c.n_embd, c.n_ff}, {4096, 4096}, {11008, 4096}};
  for (const auto& shape : shapes) {  // not a structured binding: lambdas below use them
    const int64_t out = shape.first, in = shape.second;
    std::normal_distribution<float> dist(0.0f, 0.02f);
    std::vector<float> w(static_cast<size_t>(out * in)), x(static_cast<size_t>(in)), y(static_cast<size_t>(out)),
        scratch;
    for (float& v : w) v = dist(rng);
    for (float& v : x) v = dist(rng) * 50.0f;
    const auto q = kernels::cpu::quant4_quantize(w.data(), out, in, kernels::cpu::Quant4Format::NF4, 64, true);
    const int reps = int(std::max<int64_t>(1, int64_t(gemv_reps) * 576 * 576 / (out * in)));
    const double f32 = time_ms(reps, [&] { kernels::cpu::matmul_xwt(y.data(), x.data(), w.data(), 1, out, in); });
    const double nf4 = time_ms(reps, [&] { kernels::cpu::quant4_matmul_xwt(y.data(), x.data(), q, 1, scratch); });
    fmt::print("| {} x {} | {:.4f} | {:.4f} | {:.2f} | {:.2f} | {:.2f} |\n", out, in, f32, nf4, nf4 / f32,
               double(out * in * 4) / 1e6, double(q.bytes()) / 1e6);
  }
  return 0;
}
