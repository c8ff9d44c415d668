// Causal flash attention for prefill (and any call the decode kernel does not
// take): a CTA per (64 query rows, query head), 4 warps of 16 rows. Key tiles
// of 64 are gathered through the page table into shared memory with cp.async
// (double-buffered); S = Q K^T and O += P V run on tensor cores (mma.sync
// m16n8k16, f16/bf16 in, f32 accumulate) with the online softmax on the score
// fragments in registers. Block-sparse heads visit only tiles that intersect a
// listed key block of their rows' query blocks. With statistics, a second pass
// over the same tiles adds exp(s - lse) of every key to key_mass.
#include <climits>

#include "cuda/attention_common.cuh"

namespace inferlab::kernels::cuda::attn {
namespace {

constexpr int kQueryRows = 64;  // per CTA: 4 warps x 16 rows
constexpr int kThreads = 128;
constexpr int kKeyFrags = kTileKeys / 8;  // n8 score fragments per warp per tile

template <typename T, int D>
struct PrefillSmem {
  T k[2][kTileKeys][D + kRowPad];  // K tiles, double-buffered
  T v[2][kTileKeys][D + kRowPad];  // V tiles
  const T* row[2][kTileKeys];      // K row of each key of a tile; null: no key (zeros)
  int32_t token[2][kTileKeys];     // stored token of each key, -1: none
  uint64_t allowed[2][kTileKeys];  // block-sparse: bit j = query block qb_lo + j may read the key
  int32_t start[2];                // a tile's first key position; -1: no more tiles
  float mass[kTileKeys];           // statistics pass: the CTA's probability sum per key
};

// What one CTA reads. A key position is an index into the kv head's key list
// (dense) or a stored token (block-sparse, which ignores KeySelect).
struct PrefillCta {
  int32_t h = 0, g = 0, r0 = 0, r_end = 0;
  KeyList list;
  bool sparse = false;
  int32_t key_end = 0;   // dense: keys [0, key_end) are visible to some row
  int32_t self_hi = 0;   // sparse: stored token of the last row
  int32_t qb_lo = 0, n_qb = 0;        // sparse: query blocks of the rows (n_qb <= 64)
  const int32_t* indptr = nullptr;    // sparse: block_indptr of head h (n_query_blocks + 1)
};

__device__ PrefillCta make_cta(const AttentionCall& c) {
  PrefillCta cta;
  cta.h = int32_t(blockIdx.y);
  cta.g = cta.h / (c.n_heads / c.n_kv_heads);
  const int32_t tile = int32_t(gridDim.x - 1 - blockIdx.x);  // the longest causal tiles start first
  cta.r0 = tile * kQueryRows;
  cta.r_end = min(c.n_rows, cta.r0 + kQueryRows);
  cta.list = warp_key_list(c, cta.g);
  cta.sparse = c.block_sparse != nullptr && c.block_sparse[cta.h] != 0;
  cta.key_end = min(cta.list.n_keys(), cta.list.n_selected + cta.r_end);
  if (cta.sparse) {
    const int32_t bs = c.block_size;
    cta.self_hi = cta.list.n_cached + cta.r_end - 1;
    cta.qb_lo = (cta.list.n_cached + cta.r0) / bs;
    cta.n_qb = cta.self_hi / bs - cta.qb_lo + 1;
    cta.indptr = c.block_indptr + int64_t(cta.h) * (c.n_query_blocks + 1);
  }
  return cta;
}

// Whether sorted keys[lo, hi) holds kb.
__device__ bool listed(const int32_t* keys, int32_t lo, int32_t hi, int32_t kb) {
  const int32_t end = hi;
  while (lo < hi) {
    const int32_t mid = (lo + hi) / 2;
    if (keys[mid] < kb) lo = mid + 1;
    else hi = mid;
  }
  return lo < end && keys[lo] == kb;
}

// Warp 0's walk over the CTA's tiles. Block-sparse: each lane keeps cursors
// into the key-block lists of query blocks lane and lane + 32, so the next
// tile starts at the first listed key block not yet visited.
struct TilePlanner {
  int32_t pos = 0;  // first key position not yet visited
  int32_t cur[2] = {0, 0}, end[2] = {0, 0};

