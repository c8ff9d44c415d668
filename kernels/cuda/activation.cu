#include "cuda/activation.cuh"

#include "cuda/block_reduce.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"

namespace inferlab::kernels::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kNormThreads = 512;  // head_output_norms: a block per head, its rows over 16 warps

template <typename T>
__global__ void silu_mul_kernel(const float* gate, const float* up, int64_t n, T* out) {
  INFERLAB_GRID_STRIDE(i, n) {
    const float g = gate[i];
    out[i] = from_float<T>(g / (1.0f + __expf(-g)) * up[i]);
  }
}

__global__ void add_inplace_kernel(float* y, const float* x, int64_t n) {
  INFERLAB_GRID_STRIDE(i, n) y[i] += x[i];
}

__global__ void add_row_bias_kernel(float* y, const float* bias, int64_t n, int64_t cols) {
  INFERLAB_GRID_STRIDE(i, n) y[i] += bias[i % cols];
}

template <typename From, typename To>
__global__ void convert_kernel(const From* x, int64_t n, To* out) {
  INFERLAB_GRID_STRIDE(i, n) out[i] = from_float<To>(to_float(x[i]));
}

// Block per head; warp w takes rows w, w + n_warps, ...
__global__ void __launch_bounds__(kNormThreads)
    head_output_norms_kernel(const float* attn, int32_t n_rows, int32_t n_heads, int32_t head_dim, float* norms,
                             float* l1) {
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  float total = 0.0f, total_l1 = 0.0f;  // this warp's rows, valid in lane 0
  for (int32_t r = warp; r < n_rows; r += n_warps) {
    const float* head = attn + (int64_t(r) * n_heads + blockIdx.x) * head_dim;
    float sum_sq = 0.0f, sum_abs = 0.0f;
    for (int32_t d = lane; d < head_dim; d += 32) {
      sum_sq += head[d] * head[d];
      sum_abs += fabsf(head[d]);
    }
    total += sqrtf(warp_sum(sum_sq));
    total_l1 += warp_sum(sum_abs);
  }
  total = block_sum(lane == 0 ? total : 0.0f);
  if (threadIdx.x == 0) norms[blockIdx.x] = total;
  if (l1 == nullptr) return;
  total_l1 = block_sum(lane == 0 ? total_l1 : 0.0f);
  if (threadIdx.x == 0) l1[blockIdx.x] = total_l1;
}

// Block per gathered row; U is the copy unit.
template <typename U>
__global__ void gather_rows_kernel(const U* w, int64_t row_units, const int32_t* rows, U* out) {
  const U* src = w + int64_t(rows[blockIdx.x]) * row_units;
  U* dst = out + int64_t(blockIdx.x) * row_units;
  for (int64_t j = threadIdx.x; j < row_units; j += blockDim.x) dst[j] = src[j];
}

}  // namespace

cudaError_t silu_mul(const float* gate, const float* up, int64_t n, void* out, DType out_dtype, cudaStream_t stream) {
  if (n < 0 || !valid_dtype(out_dtype)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  INFERLAB_DISPATCH_DTYPE(out_dtype, T,
    silu_mul_kernel<T><<<grid_stride_blocks(n, kThreads), kThreads, 0, stream>>>(gate, up, n, static_cast<T*>(out)));
  return cudaGetLastError();
}

cudaError_t add_inplace(float* y, const float* x, int64_t n, cudaStream_t stream) {
  if (n < 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  add_inplace_kernel<<<grid_stride_blocks(n, kThreads), kThreads, 0, stream>>>(y, x, n);
  return cudaGetLastError();
}

cudaError_t add_row_bias(float* y, const float* bias, int64_t rows, int64_t cols, cudaStream_t stream) {
  if (rows < 0 || cols <= 0) return cudaErrorInvalidValue;
  const int64_t n = rows * cols;
  if (n == 0) return cudaSuccess;
  add_row_bias_kernel<<<grid_stride_blocks(n, kThreads), kThreads, 0, stream>>>(y, bias, n, cols);
  return cudaGetLastError();
}

cudaError_t convert_from_float(const float* x, int64_t n, void* out, DType dtype, cudaStream_t stream) {
  if (n < 0 || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    convert_kernel<float, T><<<grid_stride_blocks(n, kThreads), kThreads, 0, stream>>>(x, n, static_cast<T*>(out)));
  return cudaGetLastError();
}

cudaError_t convert_to_float(const void* x, DType dtype, int64_t n, float* out, cudaStream_t stream) {
  if (n < 0 || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    convert_kernel<T, float><<<grid_stride_blocks(n, kThreads), kThreads, 0, stream>>>(static_cast<const T*>(x), n, out));
  return cudaGetLastError();
}

cudaError_t head_output_norms(const float* attn, int32_t n_rows, int32_t n_heads, int32_t head_dim, float* norms,
                              float* l1, cudaStream_t stream) {
  if (n_rows < 0 || n_heads < 0 || head_dim <= 0) return cudaErrorInvalidValue;
  if (n_heads == 0) return cudaSuccess;
  head_output_norms_kernel<<<unsigned(n_heads), kNormThreads, 0, stream>>>(attn, n_rows, n_heads, head_dim, norms, l1);
  return cudaGetLastError();
}

cudaError_t gather_rows(const void* w, DType dtype, int64_t row_len, const int32_t* rows, int64_t n_rows, void* out,
                        cudaStream_t stream) {
  if (row_len <= 0 || n_rows < 0 || n_rows > kMaxGridX || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (n_rows == 0) return cudaSuccess;
  const int64_t row_bytes = row_len * dtype_bytes(dtype);
  INFERLAB_DISPATCH_COPY_UNIT(copy_unit_bytes(row_bytes, w, out), U,
    gather_rows_kernel<U><<<unsigned(n_rows), 256, 0, stream>>>(static_cast<const U*>(w), row_bytes / int64_t(sizeof(U)),
                                                              rows, static_cast<U*>(out)));
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
