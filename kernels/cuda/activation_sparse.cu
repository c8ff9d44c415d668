#include "cuda/activation_sparse.cuh"

#include "cuda/block_reduce.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"

namespace inferlab::kernels::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kCols = 8;  // columns per thread: one 16-byte load of a 16-bit row

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

// Adds to *zeros (when not null) the block's threads whose `zero` is true;
// every thread of the block must call it (a block-wide count).
__device__ __forceinline__ void count_zeros(bool zero, unsigned long long* zeros) {
  if (zeros == nullptr) return;
  const int n = __syncthreads_count(zero);
  if (threadIdx.x == 0 && n > 0) atomicAdd(zeros, static_cast<unsigned long long>(n));
}

// Block (column tile, split): the split's inputs in shared memory, each thread
// kCols columns over the split's kept rows; a zero input is skipped by the
// whole block (the branch is uniform), so its row is never read.
// With `row_of` the inputs are a compact list: input i multiplies row row_of[i] of wt.
template <typename T>
__global__ void sparse_input_partial_kernel(const T* x, const T* wt, int64_t in, int64_t out, float threshold,
                                            float* partial, unsigned long long* zeros, const int32_t* row_of) {
  __shared__ float xs[kSparseInputSplit];
  __shared__ int64_t row_at[kSparseInputSplit];
  const int64_t i0 = int64_t(blockIdx.y) * kSparseInputSplit;
  const int rows = int(min(kSparseInputSplit, in - i0));
  if (threadIdx.x < rows) row_at[threadIdx.x] = row_of != nullptr ? row_of[i0 + threadIdx.x] : i0 + threadIdx.x;
  if (threadIdx.x < rows) xs[threadIdx.x] = to_float(x[i0 + threadIdx.x]);
  __syncthreads();
  if (blockIdx.x == 0) count_zeros(threadIdx.x < rows && fabsf(xs[threadIdx.x]) <= threshold, zeros);
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kCols;
  if (c >= out) return;
  float acc[kCols] = {};
  const bool whole = c + kCols <= out && (out % kCols) == 0;
  for (int r = 0; r < rows; ++r) {
    const float xi = xs[r];
    if (fabsf(xi) <= threshold) continue;
    const T* w = wt + row_at[r] * out + c;
    if constexpr (sizeof(T) == 2) {
      if (whole) {
        const uint4 raw = *reinterpret_cast<const uint4*>(w);
        const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
        for (int j = 0; j < kCols; ++j) acc[j] += xi * to_float(v[j]);
        continue;
      }
    }
    for (int j = 0; j < kCols && c + j < out; ++j) acc[j] += xi * to_float(w[j]);
  }
  float* p = partial + int64_t(blockIdx.y) * out + c;
  for (int j = 0; j < kCols && c + j < out; ++j) p[j] = acc[j];
}

__global__ void sum_splits_kernel(const float* partial, int64_t splits, int64_t out, float* y) {
  INFERLAB_GRID_STRIDE(c, out) {
    float sum = 0.0f;
    for (int64_t s = 0; s < splits; ++s) sum += partial[s * out + c];
    y[c] = sum;
  }
}

// Grid-stride over whole blocks, so every thread reaches each count_zeros.
template <typename T>
__global__ void sparsify_kernel(const T* x, int64_t count, float threshold, T* out, unsigned long long* zeros) {
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < count; base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = base + threadIdx.x;
    bool zero = false;
    if (i < count) {
      const float v = to_float(x[i]);
      zero = fabsf(v) <= threshold;
      out[i] = zero ? from_float<T>(0.0f) : x[i];
    }
    count_zeros(zero, zeros);
  }
}

// Warp per neuron; a neuron whose gate is below the threshold reads no weight.
template <typename T>
__global__ void gated_silu_up_kernel(const float* gate, const T* x, const T* w_up, int64_t n_ff, int64_t in,
                                     float threshold, T* act, unsigned long long* zeros) {
  const int lane = threadIdx.x % 32;
  const int64_t j = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  bool zero = false;
  if (j < n_ff) {
    const float s = silu(gate[j]);
    zero = fabsf(s) <= threshold;
    if (!zero) {
      const T* w = w_up + j * in;
      float sum = 0.0f;
      for (int64_t d = lane; d < in; d += 32) sum += to_float(w[d]) * to_float(x[d]);
      sum = warp_sum(sum);
      if (lane == 0) act[j] = from_float<T>(s * sum);
    } else if (lane == 0) {
      act[j] = from_float<T>(0.0f);
    }
  }
  count_zeros(lane == 0 && zero, zeros);
}

