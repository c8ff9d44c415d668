// Speed of the CUDA attention kernels (kernels/cuda/attention.cuh) on shapes
// of Llama-class models (32 query heads, head_dim 128, f16 KV, pages of 16):
//   decode:  one query row over 4K..128K cached keys, 8 and 32 kv heads;
//            time per call, K+V GB/s and % of peak memory bandwidth.
//   prefill: causal self-attention over 4K..64K new tokens, 8 kv heads; TFLOP/s.
//   sparse:  decode over a 32K context reading 16..2048 selected pages.
// Inputs are constant-filled (timing only; correctness is tests/gpu). Compare
// with scripts/bench_torch_sdpa.py on the same GPU.
//   bench_cuda_attention [--mode all|decode|prefill|sparse] [--reps 50] [--peak-gbs 3350]
#include <CLI/CLI.hpp>
#include <cuda_runtime.h>
#include <fmt/format.h>

#include <algorithm>
#include <cstdio>
#include <numeric>
#include <random>
#include <vector>

#include "cuda/attention.cuh"
#include "cuda/device_info.cuh"
#include "engine/cuda/device_memory.h"
#include "experiment/runner.h"

using namespace inferlab;
using kernels::AttentionCall;

namespace {

#define BENCH_CUDA(expr)                                                                              \
  do {                                                                                                \
    if (cudaError_t e_ = (expr); e_ != cudaSuccess) {                                                 \
      fmt::print(stderr, "bench_cuda_attention: {}: {}\n", #expr, cudaGetErrorString(e_));            \
      std::exit(1);                                                                                   \
    }                                                                                                 \
  } while (0)

DeviceMemory device_alloc(size_t bytes) {
  DeviceMemory m;
  if (!m.reserve(std::max<size_t>(bytes, 1))) fmt::print(stderr, "bench_cuda_attention: out of device memory\n"), std::exit(1);
  return m;
}

template <typename T>
DeviceMemory upload(const std::vector<T>& host) {
  DeviceMemory m = device_alloc(host.size() * sizeof(T));
  if (!host.empty()) BENCH_CUDA(cudaMemcpy(m.as(), host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice));
  return m;
}

struct Shape {
  int32_t n_rows = 1, n_heads = 32, n_kv_heads = 8, head_dim = 128, n_cached = 0, page_size = 16;
  std::vector<int32_t> pages;  // KeySelect::Pages for every kv head; empty: All
};

// One attention problem in device memory: each kv head's pages shuffled over
// one pool, f16 KV filled with a constant, random queries.
struct Problem {
  Shape shape;
  int32_t n_stored, pages_per_head, max_keys;
  DeviceMemory pool, chunk_base, table, n_cached, q, out, select, select_indptr, select_index, workspace;
  AttentionCall call;

  static std::vector<int32_t> shuffled_pages(int32_t n) {
    std::vector<int32_t> p(size_t(n), 0);
    std::iota(p.begin(), p.end(), 0);
    std::shuffle(p.begin(), p.end(), std::mt19937(7));
    return p;
  }
  // A million normal draws repeated (timing only: prefill at 64K would
  // otherwise spend seconds of its capped run drawing 268M of them).
  static std::vector<float> random_queries(size_t n) {
    std::vector<float> draws(std::min<size_t>(n, size_t(1) << 20)), q(n);
    std::mt19937 rng(3);
    std::normal_distribution<float> d(0.0f, 1.0f);
    for (float& x : draws) x = d(rng);
    for (size_t i = 0; i < n; ++i) q[i] = draws[i % draws.size()];
    return q;
  }
  static std::vector<int32_t> indptr(const Shape& s) {
    std::vector<int32_t> p;
    for (int32_t g = 0; g <= s.n_kv_heads; ++g) p.push_back(g * int32_t(s.pages.size()));
    return p;
  }
  static std::vector<int32_t> repeated(const std::vector<int32_t>& v, int32_t times) {
    std::vector<int32_t> out;
    for (int32_t i = 0; i < times; ++i) out.insert(out.end(), v.begin(), v.end());
    return out;
  }

  explicit Problem(const Shape& s)
      : shape(s),
        n_stored(s.n_cached + s.n_rows),
        pages_per_head((n_stored + s.page_size - 1) / s.page_size),
        max_keys(s.pages.empty() ? n_stored : int32_t(s.pages.size()) * s.page_size + s.n_rows),
        pool(device_alloc(size_t(s.n_kv_heads) * pages_per_head * 2 * s.page_size * s.head_dim * 2)),
        chunk_base(upload(std::vector<void*>{pool.as()})),
        table(upload(shuffled_pages(s.n_kv_heads * pages_per_head))),
        n_cached(upload(std::vector<int32_t>(size_t(s.n_kv_heads), s.n_cached))),
        q(upload(random_queries(size_t(s.n_rows) * s.n_heads * s.head_dim))),
        out(device_alloc(size_t(s.n_rows) * s.n_heads * s.head_dim * sizeof(float))),
        select(upload(std::vector<uint8_t>(size_t(s.n_kv_heads), uint8_t(kernels::KeySelect::Pages)))),
        select_indptr(upload(indptr(s))),
        select_index(upload(repeated(s.pages, s.n_kv_heads))) {
    BENCH_CUDA(cudaMemset(pool.as(), 0x2c, pool.bytes()));  // f16 0x2c2c ~ 0.06
    call.n_rows = s.n_rows;
    call.n_heads = s.n_heads;
    call.n_kv_heads = s.n_kv_heads;
    call.head_dim = s.head_dim;
    call.scale = 1.0f / std::sqrt(float(s.head_dim));
    call.q = q.as<float>();
    call.out = out.as<float>();
    call.n_cached = n_cached.as<int32_t>();
    call.kv = {chunk_base.as<void* const>(), s.n_kv_heads * pages_per_head, s.page_size, s.head_dim,
               kernels::DType::F16};
    call.table = {table.as<int32_t>(), pages_per_head};
    if (!s.pages.empty()) {
      call.select = select.as<uint8_t>();
      call.select_indptr = select_indptr.as<int32_t>();
      call.select_index = select_index.as<int32_t>();
    }
    workspace = device_alloc(kernels::cuda::attention_workspace_bytes(call, max_keys));
  }

  void run() const {
    BENCH_CUDA(kernels::cuda::attention(call, max_keys, workspace.as(), workspace.bytes(), nullptr));
  }

  // Mean microseconds per call over `reps` after two warm-up calls.
  double time_us(int reps) const {
    run();
    run();
    cudaEvent_t start, stop;
    BENCH_CUDA(cudaEventCreate(&start));
    BENCH_CUDA(cudaEventCreate(&stop));
    BENCH_CUDA(cudaEventRecord(start));
    for (int i = 0; i < reps; ++i) run();
    BENCH_CUDA(cudaEventRecord(stop));
    BENCH_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    BENCH_CUDA(cudaEventElapsedTime(&ms, start, stop));
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    return 1e3 * ms / reps;
  }
};

Shape shape(int32_t n_rows, int32_t n_kv_heads, int32_t n_cached) {
  Shape s;
  s.n_rows = n_rows;
  s.n_kv_heads = n_kv_heads;
  s.n_cached = n_cached;
  return s;
}

// K and V bytes of `keys` keys per kv head, f16.
double kv_bytes(const Shape& s, int64_t keys) { return 2.0 * 2.0 * double(keys) * s.head_dim * s.n_kv_heads; }

// Calls repeat on the same keys: when they fit the GPU's L2 cache the figure
// is L2 bandwidth and launch latency, not DRAM's; the row says so.
const char* l2_note(double bytes) {
  int device = 0, l2 = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&l2, cudaDevAttrL2CacheSize, device);
  return bytes < double(l2) ? " (fits L2)" : "";
}

void print_header() {
  fmt::print("| mode | shape | µs/call | GB/s (K+V) | % peak BW | TFLOP/s |\n");
  fmt::print("|---|---|---:|---:|---:|---:|\n");
}

void bench_decode(const std::vector<int32_t>& contexts, int reps, double peak_gbs) {
  for (int32_t kv_heads : {8, 32})
    for (int32_t ctx : contexts) {
      Problem p(shape(1, kv_heads, ctx - 1));
      const double bytes = kv_bytes(p.shape, ctx), us = p.time_us(reps), gbs = bytes / us * 1e-3;
      fmt::print("| decode | ctx {} q32 kv{} d128{} | {:.1f} | {:.0f} | {:.1f}% | |\n", ctx, kv_heads, l2_note(bytes), us,
                 gbs, 100.0 * gbs / peak_gbs);
    }
}

void bench_prefill(const std::vector<int32_t>& lengths, int reps) {
  for (int32_t n : lengths) {
    Problem p(shape(n, 8, 0));
    const double flops = 4.0 * double(n) * double(n) / 2.0 * p.shape.head_dim * p.shape.n_heads;
    const int r = std::clamp(int(2e13 / flops), 2, reps);
    const double us = p.time_us(r);
    fmt::print("| prefill | n {} causal q32 kv8 d128 | {:.0f} | | | {:.1f} |\n", n, us, flops / us * 1e-6);
  }
}

void bench_sparse(const std::vector<int32_t>& page_counts, int reps, double peak_gbs) {
  const int32_t ctx = 32768, total_pages = ctx / 16;
  for (int32_t n_pages : page_counts) {
    Shape s = shape(1, 8, ctx - 1);
    for (int32_t i = 0; i < n_pages; ++i) s.pages.push_back(int32_t(int64_t(i) * total_pages / n_pages));
    Problem p(s);
    const double bytes = kv_bytes(s, int64_t(n_pages) * 16), us = p.time_us(reps), gbs = bytes / us * 1e-3;
    fmt::print("| sparse | ctx {} pages {} q32 kv8 d128{} | {:.1f} | {:.0f} | {:.1f}% | |\n", ctx, n_pages,
               l2_note(bytes), us, gbs, 100.0 * gbs / peak_gbs);
  }
}


}  // namespace