  __device__ void reset(const AttentionCall& c, const PrefillCta& cta) {
    pos = 0;
    for (int i = 0; i < 2; ++i) {
      const int32_t j = int32_t(threadIdx.x % 32) + 32 * i, qb = cta.qb_lo + j;
      const bool has = cta.sparse && j < cta.n_qb && qb < c.n_query_blocks;
      cur[i] = has ? cta.indptr[qb] : 0;
      end[i] = has ? cta.indptr[qb + 1] : 0;
    }
  }

  // The next tile's first key position (-1: none); moves past that tile.
  __device__ int32_t next(const AttentionCall& c, const PrefillCta& cta) {
    int32_t start;
    if (!cta.sparse) {
      start = pos < cta.key_end ? pos : -1;
    } else {
      const int32_t bs = c.block_size;
      int32_t cand = INT_MAX;
      for (int i = 0; i < 2; ++i) {
        while (cur[i] < end[i] && (c.block_keys[cur[i]] + 1) * bs <= pos) ++cur[i];
        if (cur[i] < end[i]) cand = min(cand, max(pos, c.block_keys[cur[i]] * bs));
      }
      cand = warp_min(cand);
      start = cand <= cta.self_hi ? cand : -1;
    }
    if (start >= 0) pos = start + kTileKeys;
    return start;
  }

