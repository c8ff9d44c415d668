#include "cuda/quant4.cuh"

#include "cuda/block_reduce.cuh"
#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"

namespace inferlab::kernels::cuda {

namespace {

constexpr int kThreads = 256;
constexpr int kWarpsPerBlock = kThreads / 32;

// Rounded as the host's twin rounds it (no fused multiply-add): the same absmax bit for bit.
__device__ __forceinline__ float block_scale(const Quant4View& w, int64_t b) {
  return w.absmax != nullptr
             ? w.absmax[b]
             : __fadd_rn(__fmul_rn(w.dynamic_map[w.absmax_codes[b]], w.absmax_scale[b / 256]), w.absmax_offset);
}

template <typename T>
__global__ void quant4_dequantize_kernel(Quant4View w, T* out) {
  __shared__ float levels[16];
  if (threadIdx.x < 16) levels[threadIdx.x] = w.levels[threadIdx.x];
  __syncthreads();
  INFERLAB_GRID_STRIDE(i, w.n) {
    const uint8_t byte = w.codes[i / 2];
    const uint8_t code = (i % 2 == 0) ? uint8_t(byte >> 4) : uint8_t(byte & 0x0F);
    out[i] = from_float<T>(levels[code] * block_scale(w, i / w.block));
  }
}

// One warp per output row. `aligned`: cols and the block size are multiples of
// 8, so each lane reads 8 codes (4 bytes) of one block at a time.
template <typename T, bool aligned>
__global__ void quant4_gemv_kernel(Quant4View w, const T* __restrict__ x, float* __restrict__ y, int m,
                                   int64_t rows, int64_t cols) {
  __shared__ float levels[16];
  if (threadIdx.x < 16) levels[threadIdx.x] = w.levels[threadIdx.x];
  __syncthreads();
  const int lane = threadIdx.x % 32;
  const int64_t r = int64_t(blockIdx.x) * kWarpsPerBlock + threadIdx.x / 32;
  if (r >= rows) return;
  float acc[kQuant4GemvMaxRows] = {0, 0, 0, 0};
  const int64_t base = r * cols;
  if constexpr (aligned) {
    for (int64_t j = int64_t(lane) * 8; j < cols; j += 32 * 8) {
      const int64_t i = base + j;
      const uint32_t packed = *reinterpret_cast<const uint32_t*>(w.codes + i / 2);
      const float s = block_scale(w, i / w.block);
      float v[8];
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const uint32_t byte = (packed >> (8 * k)) & 0xFFu;
        v[2 * k] = levels[byte >> 4] * s;
        v[2 * k + 1] = levels[byte & 0x0Fu] * s;
      }
#pragma unroll
      for (int row = 0; row < kQuant4GemvMaxRows; ++row) {
        if (row < m) {
          const T* xr = x + row * cols + j;
#pragma unroll
          for (int k = 0; k < 8; ++k) acc[row] += v[k] * to_float<T>(xr[k]);
        }
      }
    }
  } else {
    for (int64_t j = lane; j < cols; j += 32) {
      const int64_t i = base + j;
      const uint8_t byte = w.codes[i / 2];
      const float v = levels[(i % 2 == 0) ? (byte >> 4) : (byte & 0x0F)] * block_scale(w, i / w.block);
#pragma unroll
      for (int row = 0; row < kQuant4GemvMaxRows; ++row)
        if (row < m) acc[row] += v * to_float<T>(x[row * cols + j]);
    }
  }
#pragma unroll
  for (int row = 0; row < kQuant4GemvMaxRows; ++row) {
    const float sum = warp_sum(acc[row]);  // every lane takes part
    if (lane == 0 && row < m) y[row * rows + r] = sum;
  }
}

bool valid(const Quant4View& w) {
  if (w.n < 0 || w.block <= 0 || w.codes == nullptr) return false;
  return w.absmax != nullptr || (w.absmax_codes != nullptr && w.absmax_scale != nullptr && w.dynamic_map != nullptr);
}

}  // namespace

cudaError_t quant4_dequantize(const Quant4View& w, void* out, DType dtype, cudaStream_t stream) {
  if (w.n == 0) return cudaSuccess;
  if (!valid(w) || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    quant4_dequantize_kernel<T><<<grid_stride_blocks(w.n, kThreads), kThreads, 0, stream>>>(w, static_cast<T*>(out)));
  return cudaGetLastError();
}

cudaError_t quant4_gemv(const Quant4View& w, const void* x, DType dtype, float* y, int64_t m, int64_t rows,
                        int64_t cols, cudaStream_t stream) {
  if (rows == 0 || m == 0) return cudaSuccess;
  if (!valid(w) || !valid_dtype(dtype) || m < 0 || m > kQuant4GemvMaxRows || rows < 0 || cols <= 0 ||
      w.n != rows * cols)
    return cudaErrorInvalidValue;
  const unsigned blocks = unsigned((rows + kWarpsPerBlock - 1) / kWarpsPerBlock);
  const bool aligned = cols % 8 == 0 && w.block % 8 == 0;
  INFERLAB_DISPATCH_DTYPE(dtype, T, {
    const T* xt = static_cast<const T*>(x);
    if (aligned)
      quant4_gemv_kernel<T, true><<<blocks, kThreads, 0, stream>>>(w, xt, y, int(m), rows, cols);
    else
      quant4_gemv_kernel<T, false><<<blocks, kThreads, 0, stream>>>(w, xt, y, int(m), rows, cols);
  });
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
