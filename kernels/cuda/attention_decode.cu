// Split-K flash-decoding for calls with a few query rows. A CTA per (split,
// kv head) holds all of the group's query rows (n_rows * group_size <= 16
// queries), so each K/V row is read from memory once per group; a split takes
// a contiguous share of the head's key list, streams it in 64-key tiles
// through shared memory with cp.async (16-byte copies, 2-3 tiles in flight), and
// writes its partial (max, sum, unnormalized output) per query. A merge kernel
// combines the splits; with statistics, a third kernel re-reads K and adds
// each key's probability to key_mass. Work is on CUDA cores: at <= 16 queries
// per key the kernel is bound by memory bandwidth.
#include <algorithm>

#include "cuda/attention_common.cuh"

namespace inferlab::kernels::cuda::attn {
namespace {

constexpr int kThreads = 128;
constexpr int kMinKeysPerSplit = 128;
constexpr int kCtasPerSm = 2;  // resident decode CTAs per SM (shared memory bound)

template <typename T, int D, int NQ>
struct DecodeSmem {
  // Tiles in flight: three when two CTAs of that size still fit an SM (H100: 228 KiB).
  static constexpr int kStages = NQ <= 4 ? 3 : 2;
  T k[kStages][kTileKeys][D + kRowPad];  // K tiles
  T v[kStages][kTileKeys][D + kRowPad];  // V tiles
  const T* row[kStages][kTileKeys];      // K row of each key of a tile; null: no key (zeros)
  uint32_t heads[kStages][kTileKeys];    // the group's query heads that read each key (bit per head)
  float q[NQ][D];                  // queries * scale * log2(e); zeros for inactive heads and padding
  float p[NQ][kTileKeys];          // a tile's scores, then probabilities
  float out[NQ][D];                // sum of the key slices' partial outputs
  float m[NQ], l[NQ], alpha[NQ];   // running max, running sum, this tile's rescale
  int32_t lim[NQ];                 // query qi sees keys k < lim[qi]; 0: none
};

// Partials of every (kv head, split, query), then the merged log2-sum-exp2.
struct DecodeWorkspace {
  float* o;    // (n_kv_heads, n_splits, n_q, D) unnormalized outputs
  float* m;    // (n_kv_heads, n_splits, n_q) running max (log2 domain)
  float* l;    // (n_kv_heads, n_splits, n_q) sum of exp2(s - m)
  float* lse;  // (n_kv_heads, n_q)
};

int32_t sm_count() {
  int device = 0, n = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, device);
  return std::max(n, 1);
}

// Splits per kv head: one wave of resident CTAs, at least kMinKeysPerSplit
// keys each. Host fields and max_keys only (CUDA-graph safe).
int32_t decode_splits(const AttentionCall& c, int32_t max_keys) {
  const int32_t by_keys = std::max(1, ceil_div(std::max(max_keys, 1), kMinKeysPerSplit));
  const int32_t by_sms = std::max(1, kCtasPerSm * sm_count() / std::max(c.n_kv_heads, 1));
  return std::min(by_keys, by_sms);
}

DecodeWorkspace carve_workspace(const AttentionCall& c, int32_t n_splits, void* base) {
  const int64_t n_q = int64_t(c.n_rows) * c.group_size(), parts = int64_t(c.n_kv_heads) * n_splits * n_q;
  float* f = static_cast<float*>(base);
  return {f, f + parts * c.head_dim, f + parts * (c.head_dim + 1), f + parts * (c.head_dim + 2)};
}

// The CTA's kv head and its share [k_begin, k_end) of the key list: tiles of
// whole 64-key steps, from device-side counts.
struct DecodeCta {
  int32_t g = 0, group = 1, n_q = 0, k_begin = 0, k_end = 0;
  KeyList list;
};

__device__ DecodeCta make_decode_cta(const AttentionCall& c) {
  DecodeCta cta;
  cta.g = int32_t(blockIdx.y);
  cta.group = c.n_heads / c.n_kv_heads;
  cta.n_q = c.n_rows * cta.group;
  cta.list = warp_key_list(c, cta.g);
  // The cut depends on this head's own key count only, not on the grid the
  // host sized from a bound (a graph's key bound or the largest head's count):
  // splits beyond the first ceil(n_keys / kMinKeysPerSplit) stay empty, so a
  // replayed step and an eager one sum the same keys in the same order.
  const int32_t n_keys = cta.list.n_keys();
  const int32_t used = min(int32_t(gridDim.x), max(1, ceil_div_dev(n_keys, kMinKeysPerSplit)));
  const int32_t share = ceil_div_dev(ceil_div_dev(n_keys, used), kTileKeys) * kTileKeys;
  cta.k_begin = min(n_keys, int32_t(blockIdx.x) * share);
  cta.k_end = min(n_keys, cta.k_begin + share);
  // A kv head whose query heads are all masked reads no key (its outputs are zeros).
  bool any_active = false;
  for (int32_t j = 0; j < cta.group; ++j) any_active = any_active || head_active(c, cta.g * cta.group + j);
  if (!any_active) cta.k_begin = cta.k_end;
  return cta;
}

// Query qi = row * group + j is row `row` of query head g * group + j.
template <int D, int NQ>
__device__ void load_queries(const AttentionCall& c, const DecodeCta& cta, float (*q)[D], int32_t* lim) {
  const float qscale = c.scale * kLog2e;
  for (int i = int(threadIdx.x); i < NQ * D; i += blockDim.x) {
    const int qi = i / D, d = i % D;
    const int32_t row = qi / cta.group, h = cta.g * cta.group + qi % cta.group;
    const bool active = qi < cta.n_q && head_active(c, h);
    q[qi][d] = active ? c.q[int64_t(row) * c.n_heads * D + int64_t(h) * D + d] * qscale : 0.0f;
    if (d == 0) lim[qi] = active ? cta.list.n_selected + row + 1 : 0;
  }
}

// Threads 0..63: K row pointers of the tile at `start` into buffer `buf`.
template <typename T, int D, int NQ>
__device__ void plan_decode_tile(const AttentionCall& c, const DecodeCta& cta, DecodeSmem<T, D, NQ>& sm, int buf,
                                 int32_t start) {
  if (threadIdx.x >= kTileKeys) return;
  const int32_t k = start + int32_t(threadIdx.x);
  sm.row[buf][threadIdx.x] = k < cta.k_end ? key_row<T>(c, cta.g, cta.list.token(k)) : nullptr;
  sm.heads[buf][threadIdx.x] = k < cta.k_end ? cta.list.key_heads(k) : 0u;
}

__device__ __forceinline__ float dot8(const float* q, const float (&k)[8]) {
  const float4 a = *reinterpret_cast<const float4*>(q), b = *reinterpret_cast<const float4*>(q + 4);
  return a.x * k[0] + a.y * k[1] + a.z * k[2] + a.w * k[3] + b.x * k[4] + b.y * k[5] + b.z * k[6] + b.w * k[7];
}

// Scores of the tile into sm.p: thread = (key, half of the queries).
template <typename T, int D, int NQ>
__device__ void decode_scores(const DecodeCta& cta, DecodeSmem<T, D, NQ>& sm, int buf, int32_t start) {
  constexpr int kPerThread = (NQ + 1) / 2;
  const int key = int(threadIdx.x) % kTileKeys, part = int(threadIdx.x) / kTileKeys;
  float acc[kPerThread] = {};
#pragma unroll 4
  for (int ch = 0; ch < D / 8; ++ch) {
    float kf[8];
    unpack8<T>(*reinterpret_cast<const uint4*>(&sm.k[buf][key][ch * 8]), kf);
#pragma unroll
    for (int i = 0; i < kPerThread; ++i)
      if (part + 2 * i < NQ) acc[i] += dot8(&sm.q[part + 2 * i][ch * 8], kf);
  }
  const int32_t k = start + key;
  const uint32_t readers = sm.heads[buf][key];  // per query head selections: a head sees only its own keys
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int qi = part + 2 * i;
    if (qi < NQ)
      sm.p[qi][key] = k < cta.k_end && k < sm.lim[qi] && ((readers >> (qi % cta.group)) & 1u) ? acc[i] : -INFINITY;
  }
}