template <typename T>
__global__ void gated_silu_mul_kernel(const float* gate, const float* up, int64_t count, float threshold, T* act,
                                      unsigned long long* zeros) {
  for (int64_t base = int64_t(blockIdx.x) * blockDim.x; base < count; base += int64_t(gridDim.x) * blockDim.x) {
    const int64_t i = base + threadIdx.x;
    bool zero = false;
    if (i < count) {
      const float s = silu(gate[i]);
      zero = fabsf(s) <= threshold;
      act[i] = from_float<T>(zero ? 0.0f : s * up[i]);
    }
    count_zeros(zero, zeros);
  }
}

constexpr int kSelectThreads = 256;

// Block per row. The k-th largest magnitude's bits by radix select (31 passes
// of a count), then the entries above it and the first equal ones up to k.
template <typename T>
__global__ void keep_top_k_kernel(T* x, int64_t cols, int32_t k) {
  __shared__ int count;
  __shared__ int equal_before[kSelectThreads + 1];
  T* row = x + int64_t(blockIdx.x) * cols;
  const int64_t seg = (cols + blockDim.x - 1) / blockDim.x, first = threadIdx.x * seg,
                last = min(cols, first + seg);
  auto bits = [&](int64_t j) { return __float_as_uint(fabsf(to_float(row[j]))); };
  unsigned prefix = 0;
  for (int bit = 30; bit >= 0; --bit) {
    const unsigned trial = prefix | (1u << bit);
    if (threadIdx.x == 0) count = 0;
    __syncthreads();
    int mine = 0;
    for (int64_t j = first; j < last; ++j) mine += bits(j) >= trial;
    if (mine > 0) atomicAdd(&count, mine);
    __syncthreads();
    if (count >= k) prefix = trial;
    __syncthreads();
  }
  // prefix: the k-th largest magnitude's bits. Above it: kept; equal: the first (k - above) in index order.
  if (threadIdx.x == 0) count = 0;
  __syncthreads();
  int above = 0, equal = 0;
  for (int64_t j = first; j < last; ++j) {
    const unsigned b = bits(j);
    above += b > prefix;
    equal += b == prefix;
  }
  if (above > 0) atomicAdd(&count, above);
  equal_before[threadIdx.x + 1] = equal;
  __syncthreads();
  if (threadIdx.x == 0) {
    equal_before[0] = 0;
    for (int t = 1; t <= int(blockDim.x); ++t) equal_before[t] += equal_before[t - 1];
  }
  __syncthreads();
  int allowed = k - count - equal_before[threadIdx.x];  // equal entries this thread may still keep
  for (int64_t j = first; j < last; ++j) {
    const unsigned b = bits(j);
    if (b > prefix) continue;
    if (b == prefix && allowed > 0) {
      --allowed;
      continue;
    }
    row[j] = from_float<T>(0.0f);
  }
}

// Block per row, a thread per head: its norm, its rank among the computed heads.
__global__ void keep_top_heads_kernel(float* attn, int32_t n_heads, int32_t head_dim, int32_t k,
                                      const uint8_t* computed) {
  extern __shared__ float norms[];
  float* row = attn + int64_t(blockIdx.x) * n_heads * head_dim;
  for (int h = threadIdx.x; h < n_heads; h += blockDim.x) {
    float sum = 0.0f;
    for (int d = 0; d < head_dim; ++d) sum += row[h * head_dim + d] * row[h * head_dim + d];
    norms[h] = computed[h] != 0 ? sqrtf(sum) : -1.0f;
  }
  __syncthreads();
  for (int h = threadIdx.x; h < n_heads; h += blockDim.x) {
    int rank = 0;
    for (int o = 0; o < n_heads; ++o) rank += norms[o] > norms[h] || (norms[o] == norms[h] && o < h);
    if (computed[h] != 0 && rank < k) continue;
    for (int d = 0; d < head_dim; ++d) row[h * head_dim + d] = 0.0f;
  }
}

// Warp per listed row: y[j] = w[rows[j], :] . x.
template <typename T>
__global__ void gathered_rows_kernel(const T* x, const T* w, const int32_t* rows, int64_t k, int64_t in, float* y) {
  const int lane = threadIdx.x % 32;
  const int64_t j = int64_t(blockIdx.x) * (blockDim.x / 32) + threadIdx.x / 32;
  if (j >= k) return;
  const T* wr = w + int64_t(rows[j]) * in;
  float sum = 0.0f;
  for (int64_t d = lane; d < in; d += 32) sum += to_float(wr[d]) * to_float(x[d]);
  sum = warp_sum(sum);
  if (lane == 0) y[j] = sum;
}

}  // namespace