  // allowed[k] for the tile at `start`: bit j set when query block qb_lo + j
  // lists the block of key start + k.
  __device__ void fill_allowed(const AttentionCall& c, const PrefillCta& cta, int32_t start, uint64_t* allowed) const {
    const int lane = int(threadIdx.x % 32);
    uint64_t bits[2] = {0, 0};
    for (int32_t j = 0; j < cta.n_qb; ++j) {
      const int32_t lo = __shfl_sync(kFullMask, j < 32 ? cur[0] : cur[1], j % 32);
      const int32_t hi = __shfl_sync(kFullMask, j < 32 ? end[0] : end[1], j % 32);
      for (int i = 0; i < 2; ++i)
        if (listed(c.block_keys, lo, hi, (start + lane + 32 * i) / c.block_size)) bits[i] |= 1ull << j;
    }
    allowed[lane] = bits[0];
    allowed[lane + 32] = bits[1];
  }
};

// Warp 0: the next tile's keys into buffer `buf`.
template <typename T, int D>
__device__ void plan_tile(const AttentionCall& c, const PrefillCta& cta, TilePlanner& planner,
                          PrefillSmem<T, D>& sm, int buf) {
  const int32_t start = planner.next(c, cta);
  const int lane = int(threadIdx.x % 32);
  if (lane == 0) sm.start[buf] = start;
  if (start < 0) return;
  const int32_t bit = cta.h % (c.n_heads / c.n_kv_heads);  // this head in its group
  for (int k = lane; k < kTileKeys; k += 32) {
    const int32_t pos = start + k;
    // A key of another query head's own selection is no key for this head.
    const bool valid = cta.sparse ? pos <= cta.self_hi
                                  : pos < cta.key_end && ((cta.list.key_heads(pos) >> bit) & 1u) != 0;
    const int32_t t = !valid ? -1 : cta.sparse ? pos : cta.list.token(pos);
    sm.token[buf][k] = t;
    sm.row[buf][k] = valid ? key_row<T>(c, cta.g, t) : nullptr;
  }
  if (cta.sparse) planner.fill_allowed(c, cta, start, sm.allowed[buf]);
}

// Runs body(buf, start) on every tile of the CTA, loading tile n + 1 while
// tile n is computed. kMass: K only, and after each tile the CTA's per-key
// sums in sm.mass go to key_mass (one atomic per key and CTA).
template <typename T, int D, bool kMass, typename Body>
__device__ void for_each_tile(const AttentionCall& c, const PrefillCta& cta, PrefillSmem<T, D>& sm, Body&& body) {
  const int warp = int(threadIdx.x / 32);
  const int64_t v_offset = int64_t(c.kv.page_size) * D;
  TilePlanner planner;
  cp_async_wait<0>();
  __syncthreads();  // a previous pass is done with the buffers
  if (warp == 0) {
    planner.reset(c, cta);
    plan_tile(c, cta, planner, sm, 0);
  }
  __syncthreads();
  if (sm.start[0] >= 0) load_kv_tile<T, D>(sm, 0, v_offset, !kMass);
  cp_async_commit();
  for (int n = 0;; ++n) {
    const int cur = n & 1, nxt = cur ^ 1;
    if (sm.start[cur] < 0) break;
    if (warp == 0) plan_tile(c, cta, planner, sm, nxt);
    __syncthreads();
    if (sm.start[nxt] >= 0) load_kv_tile<T, D>(sm, nxt, v_offset, !kMass);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    body(cur, sm.start[cur]);
    __syncthreads();
    if constexpr (kMass) {
      if (threadIdx.x < kTileKeys) {
        const int32_t t = sm.token[cur][threadIdx.x];
        const float m = sm.mass[threadIdx.x];
        if (t >= 0 && m != 0.0f) atomicAdd(&c.key_mass[int64_t(cta.g) * c.mass_stride + t], m);
        sm.mass[threadIdx.x] = 0.0f;
      }
      __syncthreads();
    }
  }
}

// The thread's two rows (fragment rows lane/4 and lane/4 + 8 of its warp):
// key positions < lim are causally visible; qbit is the row's query block
// relative to qb_lo (block-sparse).
struct RowInfo {
  int32_t row[2], lim[2], qbit[2];
};

__device__ RowInfo row_info(const AttentionCall& c, const PrefillCta& cta) {
  RowInfo r;
  for (int half = 0; half < 2; ++half) {
    r.row[half] = cta.r0 + int32_t(threadIdx.x / 32) * 16 + int32_t(threadIdx.x % 32) / 4 + 8 * half;
    const int32_t self = cta.list.n_cached + r.row[half];
    const bool valid = r.row[half] < c.n_rows;
    r.lim[half] = !valid ? 0 : cta.sparse ? self + 1 : cta.list.n_selected + r.row[half] + 1;
    r.qbit[half] = valid && cta.sparse ? self / c.block_size - cta.qb_lo : 0;
  }
  return r;
}

// Q fragments (A operand, 16 rows x D) of the warp's rows, scaled by
// scale * log2(e) so the softmax can use exp2.
template <typename T, int D>
__device__ void load_query(const AttentionCall& c, const PrefillCta& cta, const RowInfo& r, uint32_t (&qf)[D / 16][4]) {
  const float qscale = c.scale * kLog2e;
  const int lane = int(threadIdx.x % 32);
  for (int half = 0; half < 2; ++half) {
    const float* q = r.row[half] < c.n_rows ? c.q + int64_t(r.row[half]) * c.n_heads * D + int64_t(cta.h) * D : nullptr;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int hi = 0; hi < 2; ++hi) {
        const int col = kk * 16 + hi * 8 + (lane % 4) * 2;
        const float2 x = q != nullptr ? *reinterpret_cast<const float2*>(q + col) : make_float2(0.0f, 0.0f);
        qf[kk][hi * 2 + half] = pack2<T>(x.x * qscale, x.y * qscale);
      }
  }
}

// s (16 rows x 64 keys, as 8 C fragments) = Q K^T for the warp's rows.
template <typename T, int D>
__device__ void tile_scores(const T (*k)[D + kRowPad], const uint32_t (&qf)[D / 16][4], float (&s)[kKeyFrags][4]) {
  const int lane = int(threadIdx.x % 32);
#pragma unroll
  for (int j = 0; j < kKeyFrags; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
    for (int j = 0; j < kKeyFrags; j += 2) {
      // Matrices: keys j*8.. x dims kk*16 + {0, 8}, then keys (j+1)*8.. likewise.
      uint32_t b[4];
      ldmatrix_x4(b, &k[j * 8 + (lane / 16) * 8 + lane % 8][kk * 16 + ((lane / 8) % 2) * 8]);
      mma_16816<T>(s[j], qf[kk], b[0], b[1]);
      mma_16816<T>(s[j + 1], qf[kk], b[2], b[3]);
    }
}

// -inf for keys a row may not read: causality (and the key list's end), for
// block-sparse rows the listed blocks, and with per query head selections
// (token: the tile's stored tokens) the keys planned as none (-1).
__device__ void mask_scores(float (&s)[kKeyFrags][4], int32_t start, const RowInfo& r, const uint64_t* allowed,
                            const int32_t* token) {
  const int lane = int(threadIdx.x % 32);
#pragma unroll
  for (int j = 0; j < kKeyFrags; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = j * 8 + (lane % 4) * 2 + (e & 1), half = e >> 1;
      bool visible = start + key < r.lim[half];
      if (allowed != nullptr) visible = visible && ((allowed[key] >> r.qbit[half]) & 1u);
      if (token != nullptr) visible = visible && token[key] >= 0;
      if (!visible) s[j][e] = -INFINITY;
    }
}

// Online softmax over one tile: scores become probabilities relative to the
// running max m; the running sum l (partial over the 4 lanes of a row) and
// the output accumulator are rescaled.
template <int D>
__device__ void online_softmax(float (&s)[kKeyFrags][4], float (&m)[2], float (&l)[2], float (&o)[D / 8][4]) {
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    float mx = -INFINITY;
#pragma unroll
    for (int j = 0; j < kKeyFrags; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * half], s[j][2 * half + 1]));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 1));
    mx = fmaxf(mx, __shfl_xor_sync(kFullMask, mx, 2));
    const float m_new = fmaxf(m[half], mx);
    const float m_use = m_new == -INFINITY ? 0.0f : m_new;  // all masked so far: p = 0, no NaN
    const float alpha = exp2f(m[half] - m_use);
    m[half] = m_new;
    float sum = 0.0f;