// Online softmax of the tile's scores: a warp per query.
template <typename T, int D, int NQ>
__device__ void decode_softmax(DecodeSmem<T, D, NQ>& sm) {
  const int warp = int(threadIdx.x / 32), lane = int(threadIdx.x % 32);
  for (int qi = warp; qi < NQ; qi += kThreads / 32) {
    const float s0 = sm.p[qi][lane], s1 = sm.p[qi][lane + 32], m_old = sm.m[qi];
    const float m_new = fmaxf(m_old, warp_max(fmaxf(s0, s1)));
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;
    const float p0 = exp2f(s0 - m_use), p1 = exp2f(s1 - m_use);
    const float sum = warp_sum(p0 + p1);
    sm.p[qi][lane] = p0;
    sm.p[qi][lane + 32] = p1;
    __syncwarp();
    if (lane == 0) {
      const float alpha = exp2f(m_old - m_use);
      sm.alpha[qi] = alpha;
      sm.l[qi] = sm.l[qi] * alpha + sum;
      sm.m[qi] = m_new;
    }
  }
}

// acc (the thread's 8 dims x NQ queries over its slice of keys) += P V.
template <typename T, int D, int NQ>
__device__ void decode_pv(DecodeSmem<T, D, NQ>& sm, int buf, float (&acc)[NQ][8]) {
  constexpr int kDimChunks = D / 8, kSlices = kThreads / kDimChunks;
  const int dc = int(threadIdx.x) % kDimChunks, slice = int(threadIdx.x) / kDimChunks;
#pragma unroll
  for (int qi = 0; qi < NQ; ++qi) {
    const float alpha = sm.alpha[qi];
#pragma unroll
    for (int e = 0; e < 8; ++e) acc[qi][e] *= alpha;
  }
#pragma unroll 2
  for (int k = slice; k < kTileKeys; k += kSlices) {
    float vf[8];
    unpack8<T>(*reinterpret_cast<const uint4*>(&sm.v[buf][k][dc * 8]), vf);
#pragma unroll
    for (int qi = 0; qi < NQ; ++qi) {
      const float p = sm.p[qi][k];
#pragma unroll
      for (int e = 0; e < 8; ++e) acc[qi][e] += p * vf[e];
    }
  }
}

