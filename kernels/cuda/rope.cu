#include "cuda/rope.cuh"

#include <algorithm>

#include "cuda/launch_checks.cuh"
#include "cuda/rope_math.cuh"

namespace inferlab::kernels::cuda {

namespace {

// Block (row r, position group g); a thread takes pairs i and rotates them in
// every head of the group with one sine/cosine.
__global__ void rope_kernel(float* x, int64_t rows, int64_t row_stride, int64_t n_heads, int64_t head_dim,
                            const int32_t* positions, int32_t groups, const RopeFreqs freqs) {
  const int64_t r = blockIdx.x, g = blockIdx.y;
  const int32_t position = positions[g * rows + r];
  // Heads h with h * groups / n_heads == g.
  const int64_t h_begin = (g * n_heads + groups - 1) / groups, h_end = ((g + 1) * n_heads + groups - 1) / groups;
  for (int32_t i = threadIdx.x; i < freqs.half; i += blockDim.x) {
    float c, s;
    rope_cos_sin(freqs, i, position, &c, &s);
    for (int64_t h = h_begin; h < h_end; ++h) {
      float* head = x + r * row_stride + h * head_dim;
      rope_rotate_pair(freqs, i, c, s, [&](int32_t d) { return head[d]; }, [&](int32_t d, float v) { head[d] = v; });
    }
  }
}

}  // namespace

cudaError_t rope(float* x, int64_t rows, int64_t row_stride, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                 const int32_t* positions, int32_t position_groups, float theta, bool neox, cudaStream_t stream,
                 const RopeScaling& scaling) {
  RopeFreqs freqs;
  if (rows < 0 || rows > kMaxGridX || n_heads <= 0 || head_dim <= 0 || rope_dim > head_dim ||
      n_heads * head_dim > row_stride || position_groups < 1 || position_groups > n_heads ||
      position_groups > 65535 || !make_rope_freqs(rope_dim, theta, neox, &freqs, scaling))
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int threads = int(std::min<int64_t>(128, (freqs.half + 31) / 32 * 32));
  rope_kernel<<<dim3(unsigned(rows), unsigned(position_groups)), threads, 0, stream>>>(
      x, rows, row_stride, n_heads, head_dim, positions, position_groups, freqs);
  return cudaGetLastError();
}

namespace {

__global__ void cache_positions_kernel(const int32_t* n_cached, int32_t n_rows, int32_t* out) {
  const int32_t g = blockIdx.y;
  for (int32_t i = blockIdx.x * blockDim.x + threadIdx.x; i < n_rows; i += gridDim.x * blockDim.x)
    out[int64_t(g) * n_rows + i] = n_cached[g] + i;
}

}  // namespace

cudaError_t cache_positions(const int32_t* n_cached, int32_t n_kv_heads, int32_t n_rows, int32_t* out,
                            cudaStream_t stream) {
  if (n_kv_heads <= 0 || n_kv_heads > 65535 || n_rows <= 0) return cudaErrorInvalidValue;
  const dim3 grid(std::min(unsigned((n_rows + 255) / 256), 1024u), unsigned(n_kv_heads));
  cache_positions_kernel<<<grid, 256, 0, stream>>>(n_cached, n_rows, out);
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
