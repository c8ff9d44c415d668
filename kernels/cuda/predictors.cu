#include "cuda/predictors.cuh"

#include "cuda/block_reduce.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"

namespace inferlab::kernels::cuda {

namespace {

constexpr int kRowThreads = 256;

__global__ void rms_scale_kernel(const float* x, int64_t d, float eps, float* out) {
  const float* xr = x + int64_t(blockIdx.x) * d;
  float* o = out + int64_t(blockIdx.x) * d;
  float ss = 0.0f;
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) ss += xr[i] * xr[i];
  ss = block_sum(ss);
  const float s = rsqrtf(ss / float(d) + eps);
  for (int64_t i = threadIdx.x; i < d; i += blockDim.x) o[i] = xr[i] * s;
}

// Warp per (row, output).
__global__ void predictor_layer_kernel(const float* x, const float* w, const float* b, int64_t in, int64_t out,
                                       bool relu, float* y) {
  const int lane = threadIdx.x % 32;
  const int64_t j = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (j >= out) return;
  const float* xr = x + int64_t(blockIdx.y) * in;
  const float* wr = w + j * in;
  float sum = 0.0f;
  for (int64_t i = lane; i < in; i += 32) sum += wr[i] * xr[i];
  sum = warp_sum(sum);
  if (lane != 0) return;
  if (b != nullptr) sum += b[j];
  y[int64_t(blockIdx.y) * out + j] = relu ? fmaxf(sum, 0.0f) : sum;
}

__global__ void bias_relu_kernel(float* y, int64_t rows, int64_t out, const float* b, bool relu) {
  INFERLAB_GRID_STRIDE(i, rows * out) {
    float v = y[i] + (b != nullptr ? b[i % out] : 0.0f);
    y[i] = relu ? fmaxf(v, 0.0f) : v;
  }
}

// Order-preserving key of a float (larger float, larger key); NaN is keyed as
// -inf (the CPU twin compares NaN as -inf).
__device__ __forceinline__ unsigned order_key(float f) {
  if (isnan(f)) f = -INFINITY;
  const unsigned b = __float_as_uint(f);
  return (b & 0x80000000u) != 0 ? ~b : b | 0x80000000u;
}

// Block per row: the k-th largest key by radix select, then the keys above it
// and the first equal ones (index order) up to k.
__global__ void top_k_flags_kernel(const float* logits, int64_t n, int32_t k, uint8_t* flags) {
  __shared__ int count;
  __shared__ int equal_before[kRowThreads + 1];
  const float* row = logits + int64_t(blockIdx.x) * n;
  const int64_t seg = (n + blockDim.x - 1) / blockDim.x, first = threadIdx.x * seg, last = min(n, first + seg);
  unsigned prefix = 0;
  for (int bit = 31; bit >= 0; --bit) {
    const unsigned trial = prefix | (1u << bit);
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    int mine = 0;
    for (int64_t j = first; j < last; ++j) mine += order_key(row[j]) >= trial;
    if (mine > 0) atomicAdd(&count, mine);
    __syncthreads();
    if (count >= k) prefix = trial;
    __syncthreads();
  }
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  int above = 0, equal = 0;
  for (int64_t j = first; j < last; ++j) {
    const unsigned key = order_key(row[j]);
    above += key > prefix;
    equal += key == prefix;
  }
  if (above > 0) atomicAdd(&count, above);
  equal_before[threadIdx.x + 1] = equal;
  __syncthreads();
  if (threadIdx.x == 0) {
    equal_before[0] = 0;
    for (int t = 1; t <= int(blockDim.x); ++t) equal_before[t] += equal_before[t - 1];
  }
  __syncthreads();
  int allowed = k - count - equal_before[threadIdx.x];
  for (int64_t j = first; j < last; ++j) {
    const unsigned key = order_key(row[j]);
    if (key > prefix) {
      flags[j] = 1;
    } else if (key == prefix && allowed > 0) {
      --allowed;
      flags[j] = 1;
    }
  }
}

constexpr int kListThreads = 1024;

// One block: each thread a contiguous segment; the segments' counts scanned
// (warp shuffles, then the warps' totals), then each writes its indices.
__global__ void flags_to_list_kernel(const uint8_t* flags, int64_t n, int32_t* list, int32_t* count) {
  __shared__ int warp_total[kListThreads / 32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t seg = (n + blockDim.x - 1) / blockDim.x, first = threadIdx.x * seg, last = min(n, first + seg);
  int mine = 0;
  for (int64_t j = first; j < last; ++j) mine += flags[j] != 0;
  int inclusive = mine;  // within the warp
  for (int o = 1; o < 32; o <<= 1) {
    const int v = __shfl_up_sync(0xffffffffu, inclusive, o);
    if (lane >= o) inclusive += v;
  }
  if (lane == 31) warp_total[warp] = inclusive;
  __syncthreads();
  if (warp == 0) {
    const int n_warps = int(blockDim.x) / 32;
    int t = lane < n_warps ? warp_total[lane] : 0;
    for (int o = 1; o < 32; o <<= 1) {
      const int v = __shfl_up_sync(0xffffffffu, t, o);
      if (lane >= o) t += v;
    }
    if (lane < n_warps) warp_total[lane] = t;  // inclusive over warps
  }
  __syncthreads();
  int at = (warp > 0 ? warp_total[warp - 1] : 0) + inclusive - mine;
  for (int64_t j = first; j < last; ++j)
    if (flags[j] != 0) list[at++] = int32_t(j);
  if (threadIdx.x == blockDim.x - 1) *count = at;
}

__global__ void head_rows_kernel(const int32_t* heads, int32_t k, int32_t head_dim, int32_t* rows) {
  INFERLAB_GRID_STRIDE(i, int64_t(k) * head_dim) rows[i] = heads[i / head_dim] * head_dim + int32_t(i % head_dim);
}

__global__ void scatter_heads_kernel(const float* compact, int64_t n_rows, const int32_t* heads, int32_t k,
                                     int32_t head_dim, float* q, int64_t q_dim) {
  const int64_t width = int64_t(k) * head_dim;
  INFERLAB_GRID_STRIDE(i, n_rows * width) {
    const int64_t r = i / width, c = i % width;
    q[r * q_dim + int64_t(heads[c / head_dim]) * head_dim + c % head_dim] = compact[i];
  }
}

template <typename T>
__global__ void gather_heads_kernel(const float* attn, int64_t n_rows, int64_t q_dim, const int32_t* heads, int32_t k,
                                    int32_t head_dim, T* out) {
  const int64_t width = int64_t(k) * head_dim;
  INFERLAB_GRID_STRIDE(i, n_rows * width) {
    const int64_t r = i / width, c = i % width;
    out[i] = from_float<T>(attn[r * q_dim + int64_t(heads[c / head_dim]) * head_dim + c % head_dim]);
  }
}

}  // namespace

cudaError_t rms_scale_rows(const float* x, int64_t rows, int64_t d, float eps, float* out, cudaStream_t stream) {
  if (rows < 0 || d <= 0 || rows > kMaxGridX) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  rms_scale_kernel<<<unsigned(rows), kRowThreads, 0, stream>>>(x, d, eps, out);
  return cudaGetLastError();
}

cudaError_t predictor_layer(const float* x, const float* w, const float* b, int64_t rows, int64_t in, int64_t out,
                            bool relu, float* y, cudaStream_t stream) {
  if (rows < 0 || in <= 0 || out <= 0 || rows > 65535) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  constexpr int kWarps = 8;
  const dim3 grid(unsigned(ceil_div(out, kWarps)), unsigned(rows));
  predictor_layer_kernel<<<grid, kWarps * 32, 0, stream>>>(x, w, b, in, out, relu, y);
  return cudaGetLastError();
}

cudaError_t bias_relu_rows(float* y, int64_t rows, int64_t out, const float* b, bool relu, cudaStream_t stream) {
  if (rows < 0 || out <= 0) return cudaErrorInvalidValue;
  if (rows == 0 || (b == nullptr && !relu)) return cudaSuccess;
  bias_relu_kernel<<<grid_stride_blocks(rows * out, 256), 256, 0, stream>>>(y, rows, out, b, relu);
  return cudaGetLastError();
}

cudaError_t top_k_flags(const float* logits, int64_t rows, int64_t n, int32_t k, uint8_t* flags, cudaStream_t stream) {
  if (rows < 0 || n <= 0 || k < 0 || rows > kMaxGridX) return cudaErrorInvalidValue;
  if (rows == 0 || k == 0) return cudaSuccess;
  if (k >= n) return cudaMemsetAsync(flags, 1, size_t(n), stream);
  top_k_flags_kernel<<<unsigned(rows), kRowThreads, 0, stream>>>(logits, n, k, flags);
  return cudaGetLastError();
}

cudaError_t flags_to_list(const uint8_t* flags, int64_t n, int32_t* list, int32_t* count, cudaStream_t stream) {
  if (n <= 0 || n > kMaxGridX) return cudaErrorInvalidValue;
  flags_to_list_kernel<<<1, kListThreads, 0, stream>>>(flags, n, list, count);
  return cudaGetLastError();
}

cudaError_t head_rows(const int32_t* heads, int32_t k, int32_t head_dim, int32_t* rows, cudaStream_t stream) {
  if (k < 0 || head_dim <= 0) return cudaErrorInvalidValue;
  if (k == 0) return cudaSuccess;
  head_rows_kernel<<<grid_stride_blocks(int64_t(k) * head_dim, 256), 256, 0, stream>>>(heads, k, head_dim, rows);
  return cudaGetLastError();
}

cudaError_t scatter_head_columns(const float* compact, int64_t n_rows, const int32_t* heads, int32_t k,
                                 int32_t head_dim, float* q, int64_t q_dim, cudaStream_t stream) {
  if (n_rows < 0 || k < 0 || head_dim <= 0 || int64_t(k) * head_dim > q_dim) return cudaErrorInvalidValue;
  if (n_rows == 0 || k == 0) return cudaSuccess;
  scatter_heads_kernel<<<grid_stride_blocks(n_rows * k * head_dim, 256), 256, 0, stream>>>(compact, n_rows, heads, k,
                                                                                          head_dim, q, q_dim);
  return cudaGetLastError();
}

cudaError_t gather_head_columns(const float* attn, int64_t n_rows, int64_t q_dim, const int32_t* heads, int32_t k,
                                int32_t head_dim, void* out, DType dtype, cudaStream_t stream) {
  if (n_rows < 0 || k < 0 || head_dim <= 0 || int64_t(k) * head_dim > q_dim || !valid_dtype(dtype))
    return cudaErrorInvalidValue;
  if (n_rows == 0 || k == 0) return cudaSuccess;
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    gather_heads_kernel<T><<<grid_stride_blocks(n_rows * k * head_dim, 256), 256, 0, stream>>>(
        attn, n_rows, q_dim, heads, k, head_dim, static_cast<T*>(out)));
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