template <typename T, int D, int NQ>
__global__ void __launch_bounds__(kThreads) decode_split_kernel(const AttentionCall c, DecodeWorkspace ws) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<DecodeSmem<T, D, NQ>*>(smem_raw);
  const DecodeCta cta = make_decode_cta(c);
  load_queries<D, NQ>(c, cta, sm.q, sm.lim);
  if (threadIdx.x < NQ) {
    sm.m[threadIdx.x] = -INFINITY;
    sm.l[threadIdx.x] = 0.0f;
  }
  for (int i = int(threadIdx.x); i < NQ * D; i += kThreads) sm.out[i / D][i % D] = 0.0f;

  const int64_t v_offset = int64_t(c.kv.page_size) * D;
  const int32_t n_tiles = ceil_div_dev(cta.k_end - cta.k_begin, kTileKeys);
  float acc[NQ][8] = {};
  constexpr int kStages = DecodeSmem<T, D, NQ>::kStages;
  for (int s = 0; s < kStages - 1; ++s)
    if (s < n_tiles) plan_decode_tile(c, cta, sm, s, cta.k_begin + s * kTileKeys);
  __syncthreads();
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < n_tiles) load_kv_tile<T, D>(sm, s, v_offset, true);
    cp_async_commit();
  }
  for (int32_t n = 0; n < n_tiles; ++n) {
    // Tile n + kStages - 1 starts loading into the slot tile n - 1 used.
    const int32_t ahead = n + kStages - 1;
    const int cur = n % kStages, slot = ahead % kStages;
    if (ahead < n_tiles) plan_decode_tile(c, cta, sm, slot, cta.k_begin + ahead * kTileKeys);
    __syncthreads();
    if (ahead < n_tiles) load_kv_tile<T, D>(sm, slot, v_offset, true);
    cp_async_commit();
    cp_async_wait<kStages - 1>();  // tile n has landed
    __syncthreads();
    decode_scores(cta, sm, cur, cta.k_begin + n * kTileKeys);
    __syncthreads();
    decode_softmax(sm);
    __syncthreads();
    decode_pv(sm, cur, acc);
    __syncthreads();
  }

  // Sum the key slices in slice order (not by atomics, whose order the warps'
  // timing decides), then write this split's partials.
  constexpr int kDimChunks = D / 8, kSlices = kThreads / kDimChunks;
  const int dc = int(threadIdx.x) % kDimChunks, slice = int(threadIdx.x) / kDimChunks;
  for (int s = 0; s < kSlices; ++s) {
    if (slice == s)
#pragma unroll
      for (int qi = 0; qi < NQ; ++qi)
        if (qi < cta.n_q)
#pragma unroll
          for (int e = 0; e < 8; ++e) sm.out[qi][dc * 8 + e] += acc[qi][e];
    __syncthreads();
  }
  const int64_t base = (int64_t(cta.g) * gridDim.x + blockIdx.x) * cta.n_q;
  for (int i = int(threadIdx.x); i < cta.n_q * D; i += kThreads) ws.o[(base + i / D) * D + i % D] = sm.out[i / D][i % D];
  if (int(threadIdx.x) < cta.n_q) {
    ws.m[base + threadIdx.x] = sm.m[threadIdx.x];
    ws.l[base + threadIdx.x] = sm.l[threadIdx.x];
  }
}

