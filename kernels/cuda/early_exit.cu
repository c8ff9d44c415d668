// The library is built with fast math, which only approximates float
// exponentials and divisions: the confidences are computed in double, as
// their twins do, since a threshold may sit close to 1 (cosines) or compare
// small probabilities (margins).
#include "cuda/early_exit.cuh"

#include "cuda/block_reduce.cuh"

namespace inferlab::kernels::cuda {

namespace {

constexpr int kMarginThreads = 1024;  // one block over the vocabulary: a few hundred logits per thread
constexpr int kRowThreads = 256;      // one block over a residual row

// The two largest values of a multiset (a repeated maximum is also the second).
struct Top2 {
  float first, second;
};

__device__ __forceinline__ Top2 top2_merge(Top2 a, Top2 b) {
  return a.first >= b.first ? Top2{a.first, fmaxf(a.second, b.first)} : Top2{b.first, fmaxf(a.first, b.second)};
}

__device__ __forceinline__ Top2 warp_top2(Top2 t) {
  for (int offset = 16; offset > 0; offset >>= 1)
    t = top2_merge(t, Top2{__shfl_xor_sync(0xffffffffu, t.first, offset),
                           __shfl_xor_sync(0xffffffffu, t.second, offset)});
  return t;
}

// Over the block (blockDim.x a multiple of 32); every thread calls it and gets the result.
__device__ Top2 block_top2(Top2 t) {
  __shared__ float firsts[32], seconds[32];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n_warps = blockDim.x / 32;
  t = warp_top2(t);
  __syncthreads();  // the arrays may still be read by a previous call
  if (lane == 0) {
    firsts[warp] = t.first;
    seconds[warp] = t.second;
  }
  __syncthreads();
  t = lane < n_warps ? Top2{firsts[lane], seconds[lane]} : Top2{-INFINITY, -INFINITY};
  return warp_top2(t);
}

// Two passes over the logits: the top two (NaN skipped: as -infinity it
// changes neither), then the sum of exp(v - top1) over the finite ones.
__global__ void softmax_margin_kernel(const float* logits, int64_t n, float* out) {
  Top2 top{-INFINITY, -INFINITY};
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = logits[i];
    if (!isnan(v)) top = top2_merge(top, Top2{v, -INFINITY});
  }
  top = block_top2(top);
  if (top.first == -INFINITY) {  // the same for every thread: no finite logit
    if (threadIdx.x == 0) *out = 0.0f;
    return;
  }
  const double first = top.first;
  double sum = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float v = logits[i];
    if (!isnan(v)) sum += exp(double(v) - first);
  }
  sum = block_sum_double(sum);
  if (threadIdx.x != 0) return;
  const double second = top.second == -INFINITY ? 0.0 : exp(double(top.second) - first);
  *out = float((1.0 - second) / sum);
}

__global__ void cosine_kernel(const float* a, const float* b, int64_t n, float* out) {
  double ab = 0, aa = 0, bb = 0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const double x = a[i], y = b[i];
    ab += x * y;
    aa += x * x;
    bb += y * y;
  }
  ab = block_sum_double(ab);
  aa = block_sum_double(aa);
  bb = block_sum_double(bb);
  if (threadIdx.x != 0) return;
  *out = aa == 0 || bb == 0 ? 0.0f : float(fmin(1.0, ab / sqrt(aa * bb)));
}

__global__ void two_way_kernel(const float* z, float* out) {
  *out = float(1.0 / (1.0 + exp(double(z[0]) - double(z[1]))));
}

}  // namespace

cudaError_t softmax_margin(const float* logits, int64_t n, float* out, cudaStream_t stream) {
  if (n <= 0) return cudaErrorInvalidValue;
  softmax_margin_kernel<<<1, kMarginThreads, 0, stream>>>(logits, n, out);
  return cudaGetLastError();
}

cudaError_t cosine_similarity(const float* a, const float* b, int64_t n, float* out, cudaStream_t stream) {
  if (n <= 0) return cudaErrorInvalidValue;
  cosine_kernel<<<1, kRowThreads, 0, stream>>>(a, b, n, out);
  return cudaGetLastError();
}

cudaError_t two_way_confidence(const float* z, float* out, cudaStream_t stream) {
  two_way_kernel<<<1, 1, 0, stream>>>(z, out);
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
