#include "cuda/sparse_prefill.cuh"

#include <cub/cub.cuh>

#include "cuda/cuda_common.cuh"
#include "cuda/select_common.cuh"

namespace inferlab::kernels::cuda {
namespace {

constexpr int kScoreThreads = 256;

template <typename T>
__device__ const T* key_of(const VerticalSlashCall& c, int32_t g, int32_t t) {
  const int32_t ps = c.kv.page_size;
  const int32_t page = c.table.pages[int64_t(g) * c.table.stride + t / ps];
  const T* base = static_cast<const T*>(c.kv.chunk_base[page / c.kv.pages_per_chunk]);
  return base + int64_t(page % c.kv.pages_per_chunk) * c.kv.page_elems() + int64_t(t % ps) * c.head_dim;
}

// One block per (row, listed head): the row's softmax over its keys, computed
// twice (maximum and sum, then the probabilities added to the two arrays).
template <typename T>
__global__ void __launch_bounds__(kScoreThreads) vertical_slash_kernel(const VerticalSlashCall c) {
  extern __shared__ float q_row[];
  __shared__ float red_m[kScoreThreads / 32], red_l[kScoreThreads / 32];
  __shared__ float row_m, row_l;
  const int32_t i = int32_t(blockIdx.y), h = c.heads[i];
  const int32_t g = h / (c.n_heads / c.n_kv_heads);
  const int32_t rows = min(c.last_q[i], c.call_rows), r = int32_t(blockIdx.x);
  if (r >= rows) return;
  const int32_t row = c.call_rows - rows + r, self = c.n_cached[g] + row, hd = c.head_dim;
  for (int32_t d = int32_t(threadIdx.x); d < hd; d += blockDim.x)
    q_row[d] = c.q[int64_t(row) * c.n_heads * hd + int64_t(h) * hd + d];
  __syncthreads();
  auto score = [&](int32_t t) {
    const T* k = key_of<T>(c, g, t);
    float s = 0.0f;
    for (int32_t d = 0; d < hd; ++d) s += q_row[d] * to_float<T>(k[d]);
    return s * c.scale;
  };
  float m = -INFINITY, l = 0.0f;
  for (int32_t t = int32_t(threadIdx.x); t <= self; t += blockDim.x) {
    const float s = score(t);
    const float m_new = fmaxf(m, s);
    l = l * expf(m - m_new) + expf(s - m_new);
    m = m_new;
  }
  // Block reduction of (m, l).
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffffu, m, o), l2 = __shfl_xor_sync(0xffffffffu, l, o);
    const float mm = fmaxf(m, m2);
    l = (m == -INFINITY ? 0.0f : l * expf(m - mm)) + (m2 == -INFINITY ? 0.0f : l2 * expf(m2 - mm));
    m = mm;
  }
  if (threadIdx.x % 32 == 0) {
    red_m[threadIdx.x / 32] = m;
    red_l[threadIdx.x / 32] = l;
  }
  __syncthreads();
  if (threadIdx.x == 0) {
    float bm = -INFINITY, bl = 0.0f;
    for (int w = 0; w < kScoreThreads / 32; ++w) {
      const float mm = fmaxf(bm, red_m[w]);
      bl = (bm == -INFINITY ? 0.0f : bl * expf(bm - mm)) + (red_m[w] == -INFINITY ? 0.0f : red_l[w] * expf(red_m[w] - mm));
      bm = mm;
    }
    row_m = bm;
    row_l = bl;
  }
  __syncthreads();
  const float inv = 1.0f / row_l;
  float* vertical = c.vertical + int64_t(i) * c.stride;
  float* slash = c.slash + int64_t(i) * c.stride;
  for (int32_t t = int32_t(threadIdx.x); t <= self; t += blockDim.x) {
    const float p = expf(score(t) - row_m) * inv;
    atomicAdd(&vertical[t], p);
    atomicAdd(&slash[self - t], p);
  }
}

// One block per segment: +inf below keep_first and -inf for NaN, a radix
// selection of the k-th largest, then the indices of the k best in ascending
// order (ties to the lower index) by block scans over chunks.
__global__ void __launch_bounds__(kSelectThreads) top_k_kernel(const TopKCall c) {
  __shared__ SelectShared sm;
  __shared__ int32_t carry_eq, carry_out;
  const int32_t s = int32_t(blockIdx.x), n = c.n[s];
  const int32_t k = min(c.k[s], n);
  float* score = c.scores + int64_t(s) * c.stride;
  const int32_t keep = c.keep_first != nullptr ? c.keep_first[s] : 0;
  for (int32_t p = int32_t(threadIdx.x); p < n; p += blockDim.x) {
    if (p < keep) score[p] = INFINITY;
    else if (isnan(score[p])) score[p] = -INFINITY;
  }
  __syncthreads();
  if (k <= 0) {
    if (threadIdx.x == 0) c.out_count[s] = 0;
    return;
  }
  uint32_t threshold = 0;
  int32_t need = k;
  if (k < n) radix_select(score, n, k, sm, &threshold, &need);
  if (threadIdx.x == 0) {
    carry_eq = 0;
    carry_out = 0;
  }
  __syncthreads();
  int32_t* out = c.out + int64_t(s) * c.out_stride;
  for (int32_t base = 0; base < n; base += blockDim.x) {
    const int32_t p = base + int32_t(threadIdx.x);
    const uint32_t key = p < n ? order_key(score[p]) : 0u;
    const bool all = k >= n;
    const int32_t equal = (!all && p < n && key == threshold) ? 1 : 0;
    int32_t eq_rank, eq_total;
    cub::BlockScan<int32_t, kSelectThreads>(sm.scan).ExclusiveSum(equal, eq_rank, eq_total);
    __syncthreads();
    const bool take = p < n && (all || key > threshold || (equal && carry_eq + eq_rank < need));
    int32_t at, taken;
    cub::BlockScan<int32_t, kSelectThreads>(sm.scan).ExclusiveSum(take ? 1 : 0, at, taken);
    if (take) out[carry_out + at] = p;
    __syncthreads();
    if (threadIdx.x == 0) {
      carry_eq += eq_total;
      carry_out += taken;
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) c.out_count[s] = carry_out;
}

template <typename T>
cudaError_t launch_scores(const VerticalSlashCall& c, cudaStream_t stream) {
  const dim3 grid(unsigned(c.max_last_q), unsigned(c.n_list));
  vertical_slash_kernel<T><<<grid, kScoreThreads, size_t(c.head_dim) * sizeof(float), stream>>>(c);
  return cudaGetLastError();
}

}  // namespace

cudaError_t vertical_slash_scores(const VerticalSlashCall& c, cudaStream_t stream) {
  if (c.n_list <= 0 || c.max_last_q <= 0) return cudaSuccess;
  const size_t bytes = size_t(c.n_list) * size_t(c.stride) * sizeof(float);
  if (auto e = cudaMemsetAsync(c.vertical, 0, bytes, stream); e != cudaSuccess) return e;
  if (auto e = cudaMemsetAsync(c.slash, 0, bytes, stream); e != cudaSuccess) return e;
  switch (c.kv.dtype) {
    case DType::F16: return launch_scores<__half>(c, stream);
    case DType::BF16: return launch_scores<__nv_bfloat16>(c, stream);
    case DType::F32: return launch_scores<float>(c, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t top_k_segments(const TopKCall& c, cudaStream_t stream) {
  if (c.n_segments <= 0) return cudaSuccess;
  top_k_kernel<<<unsigned(c.n_segments), kSelectThreads, 0, stream>>>(c);
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