// One CTA of D threads per (query, kv head): combines the splits' partials.
template <int D>
__global__ void __launch_bounds__(D) decode_merge_kernel(const AttentionCall c, DecodeWorkspace ws, int32_t n_splits) {
  const int32_t qi = int32_t(blockIdx.x), g = int32_t(blockIdx.y), n_q = int32_t(gridDim.x), d = int32_t(threadIdx.x);
  const int32_t group = c.n_heads / c.n_kv_heads;
  const int64_t first = int64_t(g) * n_splits * n_q + qi;  // (g, split 0, qi); splits are n_q apart
  float m_max = -INFINITY;
  for (int32_t s = 0; s < n_splits; ++s) m_max = fmaxf(m_max, ws.m[first + int64_t(s) * n_q]);
  float l = 0.0f, o = 0.0f;
  for (int32_t s = 0; s < n_splits; ++s) {
    const int64_t at = first + int64_t(s) * n_q;
    const float m = ws.m[at];
    if (m == -INFINITY) continue;
    const float w = exp2f(m - m_max);
    l += ws.l[at] * w;
    o += ws.o[at * D + d] * w;
  }
  const int32_t row = qi / group, h = g * group + qi % group;
  c.out[int64_t(row) * c.n_heads * D + int64_t(h) * D + d] = l > 0.0f ? o / l : 0.0f;
  if (d == 0) ws.lse[int64_t(g) * n_q + qi] = l > 0.0f ? m_max + log2f(l) : INFINITY;
}

