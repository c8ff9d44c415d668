#include "cuda/kv_pool.cuh"

#include <algorithm>

#include "cuda/cuda_common.cuh"

namespace inferlab::kernels::cuda {

namespace {

// One block per page, 16-byte words.
__global__ void copy_pages_kernel(KvPages src, KvPages dst, const int32_t* src_pages, const int32_t* dst_pages,
                                  int64_t page_words) {
  const int32_t i = blockIdx.x;
  const int4* from = page_base<int4>(src, src_pages[i]);
  int4* to = page_base<int4>(dst, dst_pages[i]);
  for (int64_t w = threadIdx.x; w < page_words; w += blockDim.x) to[w] = from[w];
}

}  // namespace

cudaError_t kv_copy_pages_between(const KvPages& src, const KvPages& dst, const int32_t* src_pages,
                                  const int32_t* dst_pages, int32_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  const int64_t page_bytes = src.page_elems() * dtype_bytes(src.dtype);
  // 32: the descriptor below holds half a page's words in head_dim.
  if (page_bytes % 32 != 0 || src.page_elems() != dst.page_elems() || src.dtype != dst.dtype)
    return cudaErrorInvalidValue;
  // page_base<int4> scales the in-chunk offset by page_elems() int4 words: give
  // it a descriptor whose page_elems() is the page size in 16-byte words.
  KvPages s = src, d = dst;
  s.page_size = d.page_size = 1;
  s.head_dim = d.head_dim = int32_t(page_bytes / 32);  // page_elems() = 2 * 1 * head_dim = words
  copy_pages_kernel<<<n, 256, 0, stream>>>(s, d, src_pages, dst_pages, page_bytes / 16);
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
  if (n_kv_heads <= 0 || n_rows <= 0) return cudaErrorInvalidValue;
  const dim3 grid(unsigned(std::min(ceil_div(n_rows, 256), 1024)), unsigned(n_kv_heads));
  cache_positions_kernel<<<grid, 256, 0, stream>>>(n_cached, n_rows, out);
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