#pragma unroll
    for (int j = 0; j < kKeyFrags; ++j)
#pragma unroll
      for (int e = 2 * half; e < 2 * half + 2; ++e) sum += (s[j][e] = exp2f(s[j][e] - m_use));
    l[half] = l[half] * alpha + sum;
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
      o[n][2 * half] *= alpha;
      o[n][2 * half + 1] *= alpha;
    }
  }
}

// o (16 rows x D) += P V; the score fragments of two key groups of 8 form
// the A fragment of 16 keys.
template <typename T, int D>
__device__ void tile_pv(const T (*v)[D + kRowPad], const float (&p)[kKeyFrags][4], float (&o)[D / 8][4]) {
  const int lane = int(threadIdx.x % 32);
#pragma unroll
  for (int kk = 0; kk < kTileKeys / 16; ++kk) {
    const uint32_t a[4] = {pack2<T>(p[2 * kk][0], p[2 * kk][1]), pack2<T>(p[2 * kk][2], p[2 * kk][3]),
                           pack2<T>(p[2 * kk + 1][0], p[2 * kk + 1][1]), pack2<T>(p[2 * kk + 1][2], p[2 * kk + 1][3])};
#pragma unroll
    for (int n = 0; n < D / 8; n += 2) {
      // Transposed matrices: keys kk*16 + {0, 8} x dims n*8.., then dims (n+1)*8...
      uint32_t b[4];
      ldmatrix_x4_trans(b, &v[kk * 16 + ((lane / 8) % 2) * 8 + lane % 8][(n + lane / 16) * 8]);
      mma_16816<T>(o[n], a, b[0], b[1]);
      mma_16816<T>(o[n + 1], a, b[2], b[3]);
    }
  }
}

// Adds each key's probability exp2(s - lse), summed over the warp's rows, to mass.
__device__ void add_tile_mass(const float (&s)[kKeyFrags][4], const float (&lse)[2], float* mass) {
  const int lane = int(threadIdx.x % 32);
#pragma unroll
  for (int j = 0; j < kKeyFrags; ++j)
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float p = exp2f(s[j][e] - lse[0]) + exp2f(s[j][e + 2] - lse[1]);
      for (int o = 4; o < 32; o <<= 1) p += __shfl_xor_sync(kFullMask, p, o);
      if (lane < 4 && p != 0.0f) atomicAdd(&mass[j * 8 + lane * 2 + e], p);
    }
}