int main(int argc, char** argv) {
  CLI::App app{"CUDA attention kernels: decode bandwidth, prefill TFLOP/s, sparse decode"};
  std::string mode = "all";
  int reps = 50;
  double peak_gbs = 3350;
  std::vector<int32_t> contexts{4096, 32768, 131072}, lengths{4096, 8192, 16384, 32768, 65536};
  std::vector<int32_t> pages{16, 64, 256, 1024, 2048};
  app.add_option("--mode", mode)->check(CLI::IsMember({"all", "decode", "prefill", "sparse"}));
  app.add_option("--reps", reps)->check(CLI::PositiveNumber);
  app.add_option("--peak-gbs", peak_gbs, "peak memory bandwidth for % of peak (H100 SXM: 3350; 0: the device's)");
  app.add_option("--contexts", contexts, "decode contexts")->delimiter(',');
  app.add_option("--lengths", lengths, "prefill lengths")->delimiter(',');
  app.add_option("--pages", pages, "sparse: selected pages")->delimiter(',');
  CLI11_PARSE(app, argc, argv);
  if (kernels::cuda::device_count() == 0) return fmt::print(stderr, "bench_cuda_attention: no GPU\n"), 1;
  std::setvbuf(stdout, nullptr, _IOLBF, 0);  // each row reaches a log as it is measured (a capped run keeps them)
  if (peak_gbs <= 0) peak_gbs = kernels::cuda::device_peak_gbs(0);  // 0: the device's theoretical figure

  fmt::print("device: {}, theoretical DRAM {:.0f} GB/s (% peak uses {:.0f}), revision {}\n\n",
             kernels::cuda::device_description(0), kernels::cuda::device_peak_gbs(0), peak_gbs, source_revision());
  print_header();
  if (mode == "all" || mode == "decode") bench_decode(contexts, reps, peak_gbs);
  if (mode == "all" || mode == "prefill") bench_prefill(lengths, reps);
  if (mode == "all" || mode == "sparse") bench_sparse(pages, reps, peak_gbs);
  return 0;
}
