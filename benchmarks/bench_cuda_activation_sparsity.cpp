// Activation sparsity on the CUDA backend (issue 19: TEAL, CATS, Deja Vu), at a real
// shape with random weights made on the GPU:
//  1. kernels: one row against one projection — cuBLAS's dense GEMV against
//     the input-sparse GEMV on the transposed weight at input sparsities 0 to
//     0.9 (x normal, the smallest |x| zeroed), and CATS's gated up projection;
//     microseconds and effective GB/s (the weight bytes a kernel must read);
//  2. a whole decode step with graphs: dense, TEAL (every projection) and
//     CATS (gate threshold) at sparsities 0.25-0.75, thresholds from the
//     model's own activations over a 256-token prompt (observed taps), the
//     activation sparsity the counters measured beside each row; and Deja
//     Vu's predicted components (random rank-128 predictors run by the engine
//     on the device, on a side stream: its speed does not depend on what
//     they choose) keeping 50% and 25% of the neurons, and 25% of the neurons
//     with 50% of the heads.
// Prints markdown tables.
//   bench_cuda_activation_sparsity [--preset llama2-7b] [--context 1024] [--steps 32] [--repeats 200]
#include <CLI/CLI.hpp>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <random>

#include "bench_cuda_support.h"
#include "cuda/activation_sparse.cuh"
#include "cuda/gemm.cuh"
#include "cuda/init.cuh"
#include "engine/engine.h"
#include "inferlab/quantiles.h"
#include "inferlab/testing/predictors.h"
#include "model/synthetic_model.h"

using namespace inferlab;
namespace kc = kernels::cuda;

