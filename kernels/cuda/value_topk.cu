#include "cuda/value_topk.cuh"

#include <algorithm>
#include <cmath>
#include <type_traits>

#include "bit_planes.h"
#include "cuda/attention_common.cuh"
#include "cuda/launch_checks.cuh"
#include "cuda/select_common.cuh"

namespace inferlab::kernels::cuda {

namespace {

using namespace attn;

constexpr int kThreads = kSelectThreads;  // the radix select and its scans take the whole block
constexpr int kMaxHeadDim = 128;

// The row type of bit-plane pages (records, read through bit_plane_value).
struct PlaneRecord {};

// A block-wide reduction every thread gets; `red` holds kThreads / 32 values.
template <typename V, typename Op>
__device__ V block_reduce(V v, V* red, Op op) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  for (int o = 16; o > 0; o >>= 1) v = op(v, __shfl_xor_sync(kFullMask, v, o));
  __syncthreads();  // `red` may still be read by a previous call
  if (lane == 0) red[warp] = v;
  __syncthreads();
  V t = red[0];
  for (int w = 1; w < kThreads / 32; ++w) t = op(t, red[w]);
  return t;
}
__device__ __forceinline__ float add_f(float a, float b) { return a + b; }
__device__ __forceinline__ float max_f(float a, float b) { return fmaxf(a, b); }
__device__ __forceinline__ int32_t add_i(int32_t a, int32_t b) { return a + b; }

// The bit-plane record of stored token t's K row in kv head g; its V record
// is page_size records further.
__device__ __forceinline__ const uint8_t* key_record(const AttentionCall& c, int32_t g, int32_t t) {
  const int32_t page = c.table.pages[int64_t(g) * c.table.stride + t / c.kv.page_size];
  return static_cast<const uint8_t*>(c.kv.chunk_base[page / c.kv.pages_per_chunk]) +
         (int64_t(page % c.kv.pages_per_chunk) * 2 * c.kv.page_size + t % c.kv.page_size) * c.kv.row_bytes();
}

// q (scaled, in shared memory) . the K row of stored token t; bit-plane rows
// from their MSB planes alone or (full) both.
template <typename T>
__device__ float key_dot(const AttentionCall& c, const float* q, int32_t g, int32_t t, bool full) {
  float acc = 0.0f;
  if constexpr (std::is_same_v<T, PlaneRecord>) {
    const uint8_t* kr = key_record(c, g, t);
    for (int d = 0; d < c.head_dim; ++d) acc += q[d] * bit_plane_value(kr, c.head_dim, c.kv.planes, d, full);
  } else {
    const T* kr = key_row<T>(c, g, t);
    for (int d = 0; d < c.head_dim; ++d) acc += q[d] * to_float<T>(kr[d]);
  }
  return acc;
}

// Element d of the V row of stored token t.
template <typename T>
__device__ __forceinline__ float value_at(const AttentionCall& c, int32_t g, int32_t t, int d, bool full) {
  if constexpr (std::is_same_v<T, PlaneRecord>) {
    const uint8_t* vr = key_record(c, g, t) + int64_t(c.kv.page_size) * c.kv.row_bytes();
    return bit_plane_value(vr, c.head_dim, c.kv.planes, d, full);
  } else {
    return to_float<T>(key_row<T>(c, g, t)[int64_t(c.kv.page_size) * c.kv.head_dim + d]);
  }
}

// Scores of the n keys (those the row reads; the others -inf) exponentiated
// against their maximum into p (0 for keys not read). Returns their sum: the
// largest probability is 1 / sum.
template <typename T>
__device__ float exp_scores(const AttentionCall& c, const KeyList& list, int32_t g, uint32_t bit, const float* q,
                            int32_t n, bool full, float* p, float* red) {
  float local_max = -INFINITY;
  for (int32_t k = threadIdx.x; k < n; k += blockDim.x) {
    const float s = (list.key_heads(k) & bit) ? key_dot<T>(c, q, g, list.token(k), full) : -INFINITY;
    p[k] = s;
    local_max = fmaxf(local_max, s);
  }
  const float m = block_reduce(local_max, red, max_f);
  float local_sum = 0.0f;
  for (int32_t k = threadIdx.x; k < n; k += blockDim.x) {
    const float e = (list.key_heads(k) & bit) ? __expf(p[k] - m) : 0.0f;
    p[k] = e;
    local_sum += e;
  }
  return block_reduce(local_sum, red, add_f);
}

struct RowPass {
  int32_t row0 = 0;  // the pass's first row (blockIdx.x is relative to it)
  int32_t max_keys = 0;
  double keep = 1.0;  // double, so ceil(keep * n) rounds as the twin's does
  bool renormalize = false;
  bool msb_first = false;  // bit planes: the MSB planes first, both planes for a row below threshold
  float threshold = 0.0f;
  uint8_t* kept = nullptr;
  int32_t* requant = nullptr;
  float* scratch = nullptr;
};

// Block per (row, query head). Scratch per block: max_keys floats of p (-1 for
// a key the row does not read), then max_keys floats of kept weights.
template <typename T>
__global__ void __launch_bounds__(kThreads) value_topk_kernel(const AttentionCall c, const RowPass pass) {
  const int32_t r = pass.row0 + int32_t(blockIdx.x), h = blockIdx.y, gs = c.group_size(), g = h / gs, D = c.head_dim;
  const int32_t max_keys = pass.max_keys;
  float* out = c.out + (int64_t(r) * c.n_heads + h) * D;
  int32_t* requant = pass.requant != nullptr ? pass.requant + (int64_t(h) * c.n_rows + r) * 3 : nullptr;
  if (!head_active(c, h)) {
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[d] = 0.0f;
    if (requant != nullptr && threadIdx.x < 3) requant[threadIdx.x] = 0;
    return;
  }
  __shared__ float q[kMaxHeadDim];
  __shared__ float red[kThreads / 32];
  __shared__ int32_t ired[kThreads / 32];
  __shared__ SelectShared select;
  float* p = pass.scratch + (int64_t(blockIdx.y) * gridDim.x + blockIdx.x) * 2 * int64_t(max_keys);
  float* w = p + max_keys;
  for (int d = threadIdx.x; d < D; d += blockDim.x) q[d] = c.q[(int64_t(r) * c.n_heads + h) * D + d] * c.scale;
  const KeyList list = warp_key_list(c, g);
  const int32_t n = min(list.n_selected + r + 1, max_keys);  // the keys this row may read
  // Without per-query-head lists every key is read by every head (key_heads
  // is ~0), and the group may then be wider than the 32 bits of a mask.
  const uint32_t bit = list.heads != nullptr ? 1u << (h % gs) : ~0u;
  __syncthreads();
  bool full = !pass.msb_first;
  float sum = exp_scores<T>(c, list, g, bit, q, n, full, p, red);
  // A flat row (its largest probability 1 / sum below the threshold) again
  // from both planes; the decision is the block's (sum is every thread's).
  const bool refetched = pass.msb_first && __frcp_rn(sum) < pass.threshold;
  if (refetched) {
    full = true;
    sum = exp_scores<T>(c, list, g, bit, q, n, full, p, red);
  }
  int32_t local_read = 0, local_cached = 0;
  for (int32_t k = threadIdx.x; k < n; k += blockDim.x) {
    const bool reads = (list.key_heads(k) & bit) != 0;
    p[k] = reads ? p[k] / sum : -1.0f;  // -1: not read (below every probability)
    local_read += reads ? 1 : 0;
    local_cached += reads && k < list.n_selected ? 1 : 0;
    if (reads && c.key_mass != nullptr)
      atomicAdd(&c.key_mass[int64_t(g) * c.mass_stride + list.token(k)], p[k]);
  }
  const int32_t n_read = block_reduce(local_read, ired, add_i);
  const int32_t n_cached_read = block_reduce(local_cached, ired, add_i);
  // The kk-th largest probability (select_common.cuh's radix select), then the
  // keys above it and the first `need` equal to it in key order.
  const int32_t kk = max(1, min(n_read, int32_t(ceil(pass.keep * double(n_read)))));
  uint32_t threshold = 0;
  int32_t need = 0;
  radix_select(p, n, kk, select, &threshold, &need);
  float local_kept = 0.0f;
  int32_t local_kept_cached = 0;
  int32_t equal_seen = 0;  // equal keys in earlier chunks
  for (int32_t base = 0; base < n; base += blockDim.x) {
    const int32_t k = base + threadIdx.x;
    const uint32_t key = k < n ? order_key(p[k]) : 0u;
    const bool equal = k < n && key == threshold;
    int32_t before, chunk;
    cub::BlockScan<int32_t, kSelectThreads>(select.scan).ExclusiveSum(int32_t(equal), before, chunk);
    if (k < n) {
      const bool keep_it = key > threshold || (equal && equal_seen + before < need);
      w[k] = keep_it ? p[k] : 0.0f;
      local_kept += keep_it ? p[k] : 0.0f;
      local_kept_cached += keep_it && k < list.n_selected ? 1 : 0;
      if (pass.kept != nullptr && r == c.n_rows - 1) pass.kept[int64_t(h) * max_keys + k] = keep_it ? 1 : 0;
    }
    equal_seen += chunk;
    __syncthreads();  // select.scan is reused by the next chunk
  }
  const float kept_sum = block_reduce(local_kept, red, add_f);
  const int32_t kept_cached = block_reduce(local_kept_cached, ired, add_i);
  const float norm = pass.renormalize && kept_sum > 0.0f ? 1.0f / kept_sum : 1.0f;
  if (requant != nullptr && threadIdx.x == 0) {
    requant[0] = refetched ? 1 : 0;
    requant[1] = refetched ? n_cached_read : 0;
    requant[2] = refetched ? kept_cached : 0;
  }
  __syncthreads();
  // P·V over the kept keys, in key order, a thread per dimension.
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int32_t k = 0; k < n; ++k) {
      if (w[k] == 0.0f) continue;
      acc += w[k] * value_at<T>(c, g, list.token(k), d, full);
    }
    out[d] = acc * norm;
  }
}

}  // namespace

