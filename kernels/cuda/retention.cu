#include "cuda/retention.cuh"

#include "cuda/cuda_common.cuh"
#include "cuda/select_common.cuh"

namespace inferlab::kernels::cuda {

namespace {

constexpr int kUpdateThreads = 256;

// Thread per (stored token t, kv head g).
__global__ void retention_update_kernel(const RetentionCall c) {
  const int32_t g = blockIdx.y, t = blockIdx.x * kUpdateThreads + threadIdx.x;
  const int32_t cached = c.n_cached[g];
  if (t >= cached + c.n_rows) return;
  float& s = c.plane[int64_t(c.table.pages[int64_t(g) * c.table.stride + t / c.page_size]) * c.page_size +
                     t % c.page_size];
  const float mass = c.mass[int64_t(g) * c.mass_stride + t];
  const float old = t >= cached ? 0.0f : s;  // as the twin: s + mass in float
  s = c.rule == 1 ? mass : old + mass;
  c.scores[int64_t(g) * c.stride + t] = isnan(s) ? -INFINITY : s;
}

// Block per kv head: the candidates' `heavy` best stay (keys above the
// threshold, then the first `need` equal to it), the others are listed.
__global__ void retention_select_kernel(const RetentionCall c) {
  __shared__ SelectShared sm;
  const int32_t g = blockIdx.x;
  const int32_t n = c.n_cached[g] + c.n_rows, sink = c.budget[3 * g], recent = c.budget[3 * g + 1],
                heavy = c.budget[3 * g + 2];
  if (heavy < 0 || int64_t(n) <= int64_t(sink) + recent + heavy) {  // uniform over the block
    if (threadIdx.x == 0) c.n_drops[g] = 0;
    return;
  }
  const int32_t count = n - recent - sink;  // candidates
  const float* score = c.scores + int64_t(g) * c.stride + sink;
  int32_t* out = c.drops + int64_t(g) * c.stride;
  if (threadIdx.x == 0) c.n_drops[g] = count - heavy;
  uint32_t threshold = 0xffffffffu;  // heavy == 0: nothing is greater, none equal is taken
  int32_t need = 0;
  if (heavy > 0) radix_select(score, count, heavy, sm, &threshold, &need);
  int32_t greater_seen = 0, equal_seen = 0;
  for (int32_t first = 0; first < count; first += kSelectThreads) {
    const int32_t p = first + threadIdx.x;
    const uint32_t key = p < count ? order_key(score[p]) : 0u;
    const bool greater = p < count && heavy > 0 && key > threshold;
    const bool equal = p < count && heavy > 0 && key == threshold;
    int32_t before, chunk;
    cub::BlockScan<int32_t, kSelectThreads>(sm.scan).ExclusiveSum(int32_t(greater) | int32_t(equal) << 16, before,
                                                                  chunk);
    const int32_t greater_before = greater_seen + (before & 0xffff), equal_before = equal_seen + (before >> 16);
    const bool kept = greater || (equal && equal_before < need);
    if (p < count && !kept) out[p - greater_before - min(equal_before, need)] = sink + p;
    greater_seen += chunk & 0xffff;
    equal_seen += chunk >> 16;
    __syncthreads();  // sm.scan is reused by the next chunk
  }
}

}  // namespace

cudaError_t retention_update(const RetentionCall& c, int32_t max_tokens, cudaStream_t stream) {
  if (c.n_kv_heads < 0 || c.n_kv_heads > 65535 || c.page_size <= 0 || c.n_rows < 0 || max_tokens < 0 ||
      max_tokens > c.stride || c.mass_stride < max_tokens || (c.rule != 0 && c.rule != 1))
    return cudaErrorInvalidValue;
  if (c.n_kv_heads == 0 || max_tokens == 0) return cudaSuccess;
  if (c.plane == nullptr || c.table.pages == nullptr || c.n_cached == nullptr || c.mass == nullptr ||
      c.scores == nullptr)
    return cudaErrorInvalidValue;
  const dim3 grid(unsigned(ceil_div(max_tokens, kUpdateThreads)), unsigned(c.n_kv_heads));
  retention_update_kernel<<<grid, kUpdateThreads, 0, stream>>>(c);
  return cudaGetLastError();
}

cudaError_t retention_select(const RetentionCall& c, cudaStream_t stream) {
  if (c.n_kv_heads < 0 || c.n_kv_heads > 65535 || c.stride < 0) return cudaErrorInvalidValue;
  if (c.n_kv_heads == 0) return cudaSuccess;
  if (c.n_cached == nullptr || c.budget == nullptr || c.scores == nullptr || c.drops == nullptr ||
      c.n_drops == nullptr)
    return cudaErrorInvalidValue;
  retention_select_kernel<<<unsigned(c.n_kv_heads), kSelectThreads, 0, stream>>>(c);
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