namespace {

using Clock = std::chrono::steady_clock;
double since(Clock::time_point t0) { return std::chrono::duration<double>(Clock::now() - t0).count(); }

using bench::time_us;

// A half-precision row of n normal values whose `sparsity` smallest magnitudes are zero.
std::vector<uint16_t> sparse_row(int64_t n, double sparsity, uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> d(0.0f, 1.0f);
  std::vector<float> v(static_cast<size_t>(n));
  for (float& x : v) x = d(rng);
  std::vector<float> mags(v.size());
  for (size_t i = 0; i < v.size(); ++i) mags[i] = std::fabs(v[i]);
  const size_t k = std::min(v.size() - 1, size_t(sparsity * double(n)));
  std::nth_element(mags.begin(), mags.begin() + long(k), mags.end());
  const float cut = sparsity > 0 ? mags[k] : -1.0f;
  std::vector<uint16_t> out(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const float x = std::fabs(v[i]) < cut ? 0.0f : v[i];
    uint32_t bits;
    std::memcpy(&bits, &x, 4);  // f32 -> f16 by the runtime would need device code; a bf16 truncation is enough here
    out[i] = uint16_t(bits >> 16);
  }
  return out;
}

int kernels_table(int64_t n_embd, int64_t n_ff, int repeats, double peak_gbs) {
  const kernels::DType dtype = kernels::DType::BF16;  // the host rounds rows by truncation (bf16)
  cublasHandle_t cublas;
  if (cublasCreate(&cublas) != CUBLAS_STATUS_SUCCESS) return fmt::print(stderr, "bench: cuBLAS\n"), 1;
  struct Shape {
    const char* name;
    int64_t in, out;
  };
  const Shape shapes[] = {{"q/o (in x out)", n_embd, n_embd}, {"gate/up", n_embd, n_ff}, {"down", n_ff, n_embd}};
  fmt::print("## Kernels: one row, bf16 weights, {} repeats\n\n", repeats);
  fmt::print("| projection | in x out | input sparsity | cuBLAS dense µs | sparse GEMV µs | × dense | sparse GB/s of kept rows | % of peak |\n");
  fmt::print("|---|---|---:|---:|---:|---:|---:|---:|\n");
  for (const Shape& s : shapes) {
    void *w = nullptr, *wt = nullptr, *x = nullptr;
    float *y = nullptr, *partial = nullptr;
    const size_t wbytes = size_t(s.in * s.out) * 2;
    BENCH_CUDA(cudaMalloc(&w, wbytes));
    BENCH_CUDA(cudaMalloc(&wt, wbytes));
    BENCH_CUDA(cudaMalloc(&x, size_t(s.in) * 2));
    BENCH_CUDA(cudaMalloc(&y, size_t(s.out) * 4));
    BENCH_CUDA(cudaMalloc(&partial, size_t(kc::sparse_input_splits(s.in) * s.out) * 4));
    BENCH_CUDA(kc::fill_random_normal(w, dtype, s.in * s.out, 11, 0.02f, nullptr));
    BENCH_CUDA(kc::transpose(w, dtype, s.out, s.in, wt, nullptr));
    const double dense_us =
        time_us(repeats, [&] { (void)kc::gemm_xwt(cublas, x, w, dtype, y, 1, s.out, s.in); });
    for (const double sparsity : {0.0, 0.25, 0.5, 0.75, 0.9}) {
      const auto row = sparse_row(s.in, sparsity, 3);
      BENCH_CUDA(cudaMemcpy(x, row.data(), row.size() * 2, cudaMemcpyHostToDevice));
      const double us = time_us(repeats, [&] {
        (void)kc::sparse_input_gemv(x, wt, dtype, s.in, s.out, 0.0f, partial, y, nullptr, nullptr);
      });
      const double kept_bytes = (1.0 - sparsity) * double(wbytes);
      const double gbs = kept_bytes / (us * 1e-6) / 1e9;
      fmt::print("| {} | {} x {} | {:.2f} | {:.1f} | {:.1f} | {:.2f}× | {:.0f} | {:.0f}% |\n", s.name, s.in, s.out,
                 sparsity, dense_us, us, dense_us / us, gbs, peak_gbs > 0 ? 100 * gbs / peak_gbs : 0.0);
    }
    BENCH_CUDA(cudaGetLastError());
    cudaFree(w), cudaFree(wt), cudaFree(x), cudaFree(y), cudaFree(partial);
  }
  cublasDestroy(cublas);
  fmt::print("\n");
  return 0;
}

// Thresholds from the model's own activations: what each projection reads
// (and |SiLU(gate)|), over one forward of a prompt.
class Calibrate final : public ForwardObserver {
 public:
  explicit Calibrate(int32_t n_layers) : h_(size_t(n_layers)) {}
  uint32_t taps() const override {
    return kTapAttentionIn | kTapAttentionOut | kTapFfnIn | kTapFfnGate | kTapFfnActivation;
  }
  void on_layer(const CalibrationTaps& t) override {
    auto& h = h_[size_t(t.layer)];
    h[0].add(t.attention_in);
    h[1].add(t.attention_out);
    h[2].add(t.ffn_in);
    h[3].add(t.ffn_activation);
    silu_.resize(t.ffn_gate.size());
    for (size_t i = 0; i < silu_.size(); ++i) silu_[i] = t.ffn_gate[i] / (1.0f + std::exp(-t.ffn_gate[i]));
    h[4].add(silu_);
  }
  ActivationSparsity teal(double s) const {
    ActivationSparsity a;
    static constexpr int kInput[] = {0, 0, 0, 1, 2, 2, 3};
    for (const auto& h : h_) {
      std::array<float, kSparseProjections> t{};
      for (int p = 0; p < kSparseProjections; ++p) t[size_t(p)] = float(h[size_t(kInput[p])].quantile(s));
      a.input_threshold.push_back(t);
    }
    return a;
  }
  ActivationSparsity cats(double s) const {
    ActivationSparsity a;
    for (const auto& h : h_) a.gate_threshold.push_back(float(h[4].quantile(s)));
    return a;
  }

 private:
  std::vector<std::array<MagnitudeHistogram, 5>> h_;
  std::vector<float> silu_;
};

class Declared final : public Method {
 public:
  explicit Declared(ActivationSparsity a) : a_(std::move(a)) {}
  explicit Declared(ComponentPredictors p) : p_(std::move(p)) {}
  ActivationSparsity activation_sparsity() const override { return a_; }
  ComponentPredictors component_predictors() const override { return p_; }

