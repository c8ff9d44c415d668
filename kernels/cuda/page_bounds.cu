// Quest's key bounds and selection by bound. The selection is two kernels, so
// it can be captured in a graph: a warp per candidate page writes its score to
// the caller's scratch, then a block per kv head radix-selects the best
// scores and compacts the chosen pages in index order (block scans from CUB).
// Per query head: a warp per page scores it for each head of the group, a
// block per query head radix-selects and marks its pages in a per-page mask,
// then a block per kv head compacts the marked pages (the union) and masks.
#include "cuda/page_bounds.cuh"

#include <algorithm>

#include "cuda/block_reduce.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"
#include "cuda/select_common.cuh"

namespace inferlab::kernels::cuda {

namespace {

constexpr int kScoreWarps = 8;        // pages per scoring block, a warp each

// Block per listed page; a thread per channel keeps its running extrema, in the
// twin's order and with its comparisons, so the stored bounds are bit-identical.
template <typename T>
__global__ void page_bounds_kernel(const KvPages kv, T* bounds, const int32_t* pages, const int32_t* counts) {
  const int32_t page = pages[blockIdx.x], count = min(counts[blockIdx.x], kv.page_size);
  if (count <= 0) return;  // an unused slot (a replayed step stages one per head)
  const T* keys = page_base<T>(kv, page);  // (page_size, head_dim) K rows
  T* out = bounds + int64_t(page) * 2 * kv.head_dim;
  for (int32_t i = threadIdx.x; i < kv.head_dim; i += blockDim.x) {
    float lo = INFINITY, hi = -INFINITY;
    for (int32_t slot = 0; slot < count; ++slot) {
      const float x = to_float(keys[int64_t(slot) * kv.head_dim + i]);
      lo = x < lo ? x : lo;  // std::min(lo, x)
      hi = hi < x ? x : hi;  // std::max(hi, x)
    }
    out[i] = from_float<T>(lo);
    out[kv.head_dim + i] = from_float<T>(hi);
  }
}

// Logical pages of kv head g, at most max_pages (the launch's bound on them).
__device__ __forceinline__ int32_t head_pages(const PageSelectCall& c, int32_t g, int32_t max_pages) {
  return int32_t(min((int64_t(c.n_cached[g]) + c.page_size - 1) / c.page_size, int64_t(max_pages)));
}

// Block (slice of kScoreWarps candidate pages, kv head g); a warp per page,
// its lanes over channels.
template <typename T>
__global__ void page_score_kernel(const PageSelectCall c, int32_t max_pages) {
  const int32_t g = blockIdx.y, lane = threadIdx.x % 32;
  const int32_t p = blockIdx.x * kScoreWarps + threadIdx.x / 32;
  if (c.keep[g] <= 0 || p + 1 >= head_pages(c, g, max_pages)) return;  // whole warps leave
  const int32_t hd = c.head_dim;
  const T* bound = static_cast<const T*>(c.bounds) + int64_t(c.table.pages[int64_t(g) * c.table.stride + p]) * 2 * hd;
  const float* q = c.q + int64_t(g) * c.group_size * hd;  // (group_size, head_dim)
  float score = 0.0f;
  for (int32_t i = lane; i < hd; i += 32) {
    const float lo = to_float(bound[i]), hi = to_float(bound[hd + i]);
    for (int32_t h = 0; h < c.group_size; ++h) {
      const float qi = q[int64_t(h) * hd + i];
      score += fmaxf(qi * lo, qi * hi);
    }
  }
  score = warp_sum(score);
  if (lane == 0) c.scores[int64_t(g) * c.score_stride + p] = isnan(score) ? -INFINITY : score;  // as the twin
}

// Per query head: block (slice of kScoreWarps candidate pages, kv head g); a
// warp per page writes one score per query head h of the group, at
// scores[(g * group_size + h) * score_stride + p].
template <typename T>
__global__ void page_score_heads_kernel(const PageSelectCall c, int32_t max_pages) {
  const int32_t g = blockIdx.y, lane = threadIdx.x % 32;
  const int32_t p = blockIdx.x * kScoreWarps + threadIdx.x / 32;
  if (c.keep[g] <= 0 || p + 1 >= head_pages(c, g, max_pages)) return;  // whole warps leave
  const int32_t hd = c.head_dim;
  const T* bound = static_cast<const T*>(c.bounds) + int64_t(c.table.pages[int64_t(g) * c.table.stride + p]) * 2 * hd;
  for (int32_t h = 0; h < c.group_size; ++h) {
    const float* q = c.q + (int64_t(g) * c.group_size + h) * hd;
    float score = 0.0f;
    for (int32_t i = lane; i < hd; i += 32) {
      const float qi = q[i];
      score += fmaxf(qi * to_float(bound[i]), qi * to_float(bound[hd + i]));
    }
    score = warp_sum(score);
    if (lane == 0)
      c.scores[(int64_t(g) * c.group_size + h) * c.score_stride + p] = isnan(score) ? -INFINITY : score;
  }
}

// Block per kv head: out[out_offset[g] ...] = the keep - 1 best candidates
// (keys above the threshold, then the first `need` equal to it), ascending,
// then the last page.
__global__ void page_select_kernel(const PageSelectCall c, int32_t max_pages) {
  __shared__ SelectShared sm;
  const int32_t g = blockIdx.x, keep = c.keep[g], n_pages = head_pages(c, g, max_pages);
  if (keep <= 0 || n_pages <= 0) return;  // uniform over the block
  const int32_t n = n_pages - 1, k = min(keep - 1, n);
  int32_t* out = c.out + c.out_offset[g];
  if (threadIdx.x == 0) out[k] = n_pages - 1;
  if (k == 0) return;
  const float* score = c.scores + int64_t(g) * c.score_stride;
  uint32_t threshold;
  int32_t need;
  radix_select(score, n, k, sm, &threshold, &need);
  // A chosen page's slot: the greater keys before it plus the equal ones taken
  // before it. One scan counts both: greater in the low 16 bits, equal above.
  int32_t greater_seen = 0, equal_seen = 0;
  for (int32_t first = 0; first < n; first += kSelectThreads) {
    const int32_t p = first + threadIdx.x;
    const uint32_t key = p < n ? order_key(score[p]) : 0u;
    const bool greater = p < n && key > threshold, equal = p < n && key == threshold;
    int32_t before, chunk;
    cub::BlockScan<int32_t, kSelectThreads>(sm.scan).ExclusiveSum(int32_t(greater) | int32_t(equal) << 16, before,
                                                                  chunk);
    const int32_t greater_before = greater_seen + (before & 0xffff), equal_before = equal_seen + (before >> 16);
    if (greater || (equal && equal_before < need)) out[greater_before + min(equal_before, need)] = p;
    greater_seen += chunk & 0xffff;
    equal_seen += chunk >> 16;
    if (greater_seen + min(equal_seen, need) == k) break;  // uniform: the aggregate reaches every thread
    __syncthreads();  // sm.scan is reused by the next chunk
  }
}

// Per query head: block per (kv head g, query head h of its group): h's
// keep - 1 best candidates and the last page get bit h in marks[g * stride + p]
// (zeroed before).
__global__ void page_select_heads_kernel(const PageSelectCall c, int32_t max_pages) {
  __shared__ SelectShared sm;
  const int32_t g = blockIdx.x / c.group_size, h = blockIdx.x % c.group_size;
  const int32_t keep = c.keep[g], n_pages = head_pages(c, g, max_pages);
  if (keep <= 0 || n_pages <= 0) return;  // uniform over the block
  const int32_t n = n_pages - 1, k = min(keep - 1, n);
  uint32_t* marks = c.marks + int64_t(g) * c.score_stride;
  const uint32_t bit = 1u << h;
  if (threadIdx.x == 0) atomicOr(&marks[n_pages - 1], bit);
  if (k == 0) return;
  const float* score = c.scores + (int64_t(g) * c.group_size + h) * c.score_stride;
  uint32_t threshold;
  int32_t need;
  radix_select(score, n, k, sm, &threshold, &need);
  // The greater keys all, and the first `need` keys equal to the threshold.
  int32_t equal_seen = 0, taken = 0;
  for (int32_t first = 0; first < n; first += kSelectThreads) {
    const int32_t p = first + threadIdx.x;
    const uint32_t key = p < n ? order_key(score[p]) : 0u;
    const bool greater = p < n && key > threshold, equal = p < n && key == threshold;
    int32_t before, chunk;
    cub::BlockScan<int32_t, kSelectThreads>(sm.scan).ExclusiveSum(int32_t(equal) | int32_t(greater) << 16, before,
                                                                  chunk);
    if (greater || (equal && equal_seen + (before & 0xffff) < need)) atomicOr(&marks[p], bit);
    equal_seen += chunk & 0xffff;
    taken += chunk >> 16;
    if (taken + min(equal_seen, need) == k) break;  // uniform: the aggregate reaches every thread
    __syncthreads();  // sm.scan is reused by the next chunk
  }
}

// Per query head: block per kv head g: the marked pages (the union of its
// heads' selections) ascending at the end of its group * (keep - 1) + 1
// slots, their masks beside them, -1 and 0 in the slots left over.
__global__ void page_union_kernel(const PageSelectCall c, int32_t max_pages) {
  __shared__ cub::BlockScan<int32_t, kSelectThreads>::TempStorage scan;
  const int32_t g = blockIdx.x, keep = c.keep[g], n_pages = head_pages(c, g, max_pages);
  if (keep <= 0 || n_pages <= 0) return;  // uniform over the block
  const uint32_t* marks = c.marks + int64_t(g) * c.score_stride;
  const int32_t slots = c.group_size * (keep - 1) + 1;
  int32_t count = 0;
  for (int32_t first = 0; first < n_pages; first += kSelectThreads) {
    const int32_t p = first + threadIdx.x;
    count += __syncthreads_count(p < n_pages && marks[p] != 0u);
  }
  int32_t* out = c.out + c.out_offset[g];
  uint32_t* out_heads = c.out_heads + c.out_offset[g];
  for (int32_t j = threadIdx.x; j < slots - count; j += kSelectThreads) {
    out[j] = -1;
    out_heads[j] = 0u;
  }
  int32_t seen = slots - count;
  for (int32_t first = 0; first < n_pages; first += kSelectThreads) {
    const int32_t p = first + threadIdx.x;
    const uint32_t mark = p < n_pages ? marks[p] : 0u;
    int32_t before, chunk;
    cub::BlockScan<int32_t, kSelectThreads>(scan).ExclusiveSum(int32_t(mark != 0u), before, chunk);
    if (mark != 0u) {
      out[seen + before] = p;
      out_heads[seen + before] = mark;
    }
    seen += chunk;
    __syncthreads();  // scan is reused by the next chunk
  }
}

}  // namespace

cudaError_t page_bounds_update(const KvPages& kv, void* bounds, const int32_t* pages, const int32_t* counts,
                               int32_t n, cudaStream_t stream) {
  if (!valid_element_pages(kv) || n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (bounds == nullptr || pages == nullptr || counts == nullptr) return cudaErrorInvalidValue;
  INFERLAB_DISPATCH_DTYPE(kv.dtype, T,
    page_bounds_kernel<T><<<unsigned(n), row_threads(kv.head_dim), 0, stream>>>(kv, static_cast<T*>(bounds), pages, counts));
  return cudaGetLastError();
}

cudaError_t page_select(const PageSelectCall& c, int32_t max_pages, cudaStream_t stream) {
  if (c.n_kv_heads < 0 || c.n_kv_heads > 65535 || c.group_size <= 0 || c.head_dim <= 0 || c.page_size <= 0 ||
      !valid_dtype(c.dtype) || c.table.stride < 0 || max_pages < 0 || max_pages > c.score_stride)
    return cudaErrorInvalidValue;
  if (c.n_kv_heads == 0 || max_pages == 0) return cudaSuccess;
  if (c.bounds == nullptr || c.table.pages == nullptr || c.q == nullptr || c.n_cached == nullptr ||
      c.keep == nullptr || c.out_offset == nullptr || c.out == nullptr || c.scores == nullptr)
    return cudaErrorInvalidValue;
  // Stream order makes the selection wait for every score.
  const dim3 score_grid(unsigned(ceil_div(max_pages, kScoreWarps)), unsigned(c.n_kv_heads));
  if (c.per_head != 0) {
    if (c.group_size > 32 || c.out_heads == nullptr || c.marks == nullptr) return cudaErrorInvalidValue;
    const cudaError_t zeroed =
        cudaMemsetAsync(c.marks, 0, size_t(c.n_kv_heads) * size_t(c.score_stride) * sizeof(uint32_t), stream);
    if (zeroed != cudaSuccess) return zeroed;
    INFERLAB_DISPATCH_DTYPE(c.dtype, T,
      page_score_heads_kernel<T><<<score_grid, kScoreWarps * 32, 0, stream>>>(c, max_pages));
    page_select_heads_kernel<<<unsigned(c.n_kv_heads * c.group_size), kSelectThreads, 0, stream>>>(c, max_pages);
    page_union_kernel<<<unsigned(c.n_kv_heads), kSelectThreads, 0, stream>>>(c, max_pages);
    return cudaGetLastError();
  }
  INFERLAB_DISPATCH_DTYPE(c.dtype, T, page_score_kernel<T><<<score_grid, kScoreWarps * 32, 0, stream>>>(c, max_pages));
  page_select_kernel<<<unsigned(c.n_kv_heads), kSelectThreads, 0, stream>>>(c, max_pages);
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
