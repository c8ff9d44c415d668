// QLoRA's 4-bit weights on the GPU (issue 20), one projection at a time at
// the Llama-2-7B shapes (q/o 4096 x 4096, gate/up 11008 x 4096, down
// 4096 x 11008), random normal weights quantized on the host:
//  1. decode (one row): cuBLAS's fp16 GEMV against the fused dequantizing
//     GEMV through NF4 (fp32 absmax) and NF4 with double quantization;
//     microseconds, the bytes each must read (weights and input) and the
//     GB/s and % of peak that makes;
//  2. prefill (--rows, 512 by default): the fp16 GEMM against dequantize into
//     fp16 then the same GEMM (what the engine does for more than 4 rows).
// Prints markdown tables.
//   bench_cuda_quant4 [--repeats 200] [--rows 512] [--peak-gbs 4800]
#include <CLI/CLI.hpp>
#include <cublas_v2.h>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <cstdio>
#include <random>

#include "bench_cuda_support.h"
#include "cpu/quant4.h"
#include "cuda/device_info.cuh"
#include "cuda/gemm.cuh"
#include "cuda/init.cuh"
#include "cuda/quant4.cuh"

using namespace inferlab;
namespace kc = kernels::cuda;
namespace cpu = kernels::cpu;

namespace {

using bench::time_us;

// A 4-bit tensor on the device.
struct Device4 {
  void *codes = nullptr, *absmax = nullptr, *absmax_codes = nullptr, *absmax_scale = nullptr, *map = nullptr;
  kc::Quant4View view;
  int64_t bytes = 0;
  ~Device4() { cudaFree(codes), cudaFree(absmax), cudaFree(absmax_codes), cudaFree(absmax_scale), cudaFree(map); }
};

template <typename T>
cudaError_t upload(void*& to, const std::vector<T>& from) {
  if (from.empty()) return cudaSuccess;
  if (auto e = cudaMalloc(&to, from.size() * sizeof(T)); e != cudaSuccess) return e;
  return cudaMemcpy(to, from.data(), from.size() * sizeof(T), cudaMemcpyHostToDevice);
}

cudaError_t make_device(const cpu::Quant4Tensor& q, Device4& d) {
  const auto map = cpu::dynamic_map_signed();
  cudaError_t e = upload(d.codes, q.codes);
  if (e == cudaSuccess) e = upload(d.absmax, q.absmax);
  if (e == cudaSuccess) e = upload(d.absmax_codes, q.absmax_codes);
  if (e == cudaSuccess) e = upload(d.absmax_scale, q.absmax_scale);
  if (e == cudaSuccess) e = upload(d.map, std::vector<float>(map.begin(), map.end()));
  d.view.codes = static_cast<const uint8_t*>(d.codes);
  d.view.absmax = q.double_quant ? nullptr : static_cast<const float*>(d.absmax);
  d.view.absmax_codes = static_cast<const uint8_t*>(d.absmax_codes);
  d.view.absmax_scale = static_cast<const float*>(d.absmax_scale);
  d.view.dynamic_map = static_cast<const float*>(d.map);
  d.view.absmax_offset = q.absmax_offset;
  const auto levels = cpu::quant4_levels(q.format);
  std::copy(levels.begin(), levels.end(), d.view.levels);
  d.view.block = q.block;
  d.view.n = q.rows * q.cols;
  d.bytes = q.bytes();
  return e;
}

}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"QLoRA's 4-bit weights on the GPU: fused NF4 GEMV and dequantize+GEMM against fp16 (7B shapes)"};
  int repeats = 200;
  int64_t rows = 512;
  double peak_gbs = 4800;  // H200 HBM3e
  app.add_option("--repeats", repeats)->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--rows", rows, "prefill rows")->check(CLI::PositiveNumber)->capture_default_str();
  app.add_option("--peak-gbs", peak_gbs, "DRAM bandwidth for the % column")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row reaches a log as it is measured (a capped run keeps them)
  if (kc::device_count() == 0) return fmt::print(stderr, "bench: no CUDA GPU\n"), 1;
  if (const auto why = kc::kernel_image_problem(0); !why.empty()) return fmt::print(stderr, "bench: {}\n", why), 1;
  cublasHandle_t cublas;
  if (cublasCreate(&cublas) != CUBLAS_STATUS_SUCCESS) return fmt::print(stderr, "bench: cuBLAS\n"), 1;
  const kernels::DType f16 = kernels::DType::F16;
  struct Shape {
    const char* name;
    int64_t out, in;
  };
  const Shape shapes[] = {{"q/o", 4096, 4096}, {"gate/up", 11008, 4096}, {"down", 4096, 11008}};
  fmt::print("# 4-bit weights, {} ({} repeats)\n\n", kc::device_description(0), repeats);
  fmt::print("## Decode: one row\n\n| projection | out x in | weights | µs | bytes read MB | GB/s | % of peak | × fp16 time |\n");
  fmt::print("|---|---|---|---:|---:|---:|---:|---:|\n");
  std::mt19937_64 rng(5);
  std::normal_distribution<float> dist(0.0f, 0.02f);
  std::vector<std::string> prefill_rows;
  for (const Shape& s : shapes) {
    const int64_t n = s.out * s.in;
    std::vector<float> w(static_cast<size_t>(n));
    for (float& v : w) v = dist(rng);
    void *w16 = nullptr, *x = nullptr, *xs = nullptr, *scratch = nullptr;
    float* y = nullptr;
    BENCH_CUDA(cudaMalloc(&w16, size_t(n) * 2));
    BENCH_CUDA(cudaMalloc(&scratch, size_t(n) * 2));
    BENCH_CUDA(cudaMalloc(&x, size_t(s.in) * 2));
    BENCH_CUDA(cudaMalloc(&xs, size_t(rows * s.in) * 2));
    BENCH_CUDA(cudaMalloc(&y, size_t(rows * s.out) * 4));
    BENCH_CUDA(kc::fill_random_normal(w16, f16, n, 11, 0.02f, nullptr));
    BENCH_CUDA(kc::fill_random_normal(x, f16, s.in, 12, 1.0f, nullptr));
    BENCH_CUDA(kc::fill_random_normal(xs, f16, rows * s.in, 13, 1.0f, nullptr));
    const double fp16_us = time_us(repeats, [&] { (void)kc::gemm_xwt(cublas, x, w16, f16, y, 1, s.out, s.in); });
    const double fp16_mb = double(n * 2 + s.in * 2) / 1e6;
    auto row = [&](const char* what, double us, double mb) {
      const double gbs = mb * 1e3 / us;
      fmt::print("| {} | {} x {} | {} | {:.1f} | {:.1f} | {:.0f} | {:.0f}% | {:.2f} |\n", s.name, s.out, s.in, what, us,
                 mb, gbs, 100 * gbs / peak_gbs, us / fp16_us);
    };
    row("fp16 (cuBLAS)", fp16_us, fp16_mb);
    double dq_gemm_us = 0;
    for (const bool dq : {false, true}) {
      const auto q = cpu::quant4_quantize(w.data(), s.out, s.in, cpu::Quant4Format::NF4, 64, dq);
      Device4 d;
      BENCH_CUDA(make_device(q, d));
      const double us = time_us(repeats, [&] { (void)kc::quant4_gemv(d.view, x, f16, y, 1, s.out, s.in, nullptr); });
      BENCH_CUDA(cudaGetLastError());
      row(dq ? "NF4+DQ fused GEMV" : "NF4 fused GEMV", us, double(d.bytes + s.in * 2) / 1e6);
      if (dq)
        dq_gemm_us = time_us(repeats / 10 + 1, [&] {
          (void)kc::quant4_dequantize(d.view, scratch, f16, nullptr);
          (void)kc::gemm_xwt(cublas, xs, scratch, f16, y, rows, s.out, s.in);
        });
    }
    const double gemm_us =
        time_us(repeats / 10 + 1, [&] { (void)kc::gemm_xwt(cublas, xs, w16, f16, y, rows, s.out, s.in); });
    const double flops = 2.0 * double(rows) * double(n);
    prefill_rows.push_back(fmt::format("| {} | {} x {} | {:.1f} | {:.0f} | {:.1f} | {:.0f} | {:.2f} |", s.name, s.out,
                                       s.in, gemm_us, flops / gemm_us / 1e6, dq_gemm_us, flops / dq_gemm_us / 1e6,
                                       dq_gemm_us / gemm_us));
    BENCH_CUDA(cudaGetLastError());
    cudaFree(w16), cudaFree(scratch), cudaFree(x), cudaFree(xs), cudaFree(y);
  }
  fmt::print("\n## Prefill: {} rows\n\n| projection | out x in | fp16 GEMM µs | TFLOP/s | NF4+DQ dequantize + GEMM µs | TFLOP/s | × fp16 time |\n",
             rows);
  fmt::print("|---|---|---:|---:|---:|---:|---:|\n");
  for (const auto& r : prefill_rows) fmt::print("{}\n", r);
  cublasDestroy(cublas);
  return 0;
}