 private:
  ActivationSparsity a_;
  ComponentPredictors p_;
};

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"Activation sparsity (TEAL, CATS) on the CUDA backend: kernels and whole decode steps"};
  std::string preset = "llama2-7b";
  int32_t context = 1024, steps = 32, repeats = 200;
  double peak_gbs = 4800;  // H200 HBM3e
  app.add_option("--preset", preset)->capture_default_str();
  app.add_option("--context", context, "tokens prefilled before the timed steps")->check(CLI::PositiveNumber)
      ->capture_default_str();
  app.add_option("--steps", steps)->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--repeats", repeats, "kernel launches per timing")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--peak-gbs", peak_gbs, "DRAM bandwidth for the % column")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row reaches a log as it is measured (a capped run keeps them)

  auto spec = synthetic_preset(preset);
  if (!spec) return fmt::print(stderr, "bench: {}\n", spec.message()), 1;
  EngineOptions options;
  options.backend = BackendKind::Cuda;
  options.max_context = context + steps + 8;
  auto made = Engine::create_random(synthetic_config(*spec), 1, options);
  if (!made) return fmt::print(stderr, "bench: {}\n", made.message()), 1;
  Engine& e = **made;
  const ModelConfig& c = e.config();
  fmt::print("# Activation sparsity, {} ({} layers, {} wide, FFN {}), {}\n\n", spec->name, c.n_layers, c.n_embd, c.n_ff,
             e.device_description());
  if (int rc = kernels_table(c.n_embd, c.n_ff, repeats, peak_gbs); rc != 0) return rc;

  std::mt19937 rng(7);
  std::vector<int32_t> prompt(static_cast<size_t>(context));
  for (auto& t : prompt) t = int32_t(rng() % uint32_t(c.n_vocab));
  Calibrate calibrate(c.n_layers);
  {
    auto seq = e.new_sequence();
    const std::vector<int32_t> head(prompt.begin(), prompt.begin() + std::min<int32_t>(context, 256));
    if (auto s = e.forward(*seq, head, int64_t(head.size()), {}, &calibrate); !s)
      return fmt::print(stderr, "bench: calibration: {}\n", s.message()), 1;
  }
  fmt::print("## Decode step at context {}, graphs on, {} steps per row\n\n", context, steps);
  fmt::print("| setting | ms/step | × dense | measured sparsity (all projections; Deja Vu: skipped) | weights + copies GiB |\n");
  fmt::print("|---|---:|---:|---:|---:|\n");
  double dense_ms = 0;
  struct Row {
    std::string label;
    std::unique_ptr<Declared> method;
  };
  std::vector<Row> rows;
  rows.push_back({"dense", nullptr});
  for (const double s : {0.25, 0.5, 0.75}) rows.push_back({fmt::format("teal {:.2f}", s), std::make_unique<Declared>(calibrate.teal(s))});
  for (const double s : {0.25, 0.5, 0.75}) rows.push_back({fmt::format("cats {:.2f}", s), std::make_unique<Declared>(calibrate.cats(s))});
  for (const auto& [n, h] : {std::pair{0.5, 1.0}, {0.25, 1.0}, {0.25, 0.5}})
    rows.push_back({fmt::format("dejavu neurons {:.2f} heads {:.2f}", n, h),
                    std::make_unique<Declared>(test::random_predictors(  // rank 128, weights in +-0.05
                        c, 128, n < 1 ? int32_t(std::ceil(n * double(c.n_ff))) : 0,
                        h < 1 ? int32_t(std::ceil(h * double(c.n_heads))) : 0, 11, 0, 0.05f))});
  for (Row& r : rows) {
    if (auto s = e.set_method(r.method.get(), 0, nullptr, r.label); !s)
      return fmt::print(stderr, "bench: {}: {}\n", r.label, s.message()), 1;
    auto seq = e.new_sequence();
    if (auto s = e.forward(*seq, prompt, int64_t(prompt.size()), {}); !s)
      return fmt::print(stderr, "bench: prefill: {}\n", s.message()), 1;
    for (int i = 0; i < 4; ++i)  // warm-up: the first steps capture the graph
      (void)e.forward(*seq, std::vector<int32_t>{3 + i}, 0, [](int64_t, std::span<const float>) {});
    e.reset_counters();
    const auto t0 = Clock::now();
    for (int32_t i = 0; i < steps; ++i)
      if (auto s = e.forward(*seq, std::vector<int32_t>{5 + i % 100}, 0, [](int64_t, std::span<const float>) {}); !s)
        return fmt::print(stderr, "bench: {}: {}\n", r.label, s.message()), 1;
    const double ms = since(t0) * 1e3 / steps;
    if (r.label == "dense") dense_ms = ms;
    const auto counters = e.counters().as_map();
    const auto it = counters.find("activation_sparsity");
    std::string measured = it == counters.end() ? std::string("-") : fmt::format("{:.3f}", it->second);
    if (r.label.starts_with("dejavu"))  // what the predictors skipped, per decode step and layer
      measured = fmt::format("neurons {:.3f}, heads {:.3f}, graphs {}",
                             counters.at("neurons_skipped") / double(steps) / c.n_layers / double(c.n_ff),
                             counters.at("heads_skipped") / double(steps) / c.n_layers / double(c.n_heads),
                             counters.at("graph_replays"));
    fmt::print("| {} | {:.2f} | {:.2f}× | {} | {:.1f} |\n", r.label, ms, dense_ms / ms, measured,
               double(e.weight_bytes()) / double(1ull << 30));
    (void)e.set_method(nullptr, 0);
  }
  return 0;
}
