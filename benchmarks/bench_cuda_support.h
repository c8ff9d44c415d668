// Shared by the CUDA kernel benchmarks: a CUDA call that returns 1 from the
// calling function on failure, naming the call, and event timing.
#pragma once

#include <cuda_runtime.h>
#include <fmt/format.h>

#define BENCH_CUDA(expr)                                                                              \
  do {                                                                                                \
    if (cudaError_t e_ = (expr); e_ != cudaSuccess)                                                   \
      return fmt::print(stderr, "bench: {}: {}\n", #expr, cudaGetErrorString(e_)), 1;                \
  } while (0)

namespace inferlab::bench {

// Mean microseconds of `body` over `repeats` launches on the default stream
// (after 5 warm-up launches).
template <typename F>
double time_us(int repeats, F&& body) {
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  for (int i = 0; i < 5; ++i) body();
  cudaEventRecord(a);
  for (int i = 0; i < repeats; ++i) body();
  cudaEventRecord(b);
  cudaEventSynchronize(b);
  float ms = 0;
  cudaEventElapsedTime(&ms, a, b);
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return double(ms) * 1e3 / repeats;
}

}  // namespace inferlab::bench
