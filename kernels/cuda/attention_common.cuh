// Internals shared by the attention kernels (attention_prefill.cu,
// attention_decode.cu): key lists, KV row addresses, warp reductions and the
// PTX wrappers (cp.async, ldmatrix, mma.sync m16n8k16).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <mutex>
#include <set>

#include "cuda/attention.cuh"
#include "cuda/cuda_common.cuh"
#include "kernel_types.h"

namespace inferlab::kernels::cuda::attn {

constexpr float kLog2e = 1.4426950408889634f;
constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kTileKeys = 64;  // keys per K/V tile in shared memory, both kernels
constexpr int kRowPad = 8;     // elements of padding per smem row: 16 bytes, no bank conflicts

// K row of stored token t of kv head g; its V row is page_size * head_dim further.
template <typename T>
__device__ __forceinline__ const T* key_row(const AttentionCall& c, int32_t g, int32_t t) {
  const int32_t page = c.table.pages[int64_t(g) * c.table.stride + t / c.kv.page_size];
  const int64_t page_elems = 2 * int64_t(c.kv.page_size) * c.kv.head_dim;
  return static_cast<const T*>(c.kv.chunk_base[page / c.kv.pages_per_chunk]) +
         int64_t(page % c.kv.pages_per_chunk) * page_elems + int64_t(t % c.kv.page_size) * c.kv.head_dim;
}

__device__ __forceinline__ int32_t ceil_div_dev(int32_t a, int32_t b) { return (a + b - 1) / b; }

__device__ __forceinline__ int32_t warp_sum(int32_t x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}
__device__ __forceinline__ float warp_sum(float x) {
  for (int o = 16; o > 0; o >>= 1) x += __shfl_xor_sync(kFullMask, x, o);
  return x;
}
__device__ __forceinline__ float warp_max(float x) {
  for (int o = 16; o > 0; o >>= 1) x = fmaxf(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}
__device__ __forceinline__ int32_t warp_min(int32_t x) {
  for (int o = 16; o > 0; o >>= 1) x = min(x, __shfl_xor_sync(kFullMask, x, o));
  return x;
}

// The keys of one kv head in order (kernel_types.h): n_selected cached tokens
// picked by its KeySelect, then the call's n_rows new tokens. Key k maps to a
// stored token without a search because selections are ascending, so only the
// last listed page holding cached tokens can be partial.
struct KeyList {
  KeySelect mode = KeySelect::All;
  int32_t n_cached = 0, n_selected = 0, n_rows = 0, page_size = 1;
  const int32_t* index = nullptr;   // the head's select_index range
  const uint32_t* heads = nullptr;  // beside index: the group's query heads of each entry; null: all

  __device__ int32_t n_keys() const { return n_selected + n_rows; }
  __device__ int32_t token(int32_t k) const {
    if (k >= n_selected) return n_cached + (k - n_selected);
    if (mode == KeySelect::Tokens) return index[k];
    if (mode == KeySelect::Pages) return index[k / page_size] * page_size + k % page_size;
    return k;
  }
  // The group's query heads that read key k (bit i: head i of the group).
  __device__ uint32_t key_heads(int32_t k) const {
    if (heads == nullptr || k >= n_selected) return ~0u;
    return mode == KeySelect::Tokens ? heads[k] : heads[k / page_size];
  }
};

// Every lane of the calling warp gets the key list of kv head g.
__device__ inline KeyList warp_key_list(const AttentionCall& c, int32_t g) {
  KeyList l;
  l.n_cached = c.n_cached[g];
  l.n_rows = c.n_rows;
  l.page_size = c.kv.page_size;
  l.mode = c.select != nullptr ? KeySelect(c.select[g]) : KeySelect::All;
  l.n_selected = l.n_cached;
  if (l.mode == KeySelect::All) return l;
  const int32_t begin = c.select_indptr[g], end = c.select_indptr[g + 1];
  l.index = c.select_index + begin;
  // Tokens and pages outside the cache are skipped (as in the twin);
  // ascending, the negative ones come first, so the list starts after them.
  int32_t count = 0, negative = 0;
  for (int32_t j = begin + int32_t(threadIdx.x % 32); j < end; j += 32) {
    const int32_t x = c.select_index[j];
    negative += x < 0 ? 1 : 0;
    if (l.mode == KeySelect::Tokens)
      count += x >= 0 && x < l.n_cached ? 1 : 0;
    else if (x >= 0)
      count += min(max(l.n_cached - x * l.page_size, 0), l.page_size);
  }
  l.n_selected = warp_sum(count);
  negative = warp_sum(negative);
  l.index += negative;
  if (c.select_heads != nullptr) l.heads = c.select_heads + begin + negative;
  return l;
}

__device__ __forceinline__ bool head_active(const AttentionCall& c, int32_t h) {
  return c.head_active == nullptr || c.head_active[h] != 0;
}

// --- PTX wrappers -----------------------------------------------------------

__device__ __forceinline__ uint32_t smem_addr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy that does not block the thread.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(smem_addr(smem)), "l"(gmem));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending));
}