// Statistics: a thread per key of the CTA's share; key_mass[t] += the key's
// probability summed over the group's queries.
template <typename T, int D, int NQ>
__global__ void __launch_bounds__(kThreads) decode_mass_kernel(const AttentionCall c, DecodeWorkspace ws) {
  __shared__ __align__(16) float q[NQ][D];
  __shared__ int32_t lim[NQ];
  __shared__ float lse[NQ];
  const DecodeCta cta = make_decode_cta(c);
  load_queries<D, NQ>(c, cta, q, lim);
  if (int(threadIdx.x) < NQ)
    lse[threadIdx.x] = int(threadIdx.x) < cta.n_q ? ws.lse[int64_t(cta.g) * cta.n_q + threadIdx.x] : INFINITY;
  __syncthreads();
  for (int32_t k = cta.k_begin + int32_t(threadIdx.x); k < cta.k_end; k += kThreads) {
    const int32_t t = cta.list.token(k);
    const T* row = key_row<T>(c, cta.g, t);
    float s[NQ] = {};
#pragma unroll 4
    for (int ch = 0; ch < D / 8; ++ch) {
      float kf[8];
      unpack8<T>(*reinterpret_cast<const uint4*>(row + ch * 8), kf);
#pragma unroll
      for (int qi = 0; qi < NQ; ++qi) s[qi] += dot8(&q[qi][ch * 8], kf);
    }
    const uint32_t readers = cta.list.key_heads(k);
    float p = 0.0f;
#pragma unroll
    for (int qi = 0; qi < NQ; ++qi)
      if (k < lim[qi] && ((readers >> (qi % cta.group)) & 1u)) p += exp2f(s[qi] - lse[qi]);
    if (p != 0.0f) atomicAdd(&c.key_mass[int64_t(cta.g) * c.mass_stride + t], p);
  }
}

template <typename T, int D, int NQ>
cudaError_t launch_decode_typed(const AttentionCall& c, int32_t n_splits, DecodeWorkspace ws, cudaStream_t stream) {
  constexpr int smem = int(sizeof(DecodeSmem<T, D, NQ>));
  const cudaError_t configured = configure_smem_once(decode_split_kernel<T, D, NQ>, smem);
  if (configured != cudaSuccess) return configured;
  const dim3 grid(unsigned(n_splits), unsigned(c.n_kv_heads));
  decode_split_kernel<T, D, NQ><<<grid, kThreads, smem, stream>>>(c, ws);
  const dim3 merge_grid(unsigned(c.n_rows * c.group_size()), unsigned(c.n_kv_heads));
  decode_merge_kernel<D><<<merge_grid, D, 0, stream>>>(c, ws, n_splits);
  if (c.key_mass != nullptr) decode_mass_kernel<T, D, NQ><<<grid, kThreads, 0, stream>>>(c, ws);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_decode_dim(const AttentionCall& c, int32_t n_splits, DecodeWorkspace ws, cudaStream_t stream) {
  const int32_t n_q = c.n_rows * c.group_size();
  if (n_q <= 1) return launch_decode_typed<T, D, 1>(c, n_splits, ws, stream);
  if (n_q <= 4) return launch_decode_typed<T, D, 4>(c, n_splits, ws, stream);
  if (n_q <= 8) return launch_decode_typed<T, D, 8>(c, n_splits, ws, stream);
  return launch_decode_typed<T, D, 16>(c, n_splits, ws, stream);
}

template <typename T>
cudaError_t launch_decode_type(const AttentionCall& c, int32_t n_splits, DecodeWorkspace ws, cudaStream_t stream) {
  return c.head_dim == 64 ? launch_decode_dim<T, 64>(c, n_splits, ws, stream)
                          : launch_decode_dim<T, 128>(c, n_splits, ws, stream);
}

}  // namespace

size_t decode_workspace_bytes(const AttentionCall& c, int32_t max_keys) {
  const int64_t n_q = int64_t(c.n_rows) * c.group_size();
  const int64_t parts = int64_t(c.n_kv_heads) * decode_splits(c, max_keys) * n_q;
  return size_t(parts * (c.head_dim + 2) + int64_t(c.n_kv_heads) * n_q) * sizeof(float);
}

cudaError_t launch_decode(const AttentionCall& c, int32_t max_keys, void* workspace, cudaStream_t stream) {
  const int32_t n_splits = decode_splits(c, max_keys);
  const DecodeWorkspace ws = carve_workspace(c, n_splits, workspace);
  return c.kv.dtype == DType::F16 ? launch_decode_type<__half>(c, n_splits, ws, stream)
                                  : launch_decode_type<__nv_bfloat16>(c, n_splits, ws, stream);
}

}  // namespace inferlab::kernels::cuda::attn