// Normalizes and stores the rows; returns their log2-sum-exp2 (+inf: no key).
template <int D>
__device__ void store_rows(const AttentionCall& c, const PrefillCta& cta, const RowInfo& r, const float (&o)[D / 8][4],
                           const float (&m)[2], const float (&l)[2], float (&lse)[2]) {
  const int lane = int(threadIdx.x % 32);
  for (int half = 0; half < 2; ++half) {
    float total = l[half] + __shfl_xor_sync(kFullMask, l[half], 1);
    total += __shfl_xor_sync(kFullMask, total, 2);
    const float inv = total > 0.0f ? 1.0f / total : 0.0f;
    lse[half] = total > 0.0f ? m[half] + log2f(total) : INFINITY;
    if (r.row[half] >= c.n_rows) continue;
    float* out = c.out + int64_t(r.row[half]) * c.n_heads * D + int64_t(cta.h) * D + (lane % 4) * 2;
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
      *reinterpret_cast<float2*>(out + n * 8) = make_float2(o[n][2 * half] * inv, o[n][2 * half + 1] * inv);
  }
}

__device__ void store_zero_rows(const AttentionCall& c, const PrefillCta& cta, int32_t head_dim) {
  for (int32_t i = int32_t(threadIdx.x); i < (cta.r_end - cta.r0) * head_dim; i += blockDim.x)
    c.out[int64_t(cta.r0 + i / head_dim) * c.n_heads * head_dim + int64_t(cta.h) * head_dim + i % head_dim] = 0.0f;
}

template <typename T, int D>
__global__ void __launch_bounds__(kThreads) prefill_kernel(const AttentionCall c) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  auto& sm = *reinterpret_cast<PrefillSmem<T, D>*>(smem_raw);
  const PrefillCta cta = make_cta(c);
  if (!head_active(c, cta.h)) return store_zero_rows(c, cta, D);
  const RowInfo r = row_info(c, cta);
  uint32_t qf[D / 16][4];
  load_query<T, D>(c, cta, r, qf);

  float o[D / 8][4] = {};
  float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.0f, 0.0f};
  for_each_tile<T, D, false>(c, cta, sm, [&](int buf, int32_t start) {
    float s[kKeyFrags][4];
    tile_scores<T, D>(sm.k[buf], qf, s);
    mask_scores(s, start, r, cta.sparse ? sm.allowed[buf] : nullptr, c.select_heads != nullptr ? sm.token[buf] : nullptr);
    online_softmax<D>(s, m, l, o);
    tile_pv<T, D>(sm.v[buf], s, o);
  });
  float lse[2];
  store_rows<D>(c, cta, r, o, m, l, lse);
  if (c.key_mass == nullptr) return;

  if (threadIdx.x < kTileKeys) sm.mass[threadIdx.x] = 0.0f;
  for_each_tile<T, D, true>(c, cta, sm, [&](int buf, int32_t start) {
    float s[kKeyFrags][4];
    tile_scores<T, D>(sm.k[buf], qf, s);
    mask_scores(s, start, r, cta.sparse ? sm.allowed[buf] : nullptr, c.select_heads != nullptr ? sm.token[buf] : nullptr);
    add_tile_mass(s, lse, sm.mass);
  });
}

template <typename T, int D>
cudaError_t launch_prefill_typed(const AttentionCall& c, cudaStream_t stream) {
  constexpr int smem = int(sizeof(PrefillSmem<T, D>));
  const cudaError_t configured = configure_smem_once(prefill_kernel<T, D>, smem);
  if (configured != cudaSuccess) return configured;
  const dim3 grid(unsigned(ceil_div(c.n_rows, kQueryRows)), unsigned(c.n_heads));
  prefill_kernel<T, D><<<grid, kThreads, smem, stream>>>(c);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_prefill_dim(const AttentionCall& c, cudaStream_t stream) {
  return c.head_dim == 64 ? launch_prefill_typed<T, 64>(c, stream) : launch_prefill_typed<T, 128>(c, stream);
}

}  // namespace

cudaError_t launch_prefill(const AttentionCall& c, cudaStream_t stream) {
  return c.kv.dtype == DType::F16 ? launch_prefill_dim<__half>(c, stream)
                                  : launch_prefill_dim<__nv_bfloat16>(c, stream);
}

}  // namespace inferlab::kernels::cuda::attn
