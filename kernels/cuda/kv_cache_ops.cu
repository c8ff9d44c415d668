#include "cuda/kv_cache_ops.cuh"

#include <algorithm>

#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"
#include "cuda/rope_math.cuh"

namespace inferlab::kernels::cuda {

namespace {

// K row of (page, slot); its V row is page_size * head_dim further. The page
// size is spelled out rather than page_base's KvPages::page_elems, which was
// host-only when this was written.
template <typename T>
__device__ __forceinline__ T* key_row(const KvPages& kv, int32_t page, int32_t slot) {
  const int64_t page_elems = 2 * int64_t(kv.page_size) * kv.head_dim;
  return static_cast<T*>(kv.chunk_base[page / kv.pages_per_chunk]) + int64_t(page % kv.pages_per_chunk) * page_elems +
         int64_t(slot) * kv.head_dim;
}

// Block (row i, kv head g).
template <typename T>
__global__ void kv_append_kernel(const KvPages kv, LayerPageTable table, const int32_t* first_token,
                                 const float* k, const float* v, int32_t n_kv_heads) {
  const int32_t i = blockIdx.x, g = blockIdx.y, t = first_token[g] + i;
  T* dst_k = key_row<T>(kv, table.pages[int64_t(g) * table.stride + t / kv.page_size], t % kv.page_size);
  T* dst_v = dst_k + int64_t(kv.page_size) * kv.head_dim;
  const int64_t src = (int64_t(i) * n_kv_heads + g) * kv.head_dim;
  for (int32_t d = threadIdx.x; d < kv.head_dim; d += blockDim.x) {
    dst_k[d] = from_float<T>(k[src + d]);
    dst_v[d] = from_float<T>(v[src + d]);
  }
}

// Block per move: K and V rows of (page, slot) <-> scratch(move, 2, head_dim).
template <typename T, bool kToScratch>
__global__ void kv_move_kernel(const KvPages kv, const int32_t* page, const int32_t* slot, T* scratch) {
  T* k_row = key_row<T>(kv, page[blockIdx.x], slot[blockIdx.x]);
  T* v_row = k_row + int64_t(kv.page_size) * kv.head_dim;
  T* saved = scratch + int64_t(blockIdx.x) * 2 * kv.head_dim;
  for (int32_t d = threadIdx.x; d < kv.head_dim; d += blockDim.x) {
    if (kToScratch) {
      saved[d] = k_row[d];
      saved[kv.head_dim + d] = v_row[d];
    } else {
      k_row[d] = saved[d];
      v_row[d] = saved[kv.head_dim + d];
    }
  }
}

// Block per key row; a thread takes pairs.
template <typename T>
__global__ void kv_rope_shift_kernel(const KvPages kv, const int32_t* page, const int32_t* slot,
                                     const int32_t* delta, const RopeFreqs freqs) {
  T* row = key_row<T>(kv, page[blockIdx.x], slot[blockIdx.x]);
  const int32_t shift = delta[blockIdx.x];
  for (int32_t i = threadIdx.x; i < freqs.half; i += blockDim.x) {
    float c, s;
    rope_cos_sin(freqs, i, shift, &c, &s);
    rope_rotate_pair(freqs, i, c, s, [&](int32_t d) { return to_float(row[d]); },
                     [&](int32_t d, float x) { row[d] = from_float<T>(x); });
  }
}

// Block per key row; a thread takes pairs, each read (and saved) before it is written.
template <typename T>
__global__ void kv_rope_from_originals_kernel(const KvPages kv, const int32_t* page, const int32_t* slot,
                                              const int32_t* origin_page, const int32_t* delta, const int32_t* save,
                                              const RopeFreqs freqs) {
  T* row = key_row<T>(kv, page[blockIdx.x], slot[blockIdx.x]);
  T* original = key_row<T>(kv, origin_page[blockIdx.x], slot[blockIdx.x]);
  const bool first = save[blockIdx.x] != 0;
  const int32_t shift = delta[blockIdx.x];
  for (int32_t i = threadIdx.x; i < freqs.half; i += blockDim.x) {
    float c, s;
    rope_cos_sin(freqs, i, shift, &c, &s);
    rope_rotate_pair(freqs, i, c, s,
                     [&](int32_t d) {
                       const T x = first ? row[d] : original[d];
                       if (first) original[d] = x;
                       return to_float(x);
                     },
                     [&](int32_t d, float x) { row[d] = from_float<T>(x); });
  }
}

// Block (pair j, slice of the page); U is the copy unit, page_bytes a multiple of it.
template <typename U>
__global__ void kv_copy_pages_kernel(const KvPages from_kv, const KvPages to_kv, const int32_t* src,
                                     const int32_t* dst, int64_t page_bytes) {
  const auto page_start = [&](const KvPages& kv, int32_t page) {
    return static_cast<char*>(kv.chunk_base[page / kv.pages_per_chunk]) + int64_t(page % kv.pages_per_chunk) * page_bytes;
  };
  const U* from = reinterpret_cast<const U*>(page_start(from_kv, src[blockIdx.x]));
  U* to = reinterpret_cast<U*>(page_start(to_kv, dst[blockIdx.x]));
  const int64_t units = page_bytes / int64_t(sizeof(U));
  for (int64_t u = int64_t(blockIdx.y) * blockDim.x + threadIdx.x; u < units; u += int64_t(gridDim.y) * blockDim.x)
    to[u] = from[u];
}

// Slot planes: thread per value.
__global__ void slot_plane_fill_kernel(LayerPageTable table, const int32_t* first_token, int32_t n_rows,
                                       int32_t page_size, uint32_t* plane, uint32_t value) {
  const int32_t g = blockIdx.y, i = blockIdx.x * blockDim.x + threadIdx.x;
  if (i >= n_rows) return;
  const int32_t t = first_token[g] + i;
  plane[int64_t(table.pages[int64_t(g) * table.stride + t / page_size]) * page_size + t % page_size] = value;
}

template <bool kToScratch>
__global__ void slot_plane_move_kernel(uint32_t* plane, int32_t page_size, const int32_t* page, const int32_t* slot,
                                       int32_t n, uint32_t* scratch) {
  const int32_t j = blockIdx.x * blockDim.x + threadIdx.x;
  if (j >= n) return;
  uint32_t& value = plane[int64_t(page[j]) * page_size + slot[j]];
  if (kToScratch) scratch[j] = value;
  else value = scratch[j];
}

// Block (pair j); a thread per slot.
__global__ void slot_plane_copy_kernel(const uint32_t* from, uint32_t* to, int32_t page_size, const int32_t* src,
                                       const int32_t* dst) {
  for (int32_t s = threadIdx.x; s < page_size; s += blockDim.x)
    to[int64_t(dst[blockIdx.x]) * page_size + s] = from[int64_t(src[blockIdx.x]) * page_size + s];
}

}  // namespace

cudaError_t slot_plane_fill(LayerPageTable table, const int32_t* first_token, int32_t n_rows, int32_t n_kv_heads,
                            int32_t page_size, uint32_t* plane, uint32_t value, cudaStream_t stream) {
  if (n_rows < 0 || n_kv_heads < 0 || n_kv_heads > 65535 || page_size <= 0) return cudaErrorInvalidValue;
  if (n_rows == 0 || n_kv_heads == 0) return cudaSuccess;
  if (plane == nullptr || table.pages == nullptr || first_token == nullptr) return cudaErrorInvalidValue;
  slot_plane_fill_kernel<<<dim3(unsigned(ceil_div(n_rows, 128)), unsigned(n_kv_heads)), 128, 0, stream>>>(
      table, first_token, n_rows, page_size, plane, value);
  return cudaGetLastError();
}

cudaError_t slot_plane_move(uint32_t* plane, int32_t page_size, const int32_t* src_page, const int32_t* src_slot,
                            const int32_t* dst_page, const int32_t* dst_slot, int32_t n_moves, uint32_t* scratch,
                            cudaStream_t stream) {
  if (n_moves < 0 || page_size <= 0) return cudaErrorInvalidValue;
  if (n_moves == 0) return cudaSuccess;
  if (plane == nullptr || scratch == nullptr) return cudaErrorInvalidValue;
  const unsigned blocks = unsigned(ceil_div(n_moves, 256));
  // Stream order makes the scatter wait for the whole gather.
  slot_plane_move_kernel<true><<<blocks, 256, 0, stream>>>(plane, page_size, src_page, src_slot, n_moves, scratch);
  slot_plane_move_kernel<false><<<blocks, 256, 0, stream>>>(plane, page_size, dst_page, dst_slot, n_moves, scratch);
  return cudaGetLastError();
}

cudaError_t slot_plane_copy_pages(const uint32_t* from, uint32_t* to, int32_t page_size, const int32_t* src,
                                  const int32_t* dst, int32_t n, cudaStream_t stream) {
  if (n < 0 || page_size <= 0) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  if (from == nullptr || to == nullptr) return cudaErrorInvalidValue;
  slot_plane_copy_kernel<<<unsigned(n), unsigned(std::min(page_size, 256)), 0, stream>>>(from, to, page_size, src, dst);
  return cudaGetLastError();
}

cudaError_t kv_append(const KvPages& kv, LayerPageTable table, const int32_t* first_token, const float* k,
                      const float* v, int32_t n_rows, int32_t n_kv_heads, cudaStream_t stream) {
  if (!valid_pages(kv) || n_rows < 0 || n_kv_heads < 0 || n_kv_heads > 65535 || table.stride < 0)
    return cudaErrorInvalidValue;
  if (n_rows == 0 || n_kv_heads == 0) return cudaSuccess;
  INFERLAB_DISPATCH_DTYPE(kv.dtype, T,
    kv_append_kernel<T><<<dim3(unsigned(n_rows), unsigned(n_kv_heads)), row_threads(kv.head_dim), 0, stream>>>(
        kv, table, first_token, k, v, n_kv_heads));
  return cudaGetLastError();
}

size_t kv_move_scratch_bytes(const KvPages& kv, int32_t n_moves) {
  return size_t(std::max(n_moves, 0)) * 2 * size_t(kv.head_dim) * size_t(dtype_bytes(kv.dtype));
}

cudaError_t kv_move_rows(const KvPages& kv, const int32_t* src_page, const int32_t* src_slot,
                         const int32_t* dst_page, const int32_t* dst_slot, int32_t n_moves, void* scratch,
                         cudaStream_t stream) {
  if (!valid_pages(kv) || n_moves < 0) return cudaErrorInvalidValue;
  if (n_moves == 0) return cudaSuccess;
  if (scratch == nullptr) return cudaErrorInvalidValue;
  const int threads = row_threads(kv.head_dim);
  // Stream order makes the scatter wait for the whole gather.
  INFERLAB_DISPATCH_DTYPE(kv.dtype, T,
    kv_move_kernel<T, true><<<unsigned(n_moves), threads, 0, stream>>>(kv, src_page, src_slot, static_cast<T*>(scratch));
    kv_move_kernel<T, false><<<unsigned(n_moves), threads, 0, stream>>>(kv, dst_page, dst_slot, static_cast<T*>(scratch)));
  return cudaGetLastError();
}

cudaError_t kv_rope_shift(const KvPages& kv, const int32_t* page, const int32_t* slot, const int32_t* delta,
                          int32_t n, int32_t rope_dim, float theta, bool neox, cudaStream_t stream) {
  RopeFreqs freqs;
  if (!valid_pages(kv) || n < 0 || rope_dim > kv.head_dim || !make_rope_freqs(rope_dim, theta, neox, &freqs))
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int threads = int(std::min<int64_t>(128, (freqs.half + 31) / 32 * 32));
  INFERLAB_DISPATCH_DTYPE(kv.dtype, T,
    kv_rope_shift_kernel<T><<<unsigned(n), threads, 0, stream>>>(kv, page, slot, delta, freqs));
  return cudaGetLastError();
}

cudaError_t kv_rope_from_originals(const KvPages& kv, const int32_t* page, const int32_t* slot,
                                   const int32_t* origin_page, const int32_t* delta, const int32_t* save, int32_t n,
                                   int32_t rope_dim, float theta, bool neox, cudaStream_t stream) {
  RopeFreqs freqs;
  if (!valid_pages(kv) || n < 0 || rope_dim > kv.head_dim || !make_rope_freqs(rope_dim, theta, neox, &freqs))
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int threads = int(std::min<int64_t>(128, (freqs.half + 31) / 32 * 32));
  INFERLAB_DISPATCH_DTYPE(kv.dtype, T,
    kv_rope_from_originals_kernel<T><<<unsigned(n), threads, 0, stream>>>(kv, page, slot, origin_page, delta, save,
                                                                          freqs));
  return cudaGetLastError();
}

cudaError_t kv_copy_pages(const KvPages& kv, const int32_t* src, const int32_t* dst, int32_t n, cudaStream_t stream) {
  return kv_copy_pages(kv, kv, src, dst, n, stream);
}

cudaError_t kv_copy_pages(const KvPages& from, const KvPages& to, const int32_t* src, const int32_t* dst, int32_t n,
                          cudaStream_t stream) {
  if (!valid_pages(from) || !valid_pages(to) || n < 0) return cudaErrorInvalidValue;
  const int64_t page_bytes = from.page_elems() * dtype_bytes(from.dtype);
  if (to.page_elems() * dtype_bytes(to.dtype) != page_bytes) return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  // Pages start at multiples of the page's bytes from 16-byte aligned chunks.
  const int unit = page_bytes % 16 == 0 ? 16 : page_bytes % 4 == 0 ? 4 : 2;
  const unsigned slices = unsigned(std::min<int64_t>(8, (page_bytes / unit + 255) / 256));
  INFERLAB_DISPATCH_COPY_UNIT(unit, U,
    kv_copy_pages_kernel<U><<<dim3(unsigned(n), slices), 256, 0, stream>>>(from, to, src, dst, page_bytes));
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