size_t value_topk_scratch_bytes(const AttentionCall& call, int32_t max_keys) {
  return size_t(call.n_rows) * value_topk_row_scratch_bytes(call, max_keys);
}

size_t value_topk_row_scratch_bytes(const AttentionCall& call, int32_t max_keys) {
  return size_t(call.n_heads) * 2 * size_t(max_keys) * sizeof(float);
}

namespace {

// Shapes both entry points take; no sparse plans. Per-query-head lists mark a
// key's heads in 32 bits, so their groups hold at most 32 query heads.
bool valid_rows_call(const AttentionCall& c, int32_t max_keys, double keep) {
  return c.n_rows >= 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.n_heads % c.n_kv_heads == 0 && c.head_dim > 0 &&
         c.head_dim <= kMaxHeadDim && c.kv.head_dim == c.head_dim && max_keys > 0 && keep > 0.0 && keep <= 1.0 &&
         (c.select_heads == nullptr || c.n_heads <= 32 * c.n_kv_heads) && c.sparse.heads == nullptr &&
         c.q != nullptr && c.out != nullptr && c.n_cached != nullptr && valid_pages(c.kv) && c.table.pages != nullptr;
}

// The rows in passes of as many as the scratch holds (stream order: each pass
// reuses it after the previous one).
template <typename T>
cudaError_t launch_rows(const AttentionCall& call, RowPass pass, size_t scratch_bytes, cudaStream_t stream) {
  const int64_t per_row = int64_t(value_topk_row_scratch_bytes(call, pass.max_keys));
  const int64_t rows = std::min<int64_t>(call.n_rows, int64_t(scratch_bytes) / per_row);
  if (rows <= 0) return cudaErrorInvalidValue;
  for (int32_t r0 = 0; r0 < call.n_rows; r0 += int32_t(rows)) {
    pass.row0 = r0;
    const dim3 grid(unsigned(std::min<int64_t>(rows, call.n_rows - r0)), unsigned(call.n_heads));
    value_topk_kernel<T><<<grid, kThreads, 0, stream>>>(call, pass);
    if (const cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  return cudaSuccess;
}

RowPass row_pass(int32_t max_keys, double keep, bool renormalize, uint8_t* kept, void* scratch) {
  RowPass pass;
  pass.max_keys = max_keys;
  pass.keep = keep;
  pass.renormalize = renormalize;
  pass.kept = kept;
  pass.scratch = static_cast<float*>(scratch);
  return pass;
}

}  // namespace

cudaError_t attention_value_topk(const AttentionCall& call, int32_t max_keys, double keep, bool renormalize,
                                 uint8_t* kept, void* scratch, size_t scratch_bytes, cudaStream_t stream) {
  if (!valid_rows_call(call, max_keys, keep) || call.kv.planes.active() ||
      (call.kv.dtype != DType::F16 && call.kv.dtype != DType::BF16))
    return cudaErrorInvalidValue;
  if (call.n_rows == 0) return cudaSuccess;
  if (scratch == nullptr) return cudaErrorInvalidValue;
  const RowPass pass = row_pass(max_keys, keep, renormalize, kept, scratch);
  if (call.kv.dtype == DType::F16) return launch_rows<__half>(call, pass, scratch_bytes, stream);
  return launch_rows<__nv_bfloat16>(call, pass, scratch_bytes, stream);
}

cudaError_t attention_progressive(const AttentionCall& call, int32_t max_keys, bool msb_first, float threshold,
                                  double keep, bool renormalize, uint8_t* kept, int32_t* requant, void* scratch,
                                  size_t scratch_bytes, cudaStream_t stream) {
  if (!valid_rows_call(call, max_keys, keep) || !call.kv.planes.active() || !(threshold >= 0.0f))
    return cudaErrorInvalidValue;
  if (call.n_rows == 0) return cudaSuccess;
  if (scratch == nullptr) return cudaErrorInvalidValue;
  RowPass pass = row_pass(max_keys, keep, renormalize, kept, scratch);
  pass.msb_first = msb_first;
  pass.threshold = threshold;
  pass.requant = requant;
  return launch_rows<PlaneRecord>(call, pass, scratch_bytes, stream);
}

}  // namespace inferlab::kernels::cuda