// Four 8x8 b16 matrices; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* smem) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(smem_addr(smem)));
}

// Two floats as a packed pair of T (the lower column in the low half).
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

// d(16x8, f32) += a(16x16, row) * b(16x8, col) on tensor cores.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Eight T (16 bytes) to float.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&f)[8]) {
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int i = 0; i < 8; ++i) f[i] = to_float<T>(e[i]);
}

// Issues the cp.async copies of one K/V tile into buffer `buf` of `sm` (any
// struct with k, v [2][kTileKeys][D + kRowPad] and row [2][kTileKeys]); keys
// without a row get zeros, so masked keys never feed NaN garbage into P*V.
template <typename T, int D, typename Smem>
__device__ __forceinline__ void load_kv_tile(Smem& sm, int buf, int64_t v_offset, bool with_v) {
  constexpr int kChunks = D * int(sizeof(T)) / 16;  // 16-byte pieces of a row
  for (int i = threadIdx.x; i < kTileKeys * kChunks; i += blockDim.x) {
    const int key = i / kChunks, part = i % kChunks;
    const T* src = sm.row[buf][key];
    T* k = &sm.k[buf][key][part * 8];
    T* v = &sm.v[buf][key][part * 8];
    if (src != nullptr) {
      cp_async_16(k, src + part * 8);
      if (with_v) cp_async_16(v, src + v_offset + part * 8);
    } else {
      *reinterpret_cast<uint4*>(k) = make_uint4(0, 0, 0, 0);
      if (with_v) *reinterpret_cast<uint4*>(v) = make_uint4(0, 0, 0, 0);
    }
  }
}

// --- Launchers (attention_prefill.cu, attention_decode.cu) -------------------

// Lets `kernel` use `bytes` of dynamic shared memory and asks for the largest
// shared-memory carveout, so two such CTAs fit on an SM.
template <typename Kernel>
cudaError_t configure_smem(Kernel kernel, int bytes) {
  const cudaError_t e = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (e != cudaSuccess) return e;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributePreferredSharedMemoryCarveout, int(cudaSharedmemCarveoutMaxShared));
}

// configure_smem once per (kernel, device): the attributes belong to the
// device that is current when they are set, so a process on two GPUs sets them
// on each. A failure is not remembered (the next launch tries again).
template <typename Kernel>
cudaError_t configure_smem_once(Kernel kernel, int bytes) {
  static std::mutex mutex;
  static std::set<int> configured;  // devices (one set per kernel instantiation)
  int device = 0;
  if (const cudaError_t e = cudaGetDevice(&device); e != cudaSuccess) return e;
  std::lock_guard<std::mutex> lock(mutex);
  if (configured.count(device) != 0) return cudaSuccess;
  const cudaError_t e = configure_smem(kernel, bytes);
  if (e == cudaSuccess) configured.insert(device);
  return e;
}

cudaError_t launch_prefill(const AttentionCall& c, cudaStream_t stream);
size_t decode_workspace_bytes(const AttentionCall& c, int32_t max_keys);
cudaError_t launch_decode(const AttentionCall& c, int32_t max_keys, void* workspace, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda::attn