cudaError_t sparse_input_gemv(const void* x, const void* wt, DType dtype, int64_t in, int64_t out, float threshold,
                              float* partial, float* y, unsigned long long* zeros, cudaStream_t stream) {
  if (in <= 0 || out <= 0 || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  const int64_t splits = sparse_input_splits(in);
  if (splits > 65535) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(ceil_div(out, int64_t(kThreads) * kCols)), unsigned(splits));
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    sparse_input_partial_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(wt),
                                                                  in, out, threshold, partial, zeros, nullptr));
  sum_splits_kernel<<<grid_stride_blocks(out, 256), 256, 0, stream>>>(partial, splits, out, y);
  return cudaGetLastError();
}

cudaError_t sparsify(const void* x, DType dtype, int64_t count, float threshold, void* out, unsigned long long* zeros,
                     cudaStream_t stream) {
  if (count < 0 || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    sparsify_kernel<T><<<grid_stride_blocks(count, 256), 256, 0, stream>>>(static_cast<const T*>(x), count, threshold,
                                                                          static_cast<T*>(out), zeros));
  return cudaGetLastError();
}

cudaError_t gated_silu_up(const float* gate, const void* x, const void* w_up, DType dtype, int64_t n_ff, int64_t in,
                          float threshold, void* act, unsigned long long* zeros, cudaStream_t stream) {
  if (n_ff < 0 || in <= 0 || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (n_ff == 0) return cudaSuccess;
  constexpr int kWarps = 8;
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    gated_silu_up_kernel<T><<<ceil_div(n_ff, kWarps), kWarps * 32, 0, stream>>>(
        gate, static_cast<const T*>(x), static_cast<const T*>(w_up), n_ff, in, threshold, static_cast<T*>(act), zeros));
  return cudaGetLastError();
}

cudaError_t gated_silu_mul(const float* gate, const float* up, int64_t count, float threshold, void* act, DType dtype,
                           unsigned long long* zeros, cudaStream_t stream) {
  if (count < 0 || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    gated_silu_mul_kernel<T><<<grid_stride_blocks(count, 256), 256, 0, stream>>>(gate, up, count, threshold,
                                                                                static_cast<T*>(act), zeros));
  return cudaGetLastError();
}

cudaError_t keep_top_k_magnitudes(void* x, DType dtype, int64_t rows, int64_t cols, int32_t k, cudaStream_t stream) {
  if (rows < 0 || cols <= 0 || k < 0 || !valid_dtype(dtype) || rows > kMaxGridX) return cudaErrorInvalidValue;
  if (rows == 0 || k >= cols) return cudaSuccess;
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    keep_top_k_kernel<T><<<unsigned(rows), kSelectThreads, 0, stream>>>(static_cast<T*>(x), cols, k));
  return cudaGetLastError();
}

cudaError_t keep_top_heads(float* attn, int64_t rows, int32_t n_heads, int32_t head_dim, int32_t k,
                           const uint8_t* computed, cudaStream_t stream) {
  if (rows < 0 || n_heads <= 0 || head_dim <= 0 || k < 0 || rows > kMaxGridX) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  keep_top_heads_kernel<<<unsigned(rows), 64, size_t(n_heads) * sizeof(float), stream>>>(attn, n_heads, head_dim, k,
                                                                                         computed);
  return cudaGetLastError();
}

cudaError_t rows_gemv(const void* x, const void* wt, DType dtype, const int32_t* rows, int64_t k, int64_t out,
                      float* partial, float* y, cudaStream_t stream) {
  if (k < 0 || out <= 0 || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (k == 0) return cudaMemsetAsync(y, 0, size_t(out) * sizeof(float), stream);
  const int64_t splits = sparse_input_splits(k);
  if (splits > 65535) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(ceil_div(out, int64_t(kThreads) * kCols)), unsigned(splits));
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    sparse_input_partial_kernel<T><<<grid, kThreads, 0, stream>>>(static_cast<const T*>(x), static_cast<const T*>(wt),
                                                                  k, out, -1.0f, partial, nullptr, rows));
  sum_splits_kernel<<<grid_stride_blocks(out, 256), 256, 0, stream>>>(partial, splits, out, y);
  return cudaGetLastError();
}

cudaError_t gathered_rows_gemv(const void* x, const void* w, DType dtype, const int32_t* rows, int64_t k, int64_t in,
                               float* y, cudaStream_t stream) {
  if (k < 0 || in <= 0 || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (k == 0) return cudaSuccess;
  constexpr int kWarps = 8;
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    gathered_rows_kernel<T><<<ceil_div(k, kWarps), kWarps * 32, 0, stream>>>(
        static_cast<const T*>(x), static_cast<const T*>(w), rows, k, in, y));
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda

