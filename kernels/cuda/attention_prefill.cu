// Causal flash attention for prefill (and any call the decode kernel does not
// take): a CTA per (64 query rows, query head), 4 warps of 16 rows. Key tiles
// of 64 are gathered through the page table into shared memory with cp.async
// (double-buffered); S = Q K^T and O += P V run on tensor cores (mma.sync
// m16n8k16, f16/bf16 in, f32 accumulate) with the online softmax on the score
// fragments in registers. A sparse head (SparseLayout) gathers its tiles from
// the union of the key ranges and columns of the query blocks its rows fall
// in, each key marked with the blocks that list it, so the cost follows the
// keys listed, not whole key blocks. With statistics, a second pass over the
// same tiles adds exp(s - lse) of every key to key_mass.
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
  uint64_t allowed[2][kTileKeys];  // sparse: bit j = query block qb_lo + j lists the key
  int32_t start[2];                // dense: a tile's first key position; sparse: 0; -1: no more tiles
  float mass[kTileKeys];           // statistics pass: the CTA's probability sum per key
};

// What one CTA reads. A key position is an index into the kv head's key list
// (dense); a sparse head's tiles list stored tokens (and ignore KeySelect).
struct PrefillCta {
  int32_t h = 0, g = 0, r0 = 0, r_end = 0;
  KeyList list;
  bool sparse = false;
  int32_t key_end = 0;   // dense: keys [0, key_end) are visible to some row
  int32_t self_hi = 0;   // sparse: stored token of the last row
  int32_t qb_lo = 0, n_qb = 0;  // sparse: query blocks of the rows (n_qb <= 64)
  SparseHead head;              // sparse: head h's blocks
};

__device__ PrefillCta make_cta(const AttentionCall& c) {
  PrefillCta cta;
  cta.h = int32_t(blockIdx.y);
  cta.g = cta.h / (c.n_heads / c.n_kv_heads);
  const int32_t tile = int32_t(gridDim.x - 1 - blockIdx.x);  // the longest causal tiles start first
  cta.r0 = tile * kQueryRows;
  cta.r_end = min(c.n_rows, cta.r0 + kQueryRows);
  cta.list = warp_key_list(c, cta.g);
  cta.sparse = c.sparse.sparse(cta.h);
  cta.key_end = min(cta.list.n_keys(), cta.list.n_selected + cta.r_end);
  if (cta.sparse) {
    cta.head = c.sparse.heads[cta.h];
    const int32_t bs = cta.head.block_size;
    cta.self_hi = cta.list.n_cached + cta.r_end - 1;
    cta.qb_lo = (cta.list.n_cached + cta.r0) / bs;
    cta.n_qb = cta.self_hi / bs - cta.qb_lo + 1;
  }
  return cta;
}

// Warp 0's walk over the CTA's keys. Dense: consecutive tiles of key
// positions. Sparse: lane i follows query blocks qb_lo + i and qb_lo + i + 32
// (slot 0 and 1), each a sequence of disjoint segments (its ranges and its
// columns, ascending); a tile takes the next 64 keys of their union in runs
// of keys that the same blocks list.
struct TilePlanner {
  int32_t pos = 0;  // first key position (sparse: stored token) not yet visited
  // Sparse, per slot: cursors into the block's ranges and columns, and its
  // current segment [seg_b, seg_e) at or after pos (seg_b INT_MAX: none left).
  int32_t rc[2] = {0, 0}, re[2] = {0, 0}, cc[2] = {0, 0}, ce[2] = {0, 0};
  int32_t seg_b[2] = {INT_MAX, INT_MAX}, seg_e[2] = {INT_MAX, INT_MAX};

  // rc counts pairs and a plan may hold up to INT32_MAX of them, so their
  // elements are addressed in 64 bits (2 * rc would overflow past 2^30).
  __device__ void advance(const SparseLayout& sp, int i) {
    while (rc[i] < re[i] && sp.ranges[2 * int64_t(rc[i]) + 1] <= pos) ++rc[i];
    while (cc[i] < ce[i] && sp.columns[cc[i]] < pos) ++cc[i];
    const int32_t rb = rc[i] < re[i] ? max(pos, sp.ranges[2 * int64_t(rc[i])]) : INT_MAX;
    const int32_t cb = cc[i] < ce[i] ? sp.columns[cc[i]] : INT_MAX;
    if (rb == INT_MAX && cb == INT_MAX) {
      seg_b[i] = seg_e[i] = INT_MAX;
    } else if (rb <= cb) {
      seg_b[i] = rb;
      seg_e[i] = sp.ranges[2 * int64_t(rc[i]) + 1];
    } else {
      seg_b[i] = cb;
      seg_e[i] = cb + 1;
    }
  }

  __device__ void reset(const AttentionCall& c, const PrefillCta& cta) {
    pos = 0;
    if (!cta.sparse) return;
    for (int i = 0; i < 2; ++i) {
      const int32_t j = int32_t(threadIdx.x % 32) + 32 * i, b = cta.qb_lo + j - cta.head.first_block;
      const bool has = j < cta.n_qb && b >= 0 && b < cta.head.n_blocks;
      const int32_t at = cta.head.at + b;
      rc[i] = has ? c.sparse.range_begin[at] : 0;
      re[i] = has ? c.sparse.range_end[at] : 0;
      cc[i] = has ? c.sparse.column_begin[at] : 0;
      ce[i] = has ? c.sparse.column_end[at] : 0;
      advance(c.sparse, i);
    }
  }

  // Dense: the next tile's first key position (-1: none); moves past that tile.
  __device__ int32_t next_dense(const PrefillCta& cta) {
    const int32_t start = pos < cta.key_end ? pos : -1;
    if (start >= 0) pos = start + kTileKeys;
    return start;
  }

  // Sparse: the next up to 64 keys of the union into token/allowed (the rest
  // -1 / 0); returns how many.
  __device__ int32_t next_sparse(const AttentionCall& c, const PrefillCta& cta, int32_t* token, uint64_t* allowed) {
    const int lane = int(threadIdx.x % 32);
    int32_t filled = 0;
    while (filled < kTileKeys) {
      for (int i = 0; i < 2; ++i) {
        if (seg_e[i] <= pos) advance(c.sparse, i);
        else if (seg_b[i] != INT_MAX) seg_b[i] = max(seg_b[i], pos);
      }
      const int32_t b = warp_min(min(seg_b[0], seg_b[1]));
      if (b > cta.self_hi) break;  // INT_MAX: no key left
      // The run ends where a slot's membership changes.
      int32_t change = INT_MAX;
      for (int i = 0; i < 2; ++i) change = min(change, seg_b[i] == b ? seg_e[i] : seg_b[i]);
      const int32_t end = min(min(warp_min(change), b + (kTileKeys - filled)), cta.self_hi + 1);
      const uint64_t bits = uint64_t(__ballot_sync(kFullMask, seg_b[0] == b)) |
                            (uint64_t(__ballot_sync(kFullMask, seg_b[1] == b)) << 32);
      for (int32_t k = lane; k < end - b; k += 32) {
        token[filled + k] = b + k;
        allowed[filled + k] = bits;
      }
      filled += end - b;
      pos = end;
    }
    for (int32_t k = filled + lane; k < kTileKeys; k += 32) {
      token[k] = -1;
      allowed[k] = 0;
    }
    return filled;
  }
};

// Warp 0: the next tile's keys into buffer `buf`.
template <typename T, int D>
__device__ void plan_tile(const AttentionCall& c, const PrefillCta& cta, TilePlanner& planner,
                          PrefillSmem<T, D>& sm, int buf) {
  const int lane = int(threadIdx.x % 32);
  if (cta.sparse) {
    const int32_t n = planner.next_sparse(c, cta, sm.token[buf], sm.allowed[buf]);
    __syncwarp();
    if (lane == 0) sm.start[buf] = n > 0 ? 0 : -1;
    for (int k = lane; k < kTileKeys; k += 32) {
      const int32_t t = sm.token[buf][k];
      sm.row[buf][k] = t >= 0 ? key_row<T>(c, cta.g, t) : nullptr;
    }
    return;
  }
  const int32_t start = planner.next_dense(cta);
  if (lane == 0) sm.start[buf] = start;
  if (start < 0) return;
  const int32_t bit = cta.h % (c.n_heads / c.n_kv_heads);  // this head in its group
  for (int k = lane; k < kTileKeys; k += 32) {
    const int32_t pos = start + k;
    // A key of another query head's own selection is no key for this head.
    // Only per-query-head lists mark heads (their groups hold at most 32, a
    // bit each); a wider group has none, and shifting by `bit` would overflow.
    const bool valid =
        pos < cta.key_end && (cta.list.heads == nullptr || ((cta.list.key_heads(pos) >> bit) & 1u) != 0);
    const int32_t t = valid ? cta.list.token(pos) : -1;
    sm.token[buf][k] = t;
    sm.row[buf][k] = valid ? key_row<T>(c, cta.g, t) : nullptr;
  }
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
// key positions (sparse: stored tokens) < lim are causally visible; qbit is
// the row's query block relative to qb_lo (sparse).
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
    r.qbit[half] = valid && cta.sparse ? self / cta.head.block_size - cta.qb_lo : 0;
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

// -inf for keys a row may not read: causality (and the key list's end), with
// per query head selections (token: the tile's stored tokens) the keys planned
// as none (-1); sparse (allowed: the listing blocks) causality by stored token
// and the row's query block.
__device__ void mask_scores(float (&s)[kKeyFrags][4], int32_t start, const RowInfo& r, const uint64_t* allowed,
                            const int32_t* token) {
  const int lane = int(threadIdx.x % 32);
#pragma unroll
  for (int j = 0; j < kKeyFrags; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int key = j * 8 + (lane % 4) * 2 + (e & 1), half = e >> 1;
      bool visible;
      if (allowed != nullptr) {
        visible = token[key] >= 0 && token[key] < r.lim[half] && ((allowed[key] >> r.qbit[half]) & 1u);
      } else {
        visible = start + key < r.lim[half];
        if (token != nullptr) visible = visible && token[key] >= 0;
      }
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
    mask_scores(s, start, r, cta.sparse ? sm.allowed[buf] : nullptr,
                cta.sparse || c.select_heads != nullptr ? sm.token[buf] : nullptr);
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
    mask_scores(s, start, r, cta.sparse ? sm.allowed[buf] : nullptr,
                cta.sparse || c.select_heads != nullptr ? sm.token[buf] : nullptr);
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
