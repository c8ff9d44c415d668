// Descriptors shared by the CUDA kernels (kernels/cuda) and their CPU twins
// (kernels/cpu): plain structs of pointers and sizes, no CUDA types, so host
// code, the twins and the tests describe a call exactly as the GPU sees it.
// Pointers point to device memory for a CUDA launcher and to host memory for
// a CPU twin.
#pragma once

#include <cmath>
#include <cstdint>

// Small accessors usable in host and device code.
#if defined(__CUDACC__)
#define INFERLAB_HOST_DEVICE __host__ __device__
#else
#define INFERLAB_HOST_DEVICE
#endif

namespace inferlab::kernels {

// RoPE frequency scaling of long-context checkpoints (config.json's
// rope_type): Linear divides every inverse frequency by `factor`; Llama3
// (Llama 3.1 and later) divides the low frequencies (wavelength above
// original_context / low_freq_factor) by it, keeps the high ones (below
// original_context / high_freq_factor) and blends in between.
struct RopeScaling {
  enum class Kind : int32_t { None = 0, Linear = 1, Llama3 = 2 };
  Kind kind = Kind::None;
  float factor = 1.0f, low_freq_factor = 1.0f, high_freq_factor = 4.0f, original_context = 8192.0f;
  // GGUF's rope_freqs.weight (how llama.cpp stores Llama 3.1's scaling): pair
  // i's inverse frequency divided by freq_factors[i]; host memory, rope_dim/2
  // values, or null.
  const float* freq_factors = nullptr;
};

// The inverse frequency of pair i: theta^(-2i/rope_dim), scaled. The one
// definition every RoPE kernel (CPU, CUDA, the training graph) computes with.
inline float rope_inv_freq(int64_t i, int64_t rope_dim, float theta, const RopeScaling& s = {}) {
  float f = std::pow(theta, -float(2 * i) / float(rope_dim));
  if (s.freq_factors != nullptr) f /= s.freq_factors[i];
  if (s.kind == RopeScaling::Kind::Linear) return f / s.factor;
  if (s.kind != RopeScaling::Kind::Llama3) return f;
  const float wavelen = 2.0f * 3.14159265358979f / f;
  if (wavelen < s.original_context / s.high_freq_factor) return f;
  if (wavelen > s.original_context / s.low_freq_factor) return f / s.factor;
  const float smooth = (s.original_context / wavelen - s.low_freq_factor) / (s.high_freq_factor - s.low_freq_factor);
  return (1.0f - smooth) * f / s.factor + smooth * f;
}

// Element type of weights, activations fed to GEMMs, and the KV cache.
enum class DType : int32_t { F32 = 0, F16 = 1, BF16 = 2 };

INFERLAB_HOST_DEVICE inline int32_t dtype_bytes(DType t) { return t == DType::F32 ? 4 : 2; }
inline const char* dtype_name(DType t) { return t == DType::F32 ? "f32" : t == DType::F16 ? "f16" : "bf16"; }

// Plane widths of a bit-plane KV format (SpAtten's progressive quantization;
// bit_planes.h has the row record and its codec); msb == 0: not bit planes.
struct BitPlanes {
  int32_t msb = 0;
  int32_t lsb = 0;
  INFERLAB_HOST_DEVICE bool active() const { return msb > 0; }
  INFERLAB_HOST_DEVICE int32_t bits() const { return msb + lsb; }
  INFERLAB_HOST_DEVICE bool operator==(const BitPlanes& o) const { return msb == o.msb && lsb == o.lsb; }
  INFERLAB_HOST_DEVICE bool operator!=(const BitPlanes& o) const { return !(*this == o); }
};

INFERLAB_HOST_DEVICE inline int64_t bit_plane_bytes(int64_t head_dim, int32_t bits) { return (head_dim * bits + 7) / 8; }
// Bytes of one row's record: the float32 scale, then the MSB and LSB planes.
INFERLAB_HOST_DEVICE inline int64_t bit_plane_row_bytes(int64_t head_dim, BitPlanes p) {
  return 4 + bit_plane_bytes(head_dim, p.msb) + bit_plane_bytes(head_dim, p.lsb);
}

// A pool of KV pages. Page p lives at
//   chunk_base[p / pages_per_chunk] + (p % pages_per_chunk) * page_bytes()
// and holds K rows (page_size rows of row_bytes()) followed by V rows: head_dim
// elements of `dtype` each, or with `planes` active a bit-plane record each
// (dtype unused). The engine owns the pages; kernels only read the tables.
// Moves and copies are byte copies of rows and pages, valid for either form;
// the kernels that read values dispatch on the form (or refuse bit planes).
struct KvPages {
  void* const* chunk_base = nullptr;  // (n_chunks) base pointers
  int32_t pages_per_chunk = 0;
  int32_t page_size = 0;              // tokens per page
  int32_t head_dim = 0;
  DType dtype = DType::F16;
  BitPlanes planes{};
  // Elements of one page (element pages only).
  INFERLAB_HOST_DEVICE int64_t page_elems() const { return 2 * int64_t(page_size) * head_dim; }
  INFERLAB_HOST_DEVICE int64_t row_bytes() const {
    return planes.active() ? bit_plane_row_bytes(head_dim, planes) : int64_t(head_dim) * dtype_bytes(dtype);
  }
  INFERLAB_HOST_DEVICE int64_t page_bytes() const { return 2 * int64_t(page_size) * row_bytes(); }
};

// The page table of one layer: row g (kv head) lists the physical page of each
// logical page of that head's stored tokens; stored token t of head g lives in
// page table[g * stride + t / page_size], slot t % page_size.
struct LayerPageTable {
  const int32_t* pages = nullptr;  // (n_kv_heads, stride)
  int32_t stride = 0;
};

// Which cached tokens (stored before this call) a kv head reads.
enum class KeySelect : uint8_t {
  All = 0,     // every cached token, in order
  Pages = 1,   // the listed logical pages (a page's slots >= n_cached, and negative pages, are skipped)
  Tokens = 2,  // the listed stored-token indices (negative ones and ones >= n_cached are skipped)
};

// One layer's attention over the paged cache for `n_rows` new tokens, whose K/V
// are already appended after each head's n_cached stored tokens.
//
// Keys of kv head g, in order: its selected cached tokens (KeySelect), then the
// call's new tokens. Query row i (new token i) sees all selected cached keys
// and new tokens 0..i (causal). With a sparse prefill plan on query head h,
// row i sees instead only the stored tokens t <= self (self = n_cached[g] + i)
// that its query block lists (SparseHead); a row with nothing allowed outputs
// zeros.
struct SparseHead {
  int32_t block_size = 0;   // 0: the head is dense
  int32_t first_block = 0;  // its first query block (the one holding the call's first row)
  int32_t n_blocks = 0;
  int32_t at = 0;           // index of its first block in the per-block arrays
};

// Sparse prefill of one layer: for query head h with heads[h].block_size > 0,
// query block qb (the block of row position self is self / block_size) is
// block b = heads[h].at + qb - heads[h].first_block of the per-block arrays.
// It reads the ascending disjoint key ranges ranges[2 * j], ranges[2 * j + 1]
// ([begin, end) stored tokens) for j in [range_begin[b], range_end[b]), and the
// ascending single key columns columns[j], outside those ranges, for j in
// [column_begin[b], column_end[b]). A CSR plan passes indptr and indptr + 1 as
// begin and end; a plan with room per block passes its own ends.
struct SparseLayout {
  const SparseHead* heads = nullptr;  // (n_heads); null: every head dense
  const int32_t* range_begin = nullptr;
  const int32_t* range_end = nullptr;
  const int32_t* ranges = nullptr;
  const int32_t* column_begin = nullptr;
  const int32_t* column_end = nullptr;
  const int32_t* columns = nullptr;

