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

__global__ void sequence_retention_update_kernel(const SequenceRetentionCall c) {
  const int32_t t = blockIdx.x * kUpdateThreads + threadIdx.x;
  if (t >= c.n_tokens) return;
  float& s = c.score[c.positions[t]];
  float sum = s;  // as the twin: the old score, then each head's mass in order
  for (int32_t g = 0; g < c.n_kv_heads; ++g) sum += c.mass[int64_t(g) * c.mass_stride + t];
  s = sum;
}

// One block: (A) candidates (not dropped by a shallower layer) compacted in
// stored order with their scores; (B) the threshold of the heavy best among the
// middle ones; (C) which candidates stay; (D) the leaving stored indices in
// order, marked as dropped here.
__global__ void sequence_retention_select_kernel(const SequenceRetentionCall c) {
  __shared__ SelectShared sm;
  const int32_t n = c.n_tokens;
  int32_t* cand_token = c.scratch;                            // (n) stored index of candidate i
  float* cand_score = reinterpret_cast<float*>(c.scratch + n);  // (n)
  int32_t* stays = c.scratch + 2 * n;                          // (n) per stored index
  auto forced = [&](int32_t t) {
    const int32_t mark = c.dropped_at[c.positions[t]];
    return mark > 0 && mark <= c.layer;
  };
  int32_t count = 0;  // candidates so far (uniform)
  for (int32_t first = 0; first < n; first += kSelectThreads) {
    const int32_t t = first + threadIdx.x;
    const bool candidate = t < n && !forced(t);
    if (t < n && !candidate) stays[t] = 0;
    int32_t before, chunk;
    cub::BlockScan<int32_t, kSelectThreads>(sm.scan).ExclusiveSum(int32_t(candidate), before, chunk);
    if (candidate) {
      const float s = c.score[c.positions[t]];
      cand_token[count + before] = t;
      cand_score[count + before] = isnan(s) ? -INFINITY : s;
    }
    count += chunk;
    __syncthreads();
  }
  const bool budget = c.heavy >= 0 && int64_t(count) > int64_t(c.sink) + c.recent + c.heavy;
  const int32_t middle = count - c.sink - c.recent;
  uint32_t threshold = 0xffffffffu;
  int32_t need = 0;
  if (budget && c.heavy > 0) radix_select(cand_score + c.sink, middle, c.heavy, sm, &threshold, &need);
  __syncthreads();
  int32_t equal_seen = 0;
  for (int32_t first = 0; first < count; first += kSelectThreads) {
    const int32_t i = first + threadIdx.x;
    const bool mid = budget && i < count && i >= c.sink && i < count - c.recent;
    const uint32_t key = mid ? order_key(cand_score[i]) : 0u;
    const bool greater = mid && c.heavy > 0 && key > threshold, equal = mid && c.heavy > 0 && key == threshold;
    int32_t before, chunk;
    cub::BlockScan<int32_t, kSelectThreads>(sm.scan).ExclusiveSum(int32_t(equal), before, chunk);
    if (i < count) stays[cand_token[i]] = !mid || greater || (equal && equal_seen + before < need);
    equal_seen += chunk;
    __syncthreads();
  }
  int32_t leaving = 0;
  for (int32_t first = 0; first < n; first += kSelectThreads) {
    const int32_t t = first + threadIdx.x;
    const bool leaves = t < n && stays[t] == 0;
    int32_t before, chunk;
    cub::BlockScan<int32_t, kSelectThreads>(sm.scan).ExclusiveSum(int32_t(leaves), before, chunk);
    if (leaves) {
      c.drops[leaving + before] = t;
      if (!forced(t)) c.dropped_at[c.positions[t]] = c.layer + 1;
    }
    leaving += chunk;
    __syncthreads();
  }
  if (threadIdx.x == 0) c.n_drops[0] = leaving;
}

}  // namespace

cudaError_t sequence_retention_update(const SequenceRetentionCall& c, cudaStream_t stream) {
  if (c.n_tokens < 0 || c.n_kv_heads < 0 || c.mass_stride < c.n_tokens) return cudaErrorInvalidValue;
  if (c.n_tokens == 0 || c.n_kv_heads == 0) return cudaSuccess;
  if (c.positions == nullptr || c.mass == nullptr || c.score == nullptr) return cudaErrorInvalidValue;
  sequence_retention_update_kernel<<<unsigned(ceil_div(c.n_tokens, kUpdateThreads)), kUpdateThreads, 0, stream>>>(c);
  return cudaGetLastError();
}

cudaError_t sequence_retention_select(const SequenceRetentionCall& c, cudaStream_t stream) {
  if (c.n_tokens < 0 || c.layer < 0) return cudaErrorInvalidValue;
  if (c.positions == nullptr || c.score == nullptr || c.dropped_at == nullptr || c.scratch == nullptr ||
      c.drops == nullptr || c.n_drops == nullptr)
    return cudaErrorInvalidValue;
  sequence_retention_select_kernel<<<1, kSelectThreads, 0, stream>>>(c);
  return cudaGetLastError();
}

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
