#include "cuda/value_topk.cuh"

#include <cmath>

#include "cuda/attention_common.cuh"
#include "cuda/launch_checks.cuh"
#include "cuda/select_common.cuh"

namespace inferlab::kernels::cuda {

namespace {

using namespace attn;

constexpr int kThreads = kSelectThreads;  // the radix select and its scans take the whole block
constexpr int kMaxHeadDim = 128;

__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

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

// Block per (row, query head). Scratch per block: max_keys floats of p (-1 for
// a key the row does not read), then max_keys floats of kept weights.
template <typename T>
__global__ void value_topk_kernel(const AttentionCall c, int32_t max_keys, float keep, bool renormalize,
                                  uint8_t* kept_out, float* scratch) {
  const int32_t r = blockIdx.x, h = blockIdx.y, gs = c.group_size(), g = h / gs, D = c.head_dim;
  float* out = c.out + (int64_t(r) * c.n_heads + h) * D;
  if (!head_active(c, h)) {
    for (int d = threadIdx.x; d < D; d += blockDim.x) out[d] = 0.0f;
    return;
  }
  __shared__ float q[kMaxHeadDim];
  __shared__ float red[kThreads / 32];
  __shared__ int32_t ired[kThreads / 32];
  __shared__ SelectShared select;
  float* p = scratch + (int64_t(h) * c.n_rows + r) * 2 * int64_t(max_keys);
  float* w = p + max_keys;
  for (int d = threadIdx.x; d < D; d += blockDim.x) q[d] = c.q[(int64_t(r) * c.n_heads + h) * D + d] * c.scale;
  const KeyList list = warp_key_list(c, g);
  const int32_t n = min(list.n_selected + r + 1, max_keys);  // the keys this row may read
  const uint32_t bit = 1u << (h % gs);
  __syncthreads();
  // Scores of the keys the row reads (the others -inf), and their maximum.
  float local_max = -INFINITY;
  for (int32_t k = threadIdx.x; k < n; k += blockDim.x) {
    float s = -INFINITY;
    if (list.key_heads(k) & bit) {
      const T* kr = key_row<T>(c, g, list.token(k));
      float acc = 0.0f;
      for (int d = 0; d < D; ++d) acc += q[d] * to_f(kr[d]);
      s = acc;
    }
    p[k] = s;
    local_max = fmaxf(local_max, s);
  }
  const float m = block_reduce(local_max, red, max_f);
  float local_sum = 0.0f;
  int32_t local_read = 0;
  for (int32_t k = threadIdx.x; k < n; k += blockDim.x) {
    const bool reads = (list.key_heads(k) & bit) != 0;
    const float e = reads ? __expf(p[k] - m) : 0.0f;
    p[k] = e;
    local_sum += e;
    local_read += reads ? 1 : 0;
  }
  const float sum = block_reduce(local_sum, red, add_f);
  const int32_t n_read = block_reduce(local_read, ired, add_i);
  for (int32_t k = threadIdx.x; k < n; k += blockDim.x) {
    const bool reads = (list.key_heads(k) & bit) != 0;
    p[k] = reads ? p[k] / sum : -1.0f;  // -1: not read (below every probability)
    if (reads && c.key_mass != nullptr)
      atomicAdd(&c.key_mass[int64_t(g) * c.mass_stride + list.token(k)], p[k]);
  }
  __syncthreads();
  // The kk-th largest probability (select_common.cuh's radix select), then the
  // keys above it and the first `need` equal to it in key order.
  const int32_t kk = max(1, min(n_read, int32_t(ceilf(keep * float(n_read)))));
  uint32_t threshold = 0;
  int32_t need = 0;
  radix_select(p, n, kk, select, &threshold, &need);
  float local_kept = 0.0f;
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
      if (kept_out != nullptr && r == c.n_rows - 1) kept_out[int64_t(h) * max_keys + k] = keep_it ? 1 : 0;
    }
    equal_seen += chunk;
    __syncthreads();  // select.scan is reused by the next chunk
  }
  const float kept_sum = block_reduce(local_kept, red, add_f);
  const float norm = renormalize && kept_sum > 0.0f ? 1.0f / kept_sum : 1.0f;
  __syncthreads();
  // P·V over the kept keys, in key order, a thread per dimension.
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int32_t k = 0; k < n; ++k) {
      if (w[k] == 0.0f) continue;
      const T* vr = key_row<T>(c, g, list.token(k)) + int64_t(c.kv.page_size) * c.kv.head_dim;
      acc += w[k] * to_f(vr[d]);
    }
    out[d] = acc * norm;
  }
}

}  // namespace

size_t value_topk_scratch_bytes(const AttentionCall& call, int32_t max_keys) {
  return size_t(call.n_heads) * size_t(call.n_rows) * 2 * size_t(max_keys) * sizeof(float);
}

cudaError_t attention_value_topk(const AttentionCall& call, int32_t max_keys, double keep, bool renormalize,
                                 uint8_t* kept, void* scratch, size_t scratch_bytes, cudaStream_t stream) {
  if (call.n_rows < 0 || call.n_heads <= 0 || call.n_kv_heads <= 0 || call.n_heads % call.n_kv_heads != 0 ||
      call.head_dim <= 0 || call.head_dim > kMaxHeadDim || max_keys <= 0 || !(keep > 0.0) ||
      call.sparse.heads != nullptr || scratch_bytes < value_topk_scratch_bytes(call, max_keys) ||
      (call.kv.dtype != DType::F16 && call.kv.dtype != DType::BF16))
    return cudaErrorInvalidValue;
  if (call.n_rows == 0) return cudaSuccess;
  const dim3 grid(unsigned(call.n_rows), unsigned(call.n_heads));
  float* s = static_cast<float*>(scratch);
  if (call.kv.dtype == DType::F16)
    value_topk_kernel<__half><<<grid, kThreads, 0, stream>>>(call, max_keys, float(keep), renormalize, kept, s);
  else
    value_topk_kernel<__nv_bfloat16><<<grid, kThreads, 0, stream>>>(call, max_keys, float(keep), renormalize, kept, s);
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