  INFERLAB_HOST_DEVICE bool sparse(int32_t h) const { return heads != nullptr && heads[h].block_size > 0; }
};

// Keys read by the rows at stored positions [r0, r1) from the key range
// [b, e) under causality: the sum over rows r of max(0, min(r + 1, e) - b).
// A single column c is the range [c, c + 1).
INFERLAB_HOST_DEVICE inline int64_t sparse_range_reads(int64_t r0, int64_t r1, int64_t b, int64_t e) {
  int64_t sum = 0;
  const int64_t lo = r0 > b ? r0 : b, hi = r1 < e - 1 ? r1 : e - 1;  // rows b <= r < e - 1 read r + 1 - b
  if (hi > lo) sum += (hi - lo) * (lo + hi + 1 - 2 * b) / 2;
  const int64_t from = r0 > e - 1 ? r0 : e - 1;
  return sum + (r1 > from ? r1 - from : 0) * (e - b);
}

struct AttentionCall {
  int32_t n_rows = 0;
  int32_t n_heads = 0;     // query heads
  int32_t n_kv_heads = 0;  // query head h reads kv head h / (n_heads / n_kv_heads)
  int32_t head_dim = 0;
  float scale = 0.0f;      // usually 1/sqrt(head_dim)

  const float* q = nullptr;  // (n_rows, n_heads * head_dim), after RoPE
  float* out = nullptr;      // (n_rows, n_heads * head_dim)
  const int32_t* n_cached = nullptr;  // (n_kv_heads) stored tokens before this call

