#include "cuda/kv_cache_ops.cuh"

#include <algorithm>

#include "bit_planes.h"
#include "cuda/cuda_common.cuh"
#include "cuda/launch_checks.cuh"
#include "cuda/rope_math.cuh"

namespace inferlab::kernels::cuda {

namespace {

// Start of the K row of (page, slot), as bytes; its V row is page_size rows
// further. Rows are kv.row_bytes() long, elements or bit-plane records.
__device__ __forceinline__ char* key_row_bytes(const KvPages& kv, int32_t page, int32_t slot) {
  return static_cast<char*>(kv.chunk_base[page / kv.pages_per_chunk]) +
         (int64_t(page % kv.pages_per_chunk) * 2 * kv.page_size + slot) * kv.row_bytes();
}

// The same K row as elements of T (element pages).
template <typename T>
__device__ __forceinline__ T* key_row(const KvPages& kv, int32_t page, int32_t slot) {
  return reinterpret_cast<T*>(key_row_bytes(kv, page, slot));
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

// The low 32 bits of x86-64's lrint into 64 bits, which is what
// cpu::bit_plane_encode's int32_t(std::lrint(x)) computes: a NaN, or a
// magnitude past 2^63, converts to INT64_MIN, whose low half is 0.
__device__ __forceinline__ int32_t host_lrint32(float x) {
  const float r = rintf(x);  // to nearest, ties to even: lrint's default rounding
  if (!(fabsf(r) < 9.2233720368547758e18f)) return 0;
  return int32_t(static_cast<long long>(r));
}

// The largest of every thread's v (whole warps; NaN gives way, as to std::max(amax, |x|)).
__device__ float block_max(float v, float* red) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
  __syncthreads();  // `red` may still be read by the previous call
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = v;
  __syncthreads();
  float m = red[0];
  for (int w = 1; w < int(blockDim.x / 32); ++w) m = fmaxf(m, red[w]);
  return m;
}

// One row of head_dim floats into its bit-plane record (bit_planes.h), byte
// for byte what cpu::bit_plane_encode writes: IEEE division and product
// (__fdiv_rn, __fmul_rn; under --use_fast_math `/` is approximate), no flush
// of denormal scales (the file is built with -ftz=false), and every byte
// written, the unused high bits of a plane's last byte zero. The whole block
// calls it; `levels` holds head_dim values.
__device__ void encode_row(const float* x, int32_t head_dim, BitPlanes p, uint8_t* record, uint16_t* levels,
                           float* red) {
  float local = 0.0f;
  for (int32_t d = threadIdx.x; d < head_dim; d += blockDim.x) local = fmaxf(local, fabsf(x[d]));
  const float amax = block_max(local, red);
  const int32_t qmax = (1 << (p.bits() - 1)) - 1;
  const float scale = __fdiv_rn(amax, float(qmax));
  const float inv = scale > 0.0f ? __fdiv_rn(1.0f, scale) : 0.0f;
  for (int32_t d = threadIdx.x; d < head_dim; d += blockDim.x) {
    const int32_t q = min(max(host_lrint32(__fmul_rn(x[d], inv)), -qmax), qmax);
    levels[d] = uint16_t(q + qmax + 1);
  }
  __syncthreads();
  // A thread per byte: the scale (little-endian, as the host's memcpy of
  // the float), then the planes.
  const int64_t bytes = bit_plane_row_bytes(head_dim, p);
  const uint32_t scale_bits = __float_as_uint(scale);
  for (int64_t b = threadIdx.x; b < bytes; b += blockDim.x)
    record[b] = b < 4 ? uint8_t(scale_bits >> (8 * b)) : bit_plane_pack_byte(levels, head_dim, p, b - 4);
  __syncthreads();  // `levels` is the next row's
}

// Block (row i, kv head g): its K record, then its V record. Dynamic shared
// memory: head_dim levels.
__global__ void kv_append_planes_kernel(const KvPages kv, LayerPageTable table, const int32_t* first_token,
                                        const float* k, const float* v, int32_t n_kv_heads) {
  extern __shared__ uint16_t levels[];
  __shared__ float red[32];
  const int32_t i = blockIdx.x, g = blockIdx.y, t = first_token[g] + i;
  auto* dst_k = reinterpret_cast<uint8_t*>(
      key_row_bytes(kv, table.pages[int64_t(g) * table.stride + t / kv.page_size], t % kv.page_size));
  uint8_t* dst_v = dst_k + int64_t(kv.page_size) * kv.row_bytes();
  const int64_t src = (int64_t(i) * n_kv_heads + g) * kv.head_dim;
  encode_row(k + src, kv.head_dim, kv.planes, dst_k, levels, red);
  encode_row(v + src, kv.head_dim, kv.planes, dst_v, levels, red);
}

// Block per move: the K and V rows of (page, slot) <-> scratch (move, 2,
// row_bytes), as units U (a size dividing the row's bytes).
template <typename U, bool kToScratch>
__global__ void kv_move_kernel(const KvPages kv, const int32_t* page, const int32_t* slot, char* scratch) {
  const int64_t row_bytes = kv.row_bytes(), units = row_bytes / int64_t(sizeof(U));
  char* k_bytes = key_row_bytes(kv, page[blockIdx.x], slot[blockIdx.x]);
  U* k_row = reinterpret_cast<U*>(k_bytes);
  U* v_row = reinterpret_cast<U*>(k_bytes + int64_t(kv.page_size) * row_bytes);
  U* saved = reinterpret_cast<U*>(scratch + int64_t(blockIdx.x) * 2 * row_bytes);
  for (int64_t u = threadIdx.x; u < units; u += blockDim.x) {
    if (kToScratch) {
      saved[u] = k_row[u];
      saved[units + u] = v_row[u];
    } else {
      k_row[u] = saved[u];
      v_row[u] = saved[units + u];
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
  const dim3 grid{unsigned(n_rows), unsigned(n_kv_heads)};
  if (kv.planes.active()) {
    kv_append_planes_kernel<<<grid, row_threads(kv.head_dim), size_t(kv.head_dim) * sizeof(uint16_t), stream>>>(
        kv, table, first_token, k, v, n_kv_heads);
    return cudaGetLastError();
  }
  INFERLAB_DISPATCH_DTYPE(kv.dtype, T,
    kv_append_kernel<T><<<grid, row_threads(kv.head_dim), 0, stream>>>(kv, table, first_token, k, v, n_kv_heads));
  return cudaGetLastError();
}

size_t kv_move_scratch_bytes(const KvPages& kv, int32_t n_moves) {
  return size_t(std::max(n_moves, 0)) * 2 * size_t(kv.row_bytes());
}

cudaError_t kv_move_rows(const KvPages& kv, const int32_t* src_page, const int32_t* src_slot,
                         const int32_t* dst_page, const int32_t* dst_slot, int32_t n_moves, void* scratch,
                         cudaStream_t stream) {
  if (!valid_pages(kv) || n_moves < 0) return cudaErrorInvalidValue;
  if (n_moves == 0) return cudaSuccess;
  if (scratch == nullptr) return cudaErrorInvalidValue;
  const int64_t row_bytes = kv.row_bytes();
  const int unit = copy_unit_dividing(row_bytes);
  const int threads = row_threads(int32_t(row_bytes / unit));
  auto* saved = static_cast<char*>(scratch);
  // Stream order makes the scatter wait for the whole gather.
  INFERLAB_DISPATCH_COPY_UNIT(unit, U,
    kv_move_kernel<U, true><<<unsigned(n_moves), threads, 0, stream>>>(kv, src_page, src_slot, saved);
    kv_move_kernel<U, false><<<unsigned(n_moves), threads, 0, stream>>>(kv, dst_page, dst_slot, saved));
  return cudaGetLastError();
}

cudaError_t kv_rope_shift(const KvPages& kv, const int32_t* page, const int32_t* slot, const int32_t* delta,
                          int32_t n, int32_t rope_dim, float theta, bool neox, cudaStream_t stream,
                          const RopeScaling& scaling) {
  RopeFreqs freqs;
  if (!valid_element_pages(kv) || n < 0 || rope_dim > kv.head_dim || !make_rope_freqs(rope_dim, theta, neox, &freqs, scaling))
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int threads = int(std::min<int64_t>(128, (freqs.half + 31) / 32 * 32));
  INFERLAB_DISPATCH_DTYPE(kv.dtype, T,
    kv_rope_shift_kernel<T><<<unsigned(n), threads, 0, stream>>>(kv, page, slot, delta, freqs));
  return cudaGetLastError();
}

cudaError_t kv_rope_from_originals(const KvPages& kv, const int32_t* page, const int32_t* slot,
                                   const int32_t* origin_page, const int32_t* delta, const int32_t* save, int32_t n,
                                   int32_t rope_dim, float theta, bool neox, cudaStream_t stream,
                                   const RopeScaling& scaling) {
  RopeFreqs freqs;
  if (!valid_element_pages(kv) || n < 0 || rope_dim > kv.head_dim || !make_rope_freqs(rope_dim, theta, neox, &freqs, scaling))
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
  const int64_t page_bytes = from.page_bytes();
  // Pages of one layout: bit-plane records of one width pair, or elements.
  if (to.page_bytes() != page_bytes || from.planes.msb != to.planes.msb || from.planes.lsb != to.planes.lsb)
    return cudaErrorInvalidValue;
  if (n == 0) return cudaSuccess;
  const int unit = copy_unit_dividing(page_bytes);
  const unsigned slices = unsigned(std::min<int64_t>(8, (page_bytes / unit + 255) / 256));
  INFERLAB_DISPATCH_COPY_UNIT(unit, U,
    kv_copy_pages_kernel<U><<<dim3(unsigned(n), slices), 256, 0, stream>>>(from, to, src, dst, page_bytes));
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
