// Sorting and scanning use CUB (ships with the CUDA toolkit, maintained by
// NVIDIA): its radix sort is stable, which gives "lower id first" on ties.
#include "cuda/sampling.cuh"

#include <cub/cub.cuh>

#include <algorithm>

#include "cuda/block_reduce.cuh"
#include "cuda/launch_checks.cuh"

namespace inferlab::kernels::cuda {

namespace {

// One block per row.
__global__ void argmax_rows_kernel(const float* logits, int64_t n, int32_t* out) {
  const float* row = logits + int64_t(blockIdx.x) * n;
  ArgMax best{-INFINITY, INT64_MAX};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) best = argmax_pick(best, ArgMax{row[i], i});
  best = block_argmax(best);
  if (threadIdx.x == 0) out[blockIdx.x] = int32_t(best.index == INT64_MAX ? 0 : best.index);
}

constexpr size_t kAlign = 256;
size_t aligned(size_t bytes) { return (bytes + kAlign - 1) / kAlign * kAlign; }

// Carving of the caller's workspace; every array (n).
struct SampleBuffers {
  float* sorted_logits;
  int32_t* ids;
  int32_t* sorted_ids;
  float* weights;     // exp((logit - max) / temperature), in sorted order
  float* cumulative;  // inclusive prefix sums of weights
  void* cub_temp;
  size_t cub_temp_bytes;
};

size_t cub_temp_bytes(int64_t n) {
  size_t sort_bytes = 0, scan_bytes = 0;
  cub::DeviceRadixSort::SortPairsDescending(nullptr, sort_bytes, static_cast<const float*>(nullptr),
                                            static_cast<float*>(nullptr), static_cast<const int32_t*>(nullptr),
                                            static_cast<int32_t*>(nullptr), int(n));
  cub::DeviceScan::InclusiveSum(nullptr, scan_bytes, static_cast<const float*>(nullptr), static_cast<float*>(nullptr),
                                int(n));
  return std::max(sort_bytes, scan_bytes);
}

SampleBuffers carve(void* workspace, int64_t n) {
  char* p = static_cast<char*>(workspace);
  const size_t array = aligned(size_t(n) * 4);
  SampleBuffers b{};
  b.sorted_logits = reinterpret_cast<float*>(p);
  b.ids = reinterpret_cast<int32_t*>(p + array);
  b.sorted_ids = reinterpret_cast<int32_t*>(p + 2 * array);
  b.weights = reinterpret_cast<float*>(p + 3 * array);
  b.cumulative = reinterpret_cast<float*>(p + 4 * array);
  b.cub_temp = p + 5 * array;
  b.cub_temp_bytes = cub_temp_bytes(n);
  return b;
}

// Sort keys: a NaN logit counts as -infinity and -0 as +0 (the radix sort
// orders bits; the twin compares floats), with the ids to sort along.
__global__ void sort_input_kernel(const float* logits, int64_t n, float* keys, int32_t* ids) {
  INFERLAB_GRID_STRIDE(i, n) {
    const float x = logits[i];
    keys[i] = isnan(x) ? -INFINITY : x == 0.0f ? 0.0f : x;
    ids[i] = int32_t(i);
  }
}

__global__ void softmax_weights_kernel(const float* sorted_logits, int64_t n, float inv_temperature, float* weights) {
  const float max_logit = sorted_logits[0];
  INFERLAB_GRID_STRIDE(i, n) weights[i] = expf((sorted_logits[i] - max_logit) * inv_temperature);
}

// First index in [0, last] whose value passes `pred` (last when none does);
// values are non-decreasing, so pred is monotone.
template <typename Pred>
__device__ int64_t first_passing(const float* values, int64_t last, Pred pred) {
  int64_t lo = 0, hi = last;
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (pred(values[mid])) hi = mid; else lo = mid + 1;
  }
  return lo;
}

// One thread: two binary searches over the cumulative weights.
__global__ void pick_kernel(const float* cumulative, const int32_t* sorted_ids, int64_t n, bool greedy, float top_p,
                            float uniform, int32_t* out) {
  if (greedy) {
    *out = sorted_ids[0];
    return;
  }
  const float need = top_p * cumulative[n - 1];
  const int64_t last = first_passing(cumulative, n - 1, [&](float c) { return c >= need; });
  const float target = uniform * cumulative[last];
  *out = sorted_ids[first_passing(cumulative, last, [&](float c) { return c > target; })];
}

}  // namespace

cudaError_t argmax_rows(const float* logits, int64_t rows, int64_t n, int32_t* out, cudaStream_t stream) {
  if (rows < 0 || rows > kMaxGridX || n <= 0 || n > INT32_MAX) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  argmax_rows_kernel<<<unsigned(rows), 1024, 0, stream>>>(logits, n, out);
  return cudaGetLastError();
}

size_t sample_workspace_bytes(int64_t n) {
  if (n <= 0 || n > INT32_MAX) return 0;
  return 5 * aligned(size_t(n) * 4) + aligned(cub_temp_bytes(n));
}

cudaError_t sample_top_p(const float* logits, int64_t n, float temperature, float top_p, float uniform, int32_t* out,
                         void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  if (n <= 0 || n > INT32_MAX || !(uniform >= 0.0f && uniform < 1.0f) || workspace == nullptr ||
      workspace_bytes < sample_workspace_bytes(n))
    return cudaErrorInvalidValue;
  const SampleBuffers b = carve(workspace, n);
  const unsigned blocks = grid_stride_blocks(n, 256);
  // The weights' array holds the sort keys until the weights are computed.
  sort_input_kernel<<<blocks, 256, 0, stream>>>(logits, n, b.weights, b.ids);
  size_t temp_bytes = b.cub_temp_bytes;
  cudaError_t err = cub::DeviceRadixSort::SortPairsDescending(b.cub_temp, temp_bytes, b.weights, b.sorted_logits,
                                                              b.ids, b.sorted_ids, int(n), 0, 32, stream);
  if (err != cudaSuccess) return err;
  const bool greedy = !(temperature > 0.0f);
  if (!greedy) {
    softmax_weights_kernel<<<blocks, 256, 0, stream>>>(b.sorted_logits, n, 1.0f / temperature, b.weights);
    temp_bytes = b.cub_temp_bytes;
    err = cub::DeviceScan::InclusiveSum(b.cub_temp, temp_bytes, b.weights, b.cumulative, int(n), stream);
    if (err != cudaSuccess) return err;
  }
  pick_kernel<<<1, 1, 0, stream>>>(b.cumulative, b.sorted_ids, n, greedy, top_p, uniform, out);
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