  KvPages kv;
  LayerPageTable table;

  // Decode selection; null select: KeySelect::All for every head.
  const uint8_t* select = nullptr;        // (n_kv_heads) KeySelect
  const int32_t* select_indptr = nullptr; // (n_kv_heads + 1) ranges of select_index
  const int32_t* select_index = nullptr;  // logical pages or stored tokens, ascending per head
  // Per query head selection; null: every query head of a group reads its kv
  // head's whole selection. Else select_heads[j] (beside select_index[j]) has
  // bit i set when query head g * group_size + i reads that entry; the others
  // do not see its keys (new tokens are seen by all).
  const uint32_t* select_heads = nullptr;

  // Head mask; null: every head computed. A head with 0 outputs zeros.
  const uint8_t* head_active = nullptr;   // (n_heads)

  // Sparse prefill (ignores KeySelect); null sparse.heads: dense for every head.
  SparseLayout sparse;

  // Attention statistics; null: none. key_mass[g * mass_stride + t] += the
  // softmax probability stored token t received, summed over the group's query
  // heads and the call's rows (t indexes stored tokens after the append).
  float* key_mass = nullptr;              // (n_kv_heads, mass_stride)
  int32_t mass_stride = 0;

  INFERLAB_HOST_DEVICE int32_t group_size() const { return n_heads / n_kv_heads; }
};

// Key bounds of KV pages (Quest): for physical page p, bounds holds the
// per-channel minimum then maximum of the page's keys,
//   bounds[(p * 2 + 0) * head_dim + i] = min over its filled slots of K[slot][i]
//   bounds[(p * 2 + 1) * head_dim + i] = max ...
// in the pool's dtype (the extrema of stored keys are exact in it).
//
// Selection by bound for one layer, from the query rows of the call's last
// token. For kv head g with keep[g] > 0 (and keep[g] < its pages
// n_pages = ceil(n_cached[g] / page_size)), a logical page p's score is
//   sum over the group's query heads h, then channels i, of
//   max(q[h][i] * min_p[i], q[h][i] * max_p[i])
// (max as fmaxf: a NaN product, a zero query channel times an infinite bound,
// gives way to the other; a NaN score counts as -infinity) and out[out_offset[g] ...] receives keep[g] logical pages, ascending: the
// keep[g] - 1 best-scoring of pages 0 .. n_pages - 2 (ties to the lower page),
// then page n_pages - 1. Heads with keep[g] == 0 are left alone.
//
// per_head: each query head h of the group scores the pages alone (the sum
// above over h only) and selects its own keep[g] pages as above; kv head g's
// slots out[out_offset[g] .. + group_size * (keep[g] - 1) + 1) receive the
// union of its heads' pages ascending, after as many -1 as slots are left
// over, and out_heads the same slots' masks (bit i: query head
// g * group_size + i selected the page; 0 for a -1). scores then holds
// (n_kv_heads * group_size, score_stride) and marks (n_kv_heads,
// score_stride) is scratch.
struct PageSelectCall {
  int32_t n_kv_heads = 0;
  int32_t group_size = 0;     // query heads per kv head
  int32_t head_dim = 0;
  int32_t page_size = 0;
  DType dtype = DType::F16;   // of bounds
  const void* bounds = nullptr;  // (physical pages, 2, head_dim)
  LayerPageTable table;
  const float* q = nullptr;          // (n_kv_heads * group_size, head_dim), after RoPE
  const int32_t* n_cached = nullptr; // (n_kv_heads) stored tokens
  const int32_t* keep = nullptr;     // (n_kv_heads) pages to select; 0: none
  const int32_t* out_offset = nullptr;  // (n_kv_heads) first slot of head g's pages in out
  int32_t* out = nullptr;
  float* scores = nullptr;           // scratch (n_kv_heads, score_stride)
  int32_t score_stride = 0;          // >= the largest n_pages
  int32_t per_head = 0;              // 1: a selection per query head, their union per kv head
  uint32_t* out_heads = nullptr;     // per_head: beside out, the query heads of each page
  uint32_t* marks = nullptr;         // per_head: scratch (n_kv_heads, score_stride)
};

// Engine-side retention of one layer. The score of stored token t of kv head g
// lives in a slot plane: plane[table.pages[g * table.stride + t / page_size]
// * page_size + t % page_size]. After a call of n_rows new tokens (head g then
// stores n_g = n_cached[g] + n_rows tokens):
//   update: score = score + mass (rule 0, accumulated) or mass (rule 1, last
//           call only), mass = key_mass[g * mass_stride + t] of the call; new
//           tokens start from 0. scores[g * stride + t] receives it (a NaN as
//           -infinity).
//   select: with budget (sink, recent, heavy) = budget[3g .. 3g + 2], heavy >= 0
//           and n_g > sink + recent + heavy, the candidates sink .. n_g - recent - 1
//           keep their `heavy` best scores (ties to the earlier token) and the
//           others are listed ascending in drops[g * stride ...], their count in
//           n_drops[g] (0 when nothing leaves).
struct RetentionCall {
  int32_t n_kv_heads = 0;
  int32_t page_size = 0;
  LayerPageTable table;
  float* plane = nullptr;             // (physical pages * page_size) scores
  const int32_t* n_cached = nullptr;  // (n_kv_heads) stored before the call
  int32_t n_rows = 0;
  const float* mass = nullptr;        // (n_kv_heads, mass_stride)
  int32_t mass_stride = 0;
  int32_t rule = 0;                   // 0 accumulated, 1 last call
  const int32_t* budget = nullptr;    // (n_kv_heads, 3) sink, recent, heavy
  float* scores = nullptr;            // (n_kv_heads, stride) scratch, stored order
  int32_t* drops = nullptr;           // (n_kv_heads, stride)
  int32_t* n_drops = nullptr;         // (n_kv_heads)
  int32_t stride = 0;                 // >= n_g of every head
};

// Engine-side retention per sequence (SpAtten's cascade) of one layer whose kv
// heads all hold the same n_tokens tokens, at `positions` (ascending). Scores
// and drop marks are per sequence, indexed by position:
//   update: score[positions[t]] += sum over kv heads g, in order, of
//           mass[g * mass_stride + t], for t < n_tokens;
//   select: a token with 0 < dropped_at[position] <= layer leaves (a shallower
//           layer dropped it). Among the others, the candidates in stored
//           order, the first `sink`, the last `recent` and the `heavy`
//           best-scoring (ties to the earlier; a NaN score ranks last) stay;
//           with heavy < 0 or no more candidates than that, all stay. Those
//           that leave now get dropped_at = layer + 1. drops lists every
//           leaving stored index ascending; n_drops[0] counts them.
struct SequenceRetentionCall {
  int32_t n_kv_heads = 0;
  int32_t n_tokens = 0;
  int32_t layer = 0;
  const int32_t* positions = nullptr;  // (n_tokens)
  const float* mass = nullptr;         // (n_kv_heads, mass_stride)
  int32_t mass_stride = 0;
  float* score = nullptr;              // (positions capacity)
  int32_t* dropped_at = nullptr;       // (positions capacity)
  int32_t sink = 0, recent = 0, heavy = -1;
  int32_t* scratch = nullptr;          // (3, n_tokens)
  int32_t* drops = nullptr;            // (n_tokens)
  int32_t* n_drops = nullptr;          // (1)
};


// MInference's vertical-slash scores for sparse prefill (PrefillPattern), on
// the device. For listed query head heads[i] (kv head g = heads[i] / group),
// rows r of the call's last min(last_q[i], call_rows) rows, row at stored
// position self = n_cached[g] + row: with p = softmax over keys 0 .. self of
// scale * q . k, vertical[i * stride + k] += p[k] and
// slash[i * stride + self - k] += p[k]. Both arrays are zeroed by the launch.
// CPU twin: cpu::vertical_slash_scores on the same rows and keys.
struct VerticalSlashCall {
  KvPages kv;
  LayerPageTable table;
  int32_t n_heads = 0;      // query heads of the model
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  float scale = 0.0f;
  const float* q = nullptr;           // (call_rows, n_heads * head_dim), after RoPE
  int32_t call_rows = 0;
  const int32_t* n_cached = nullptr;  // (n_kv_heads) stored before the call
  int32_t n_list = 0;                 // heads estimated
  const int32_t* heads = nullptr;     // (n_list) query heads
  const int32_t* last_q = nullptr;    // (n_list) rows that score, >= 1
  int32_t max_last_q = 0;             // >= every min(last_q[i], call_rows) (sizes the grid)
  float* vertical = nullptr;          // (n_list, stride)
  float* slash = nullptr;             // (n_list, stride)
  int32_t stride = 0;                 // >= n_cached[g] + call_rows of every listed head
};

// The k best entries of each segment of a score array, their indices
// ascending: segment s is scores[s * stride .. + n[s]); entries below
// keep_first[s] count as +infinity and NaNs as -infinity (both written back
// into scores); ties go to the lower index. out[s * out_stride ..] receives
// min(k[s], n[s]) indices, out_count[s] their number. CPU twin:
// cpu::top_k_ascending (after the same +infinity).
struct TopKCall {
  float* scores = nullptr;
  int32_t stride = 0;
  int32_t n_segments = 0;
  const int32_t* n = nullptr;           // (n_segments)
  const int32_t* k = nullptr;           // (n_segments)
  const int32_t* keep_first = nullptr;  // (n_segments) or null
  int32_t* out = nullptr;               // (n_segments, out_stride), out_stride >= every min(k, n)
  int32_t out_stride = 0;
  int32_t* out_count = nullptr;         // (n_segments)
};

// MInference's block-sparse scores on the device. For listed query head
// heads[i] (kv head g, block size bs = block_size[i], stored tokens n_g =
// n_cached[g] + call_rows after the call): pooled keys K_kb = the mean of keys
// kb * bs .. min(n_g, kb * bs + bs) - 1; pooled queries Q_b = the mean of the
// call's rows in query block qb = n_cached[g] / bs + b (by stored position);
// scores[(segment_at[i] + b) * stride + kb] = Q_b . K_kb for kb <= qb (no
// scale, no softmax). pooled_k (n_list, max_kb, head_dim) and pooled_q
// (n_list, max_qb, head_dim) are scratch. CPU twins: cpu::mean_pool_keys,
// cpu::mean_pool_rows and their dot products.
struct BlockScoresCall {
  KvPages kv;
  LayerPageTable table;
  int32_t n_heads = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  const float* q = nullptr;           // (call_rows, n_heads * head_dim), after RoPE
  int32_t call_rows = 0;
  const int32_t* n_cached = nullptr;  // (n_kv_heads)
  int32_t n_list = 0;
  const int32_t* heads = nullptr;       // (n_list) query heads
  const int32_t* block_size = nullptr;  // (n_list)
  const int32_t* segment_at = nullptr;  // (n_list) first score row of the head
  int32_t max_kb = 0;                   // >= every head's key blocks
  int32_t max_qb = 0;                   // >= every head's query blocks of the call
  float* pooled_k = nullptr;
  float* pooled_q = nullptr;
  float* scores = nullptr;
  int32_t stride = 0;                   // >= max_kb
};

// Builds the device form of a SparsePlan (SparseLayout with room per block)
// for estimated heads. For listed head i, block j (query block qb =
// first_block + j, rows at stored positions [max(q0, row_begin), q1) with q0 =
// qb * block_size, q1 = min(q0 + block_size, row_end)), written at b = at + j:
//   VerticalSlash: one range [q0 - d, q0 + block_size - d) clipped to [0, q1)
//     per kept diagonal d, merged when they touch, then the kept columns < q1
//     outside them;
//   BlockTopK: the range [kb * bs, kb * bs + bs) clipped to q1 of each kept
//     key block of block j (key_blocks + j * key_block_stride, key_block_count[j]), merged.
// range_begin[b] = range_base + j * range_room (pairs), range_end[b] after the
// last; columns likewise; *keys_read += the keys the block's rows read
// (sparse_range_reads). The CPU twin is SparsePlanBuilder (engine/plans.h).
struct SparseBuildHead {
  int32_t kind = 0;  // 1 VerticalSlash, 2 BlockTopK (PrefillPattern::Kind)
  int32_t block_size = 0, first_block = 0, n_blocks = 0, at = 0;
  int32_t row_begin = 0, row_end = 0;
  int32_t range_base = 0, range_room = 0, column_base = 0, column_room = 0;
  const int32_t* columns = nullptr;    // VerticalSlash: kept columns, ascending
  int32_t n_columns = 0;
  const int32_t* diagonals = nullptr;  // VerticalSlash: kept diagonals, ascending
  int32_t n_diagonals = 0;
  const int32_t* key_blocks = nullptr;       // BlockTopK: per block j, ascending
  const int32_t* key_block_count = nullptr;  // BlockTopK: (n_blocks)
  int32_t key_block_stride = 0;
};

struct SparseBuildCall {
  int32_t n_list = 0;
  const SparseBuildHead* heads = nullptr;  // (n_list), in device memory
  int32_t max_blocks = 0;                  // >= every listed head's n_blocks
  int32_t* range_begin = nullptr;
  int32_t* range_end = nullptr;
  int32_t* ranges = nullptr;
  int32_t* column_begin = nullptr;
  int32_t* column_end = nullptr;
  int32_t* columns = nullptr;
  unsigned long long* keys_read = nullptr;  // (1) added to
};

}  // namespace inferlab::kernels
