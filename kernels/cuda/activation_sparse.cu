#include "cuda/activation_sparse.cuh"

#include "cuda/block_reduce.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"

namespace inferlab::kernels::cuda {

namespace {

constexpr int kThreads = 128;
constexpr int kCols = 8;  // columns per thread: one 16-byte load of a 16-bit row

__device__ __forceinline__ float silu(float g) { return g / (1.0f + __expf(-g)); }

// Block (column tile, split): the split's inputs in shared memory, each thread
// kCols columns over the split's kept rows; a zero input is skipped by the
// whole block (the branch is uniform), so its row is never read.
template <typename T>
__global__ void sparse_input_partial_kernel(const T* x, const T* wt, int64_t in, int64_t out, float threshold,
                                            float* partial, unsigned long long* zeros) {
  __shared__ float xs[kSparseInputSplit];
  const int64_t i0 = int64_t(blockIdx.y) * kSparseInputSplit;
  const int rows = int(min(kSparseInputSplit, in - i0));
  if (threadIdx.x < rows) xs[threadIdx.x] = to_float(x[i0 + threadIdx.x]);
  __syncthreads();
  if (zeros != nullptr && blockIdx.x == 0) {
    const int zero = __syncthreads_count(threadIdx.x < rows && fabsf(xs[threadIdx.x]) <= threshold);
    if (threadIdx.x == 0 && zero > 0) atomicAdd(zeros, static_cast<unsigned long long>(zero));
  }
  const int64_t c = (int64_t(blockIdx.x) * blockDim.x + threadIdx.x) * kCols;
  if (c >= out) return;
  float acc[kCols] = {};
  const bool whole = c + kCols <= out && (out % kCols) == 0;
  for (int r = 0; r < rows; ++r) {
    const float xi = xs[r];
    if (fabsf(xi) <= threshold) continue;
    const T* w = wt + (i0 + r) * out + c;
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

// Grid-stride over whole blocks, so every thread reaches each __syncthreads_count.
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
    if (zeros != nullptr) {
      const int n = __syncthreads_count(zero);
      if (threadIdx.x == 0 && n > 0) atomicAdd(zeros, static_cast<unsigned long long>(n));
    }
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
  if (zeros != nullptr) {
    const int n = __syncthreads_count(lane == 0 && zero);
    if (threadIdx.x == 0 && n > 0) atomicAdd(zeros, static_cast<unsigned long long>(n));
  }
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
    if (zeros != nullptr) {
      const int n = __syncthreads_count(zero);
      if (threadIdx.x == 0 && n > 0) atomicAdd(zeros, static_cast<unsigned long long>(n));
    }
  }
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
                                                                  in, out, threshold, partial, zeros));
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

}  // namespace inferlab::kernels::cuda
