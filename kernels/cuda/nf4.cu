#include "cuda/nf4.cuh"

#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"

namespace inferlab::kernels::cuda {

namespace {

constexpr int kThreads = 256;

__constant__ float kNf4Levels[16] = {
    -1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f, -0.28444138169288635f,
    -0.18477343022823334f, -0.09105003625154495f, 0.0f, 0.07958029955625534f, 0.16093020141124725f,
    0.24611230194568634f, 0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f, 0.7229568362236023f,
    1.0f};

template <typename T>
__global__ void nf4_dequantize_kernel(Nf4View w, T* out) {
  INFERLAB_GRID_STRIDE(i, w.n) {
    const int64_t b = i / w.block;
    const float scale = w.absmax != nullptr
                            ? w.absmax[b]
                            : w.dynamic_map[w.absmax_codes[b]] * w.absmax_scale[b / 256] + w.absmax_offset;
    const uint8_t byte = w.codes[i / 2];
    const uint8_t code = (i % 2 == 0) ? uint8_t(byte >> 4) : uint8_t(byte & 0x0F);
    out[i] = from_float<T>(kNf4Levels[code] * scale);
  }
}

}  // namespace

cudaError_t nf4_dequantize(const Nf4View& w, void* out, DType dtype, cudaStream_t stream) {
  if (w.n < 0 || w.block <= 0 || !valid_dtype(dtype)) return cudaErrorInvalidValue;
  if (w.absmax == nullptr && (w.absmax_codes == nullptr || w.absmax_scale == nullptr || w.dynamic_map == nullptr))
    return cudaErrorInvalidValue;
  if (w.n == 0) return cudaSuccess;
  INFERLAB_DISPATCH_DTYPE(dtype, T,
    nf4_dequantize_kernel<T><<<grid_stride_blocks(w.n, kThreads), kThreads, 0, stream>>>(w, static_cast<T*>(out)));
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
