#include "cuda/sparse_prefill.cuh"

#include <cub/cub.cuh>

#include "cuda/cuda_common.cuh"
#include "cuda/select_common.cuh"

namespace inferlab::kernels::cuda {
namespace {

constexpr int kScoreThreads = 256;

// Key row of stored token t of kv head g (a call with kv, table and head_dim).
template <typename T, typename Call>
__device__ const T* key_of(const Call& c, int32_t g, int32_t t) {
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

// One block per (key block, listed head), a thread per dimension.
template <typename T>
__global__ void pool_keys_kernel(const BlockScoresCall c) {
  const int32_t i = int32_t(blockIdx.y), kb = int32_t(blockIdx.x), h = c.heads[i];
  const int32_t g = h / (c.n_heads / c.n_kv_heads), bs = c.block_size[i];
  const int32_t stored = c.n_cached[g] + c.call_rows, t0 = kb * bs, t1 = min(stored, t0 + bs);
  if (t0 >= stored) return;
  for (int32_t d = int32_t(threadIdx.x); d < c.head_dim; d += blockDim.x) {
    float sum = 0.0f;
    for (int32_t t = t0; t < t1; ++t) sum += to_float<T>(key_of<T>(c, g, t)[d]);
    c.pooled_k[(int64_t(i) * c.max_kb + kb) * c.head_dim + d] = sum / float(t1 - t0);
  }
}

// One block per (query block of the call, listed head), a thread per dimension.
__global__ void pool_rows_kernel(const BlockScoresCall c) {
  const int32_t i = int32_t(blockIdx.y), b = int32_t(blockIdx.x), h = c.heads[i];
  const int32_t g = h / (c.n_heads / c.n_kv_heads), bs = c.block_size[i], cached = c.n_cached[g];
  const int32_t qb = cached / bs + b;
  const int32_t r0 = max(qb * bs, cached) - cached, r1 = min(qb * bs + bs, cached + c.call_rows) - cached;
  if (r0 >= r1) return;
  for (int32_t d = int32_t(threadIdx.x); d < c.head_dim; d += blockDim.x) {
    float sum = 0.0f;
    for (int32_t r = r0; r < r1; ++r) sum += c.q[int64_t(r) * c.n_heads * c.head_dim + int64_t(h) * c.head_dim + d];
    c.pooled_q[(int64_t(i) * c.max_qb + b) * c.head_dim + d] = sum / float(r1 - r0);
  }
}

// One block per (query block, listed head), a thread per key block <= qb.
__global__ void block_dot_kernel(const BlockScoresCall c) {
  extern __shared__ float pq[];
  const int32_t i = int32_t(blockIdx.y), b = int32_t(blockIdx.x), h = c.heads[i];
  const int32_t g = h / (c.n_heads / c.n_kv_heads), bs = c.block_size[i], cached = c.n_cached[g];
  const int32_t qb = cached / bs + b;
  if (qb * bs >= cached + c.call_rows) return;
  const int32_t hd = c.head_dim;
  for (int32_t d = int32_t(threadIdx.x); d < hd; d += blockDim.x) pq[d] = c.pooled_q[(int64_t(i) * c.max_qb + b) * hd + d];
  __syncthreads();
  float* out = c.scores + int64_t(c.segment_at[i] + b) * c.stride;
  for (int32_t kb = int32_t(threadIdx.x); kb <= qb; kb += blockDim.x) {
    const float* k = c.pooled_k + (int64_t(i) * c.max_kb + kb) * hd;
    float dot = 0.0f;
    for (int32_t d = 0; d < hd; ++d) dot += pq[d] * k[d];
    out[kb] = dot;
  }
}

// One thread per (block, listed head): the block's ranges, merged, then its
// columns outside them, and the keys its rows read.
__global__ void build_plan_kernel(const SparseBuildCall c) {
  const int32_t j = int32_t(blockIdx.x * blockDim.x + threadIdx.x);
  const SparseBuildHead& hd = c.heads[blockIdx.y];
  if (j >= hd.n_blocks) return;
  const int32_t bs = hd.block_size, q0 = (hd.first_block + j) * bs, q1 = min(q0 + bs, hd.row_end);
  const int64_t r0 = max(q0, hd.row_begin), r1 = q1;
  int32_t* ranges = c.ranges + 2 * (int64_t(hd.range_base) + int64_t(j) * hd.range_room);
  int32_t n = 0;
  auto add = [&](int32_t b, int32_t e) {
    b = max(b, 0);
    e = min(e, q1);
    if (b >= e) return;
    if (n > 0 && b <= ranges[2 * n - 1]) {
      ranges[2 * n - 1] = max(ranges[2 * n - 1], e);
    } else {
      ranges[2 * n] = b;
      ranges[2 * n + 1] = e;
      ++n;
    }
  };
  if (hd.kind == 1) {
    for (int32_t k = hd.n_diagonals - 1; k >= 0; --k) add(q0 - hd.diagonals[k], q0 + bs - hd.diagonals[k]);
  } else {
    const int32_t* kbs = hd.key_blocks + int64_t(j) * hd.key_block_stride;
    for (int32_t k = 0; k < hd.key_block_count[j]; ++k) add(kbs[k] * bs, kbs[k] * bs + bs);
  }
  const int32_t b = hd.at + j;
  c.range_begin[b] = int32_t((ranges - c.ranges) / 2);
  c.range_end[b] = c.range_begin[b] + n;
  int64_t reads = 0;
  for (int32_t k = 0; k < n; ++k) reads += sparse_range_reads(r0, r1, ranges[2 * k], ranges[2 * k + 1]);
  int32_t* columns = c.columns + int64_t(hd.column_base) + int64_t(j) * hd.column_room;
  int32_t m = 0, at = 0;
  for (int32_t k = 0; hd.kind == 1 && k < hd.n_columns; ++k) {
    const int32_t col = hd.columns[k];
    if (col < 0) continue;
    if (col >= q1) break;
    while (at < n && ranges[2 * at + 1] <= col) ++at;
    if (at < n && ranges[2 * at] <= col) continue;  // inside a range
    columns[m++] = col;
    reads += sparse_range_reads(r0, r1, col, col + 1);
  }
  c.column_begin[b] = int32_t(columns - c.columns);
  c.column_end[b] = c.column_begin[b] + m;
  atomicAdd(c.keys_read, static_cast<unsigned long long>(reads));
}

template <typename T>
cudaError_t launch_pool_keys(const BlockScoresCall& c, cudaStream_t stream) {
  pool_keys_kernel<T><<<dim3(unsigned(c.max_kb), unsigned(c.n_list)), 128, 0, stream>>>(c);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_scores(const VerticalSlashCall& c, cudaStream_t stream) {
  const dim3 grid(unsigned(c.max_last_q), unsigned(c.n_list));
  vertical_slash_kernel<T><<<grid, kScoreThreads, size_t(c.head_dim) * sizeof(float), stream>>>(c);
  return cudaGetLastError();
}

}  // namespace

cudaError_t vertical_slash_scores(const VerticalSlashCall& c, cudaStream_t stream) {
  if (c.kv.planes.active()) return cudaErrorInvalidValue;  // reads elements
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

cudaError_t block_scores(const BlockScoresCall& c, cudaStream_t stream) {
  if (c.kv.planes.active()) return cudaErrorInvalidValue;  // reads elements
  if (c.n_list <= 0 || c.max_qb <= 0) return cudaSuccess;
  cudaError_t e = cudaErrorInvalidValue;
  switch (c.kv.dtype) {
    case DType::F16: e = launch_pool_keys<__half>(c, stream); break;
    case DType::BF16: e = launch_pool_keys<__nv_bfloat16>(c, stream); break;
    case DType::F32: e = launch_pool_keys<float>(c, stream); break;
  }
  if (e != cudaSuccess) return e;
  const dim3 grid(unsigned(c.max_qb), unsigned(c.n_list));
  pool_rows_kernel<<<grid, 128, 0, stream>>>(c);
  if (auto err = cudaGetLastError(); err != cudaSuccess) return err;
  block_dot_kernel<<<grid, 256, size_t(c.head_dim) * sizeof(float), stream>>>(c);
  return cudaGetLastError();
}

cudaError_t build_sparse_plan(const SparseBuildCall& c, cudaStream_t stream) {
  if (c.n_list <= 0 || c.max_blocks <= 0) return cudaSuccess;
  const dim3 grid(unsigned((c.max_blocks + 127) / 128), unsigned(c.n_list));
  build_plan_kernel<<<grid, 128, 0, stream>>>(c);
  return cudaGetLastError();
}

cudaError_t top_k_segments(const TopKCall& c, cudaStream_t stream) {
  if (c.n_segments <= 0) return cudaSuccess;
  top_k_kernel<<<unsigned(c.n_segments), kSelectThreads, 0, stream>>>(c);
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
