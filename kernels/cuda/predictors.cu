#include "cuda/predictors.cuh"

#include "cuda/block_reduce.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"
#include "cuda/select_common.cuh"

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

// Block per row: NaN becomes -inf (the twin's order), then the k-th largest
// key by the shared radix select, the keys above it, and the first `need`
// equal ones in index order (a block scan per chunk).
__global__ void __launch_bounds__(kSelectThreads)
    top_k_flags_kernel(float* logits, int64_t n, int32_t k, uint8_t* flags) {
  __shared__ SelectShared sm;
  float* row = logits + int64_t(blockIdx.x) * n;
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x)
    if (isnan(row[j])) row[j] = -INFINITY;
  __syncthreads();
  uint32_t threshold = 0;
  int32_t need = 0;
  radix_select(row, int32_t(n), k, sm, &threshold, &need);
  __syncthreads();
  int32_t equal_seen = 0;
  for (int64_t first = 0; first < n; first += blockDim.x) {
    const int64_t j = first + threadIdx.x;
    const uint32_t key = j < n ? order_key(row[j]) : 0u;
    const bool equal = j < n && key == threshold;
    int32_t before, chunk;
    cub::BlockScan<int32_t, kSelectThreads>(sm.scan).ExclusiveSum(int32_t(equal), before, chunk);
    if (j < n && (key > threshold || (equal && equal_seen + before < need))) flags[j] = 1;
    equal_seen += chunk;
    __syncthreads();  // sm.scan is reused by the next chunk
  }
}

// One block: the flagged indices in order, a block scan per chunk.
__global__ void __launch_bounds__(kSelectThreads)
    flags_to_list_kernel(const uint8_t* flags, int64_t n, int32_t* list, int32_t* count) {
  __shared__ cub::BlockScan<int32_t, kSelectThreads>::TempStorage scan;
  int32_t listed = 0;
  for (int64_t first = 0; first < n; first += blockDim.x) {
    const int64_t j = first + threadIdx.x;
    const bool on = j < n && flags[j] != 0;
    int32_t before, chunk;
    cub::BlockScan<int32_t, kSelectThreads>(scan).ExclusiveSum(int32_t(on), before, chunk);
    if (on) list[listed + before] = int32_t(j);
    listed += chunk;
    __syncthreads();
  }
  if (threadIdx.x == 0) *count = listed;
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

cudaError_t top_k_flags(float* logits, int64_t rows, int64_t n, int32_t k, uint8_t* flags, cudaStream_t stream) {
  if (rows < 0 || n <= 0 || n > INT32_MAX || k < 0 || rows > kMaxGridX) return cudaErrorInvalidValue;
  if (rows == 0 || k == 0) return cudaSuccess;
  if (k >= n) return cudaMemsetAsync(flags, 1, size_t(n), stream);
  top_k_flags_kernel<<<unsigned(rows), kSelectThreads, 0, stream>>>(logits, n, k, flags);
  return cudaGetLastError();
}

cudaError_t flags_to_list(const uint8_t* flags, int64_t n, int32_t* list, int32_t* count, cudaStream_t stream) {
  if (n <= 0 || n > INT32_MAX) return cudaErrorInvalidValue;
  flags_to_list_kernel<<<1, kSelectThreads, 0, stream>>>(flags, n, list, count);
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
