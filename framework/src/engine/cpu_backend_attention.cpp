// The CPU backend's attention: key plans and block plans turned into page
// references, attention over them, statistics, selection by key bound, and
// engine-side retention.
#include <fmt/format.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <limits>
#include <numeric>

#include "cpu/attention_tiled.h"
#include "cpu/cpu_ops.h"
#include "cpu/cpu_twins.h"
#include "cpu/sparse_prefill.h"
#include "engine/cpu_backend.h"

namespace inferlab {

namespace cpu = kernels::cpu;

namespace {

constexpr int64_t kQueryChunkRows = 16;  // attention work item: (head or kv group, 16 query rows)
constexpr int64_t kSplitKeyRows = 4;     // calls with at most this many rows split keys across threads
constexpr int64_t kMinSplitKeys = 128;   // the least keys worth a split of their own
constexpr int64_t kMaxSplits = 16;       // per kv group; from the key count alone, so results do not depend on threads

struct KeyRange {
  int32_t start = 0;  // stored-token index
  int32_t len = 0;
};

// Splits stored-token ranges of one (layer, kv head) into page references.
void ranges_to_refs(const KvSequence& seq, int32_t layer, int32_t kv_head, const std::vector<KeyRange>& ranges,
                    std::vector<cpu::KvPageRef>& refs, std::vector<int32_t>& ref_start) {
  const HeadPageTable& t = seq.table(layer, kv_head);
  const KvPagePool& pool = seq.pool();
  const int32_t ps = pool.shape().page_size;
  for (const KeyRange& r : ranges)
    for (int32_t i = r.start; i < r.start + r.len;) {
      const int32_t page = t.pages[size_t(i / ps)], off = i % ps;
      const int32_t count = std::min(ps - off, r.start + r.len - i);
      refs.push_back({pool.k_bytes(page, off), pool.v_bytes(page, off), count, pool.dtype(), pool.bit_planes()});
      ref_start.push_back(i);
      i += count;
    }
}

// Adds the probabilities of a page concatenation's keys (concat_mass, in
// concatenation order) to their stored tokens' entries of key_mass.
void scatter_mass(const std::vector<cpu::KvPageRef>& refs, const std::vector<int32_t>& starts,
                  const std::vector<float>& concat_mass, float* key_mass) {
  for (size_t r = 0, at = 0; r < refs.size(); at += size_t(refs[r].n_tokens), ++r)
    for (int32_t t = 0; t < refs[r].n_tokens; ++t) key_mass[starts[r] + t] += concat_mass[at + size_t(t)];
}

// A kv head's planned cached keys as ascending stored-token ranges: all of
// them, or (head_bit >= 0, with head masks) those its query head head_bit reads.
std::vector<KeyRange> plan_ranges(const KeyPlan& plan, int32_t g, int32_t page_size, int32_t head_bit = -1) {
  const int32_t cached = plan.cached[size_t(g)];
  std::vector<KeyRange> ranges;
  if (plan.mode[size_t(g)] == kernels::KeySelect::All) {
    if (cached > 0) ranges.push_back({0, cached});
    return ranges;
  }
  const bool pages = plan.mode[size_t(g)] == kernels::KeySelect::Pages;
  for (int32_t j = plan.indptr[size_t(g)]; j < plan.indptr[size_t(g) + 1]; ++j) {
    const int32_t x = plan.indices[size_t(j)];
    if (x < 0) continue;  // an unused slot of a per-query-head union
    if (head_bit >= 0 && !plan.heads.empty() && ((plan.heads[size_t(j)] >> head_bit) & 1u) == 0) continue;
    const int32_t start = pages ? x * page_size : x;
    const int32_t len = pages ? std::min(page_size, cached - start) : 1;
    if (!ranges.empty() && ranges.back().start + ranges.back().len == start)
      ranges.back().len += len;
    else
      ranges.push_back({start, len});
  }
  return ranges;
}

}  // namespace

// The keys a call reads, per unit of work: a kv group, whose query heads share
// its keys (each tile of keys is read once for all of them), or a single
// query head when the plan gives each head its own keys (KeyPlan::heads).
struct CpuBackend::AttentionRefs {
  int32_t layer = 0;
  const KvSequence* seq = nullptr;
  const ComponentMask* mask = nullptr;
  const SparsePlan* sparse = nullptr;
  int32_t unit_heads = 1;  // query heads per unit: the group size, or 1
  // Per unit: the keys this call reads (cached selection, then the new tokens).
  std::vector<std::vector<cpu::KvPageRef>> refs;
  // Progressive quantization: refs read the MSB planes, full_refs (the same
  // keys) both planes.
  std::vector<std::vector<cpu::KvPageRef>> full_refs;
  std::vector<std::vector<int32_t>> ref_start;  // stored index of each ref's first key
  std::vector<int32_t> old_visible;             // cached keys in refs, before the new tokens
  std::vector<int32_t> cached_before;           // per kv head: stored tokens before this call's append
  int32_t n_units() const { return int32_t(refs.size()); }
  int32_t unit_of(int32_t head) const { return head / unit_heads; }
  // Every query head of unit u is masked: its keys are not read at all.
  bool unit_masked(int32_t u) const {
    if (mask == nullptr) return false;
    for (int32_t j = 0; j < unit_heads; ++j)
      if (mask->heads[size_t(u * unit_heads + j)] != 0) return false;
    return true;
  }
};

Status CpuBackend::attention(const KvSequence& seq, const LayerAttention& work) {
  const ModelConfig& c = config_;
  const auto t0 = time_attention_ ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  const int32_t ps = seq.pool().shape().page_size, gs = c.group_size();
  AttentionRefs call;
  call.layer = work.layer;
  call.seq = &seq;
  call.mask = work.predicted_heads ? &predicted_masks_[size_t(work.layer)] : work.mask;
  call.sparse = work.sparse != nullptr && work.sparse->active() ? work.sparse : nullptr;
  const bool per_head = !work.keys->heads.empty();
  call.unit_heads = per_head ? 1 : gs;
  const int32_t units = c.n_heads / call.unit_heads;
  call.refs.resize(size_t(units));
  call.ref_start.resize(size_t(units));
  call.old_visible.assign(size_t(units), 0);
  call.cached_before = work.keys->cached;
  for (int32_t u = 0; u < units; ++u) {
    const int32_t g = u * call.unit_heads / gs;
    std::vector<KeyRange> ranges = plan_ranges(*work.keys, g, ps, per_head ? u % gs : -1);
    for (const KeyRange& r : ranges) call.old_visible[size_t(u)] += r.len;
    ranges.push_back({call.cached_before[size_t(g)], int32_t(n_)});
    ranges_to_refs(seq, work.layer, g, ranges, call.refs[size_t(u)], call.ref_start[size_t(u)]);
  }
  const int64_t n = n_;
  const bool values = work.values != nullptr && work.values->active();
  if (values && call.sparse != nullptr) return Error{"cpu backend: local value pruning with a sparse prefill plan"};
  const bool progressive = work.requant != nullptr && seq.pool().bit_planes().active();
  if (progressive) {
    if (call.sparse != nullptr) return Error{"cpu backend: bit-plane KV pages with a sparse prefill plan"};
    if (!cpu::attention_tiled_supports(c.head_dim))
      return Error{fmt::format("cpu backend: bit-plane KV pages need a head size that is a multiple of 8 up to 256, "
                               "not {}",
                               c.head_dim)};
    call.full_refs = call.refs;
    for (auto& unit : call.refs)
      for (cpu::KvPageRef& r : unit) r.lsb = false;
  }
  if (work.statistics) {
    head_mass_.resize(size_t(c.n_heads));
    for (int32_t h = 0; h < c.n_heads; ++h)
      head_mass_[size_t(h)].assign(size_t(call.cached_before[size_t(h / c.group_size())] + n), 0.0f);
    stats_layer_ = work.layer;
  }
  if (values) {
    attend_values_pruned(call, *work.values, work.statistics, work.values_skipped, progressive ? work.requant : nullptr,
                         work.requant_tally);
  } else if (progressive) {
    attend_progressive(call, work.statistics, *work.requant, *work.requant_tally);
  } else if (work.statistics) {
    if (call.sparse != nullptr || !cpu::attention_tiled_supports(c.head_dim)) {
      // One work item per head, so each head's statistics have a single writer.
#pragma omp parallel for schedule(dynamic)
      for (int32_t h = 0; h < c.n_heads; ++h) attend_head(call, h, 0, n, head_mass_[size_t(h)].data());
    } else {  // the same outputs as without statistics, then the probabilities from each row's final max and sum
      attend_groups(call, true);
#pragma omp parallel for schedule(dynamic)
      for (int32_t h = 0; h < c.n_heads; ++h) add_key_mass(call, h);
    }
  } else if (call.sparse != nullptr) {
    // Work items: a sparse head's query blocks, a dense head's chunks of rows;
    // the later rows (more keys) first.
    struct Item {
      int32_t head, block;  // block < 0: dense rows [-block - 1 chunks]
    };
    std::vector<Item> items;
    const int64_t n_chunks = (n + kQueryChunkRows - 1) / kQueryChunkRows;
    for (int32_t h = 0; h < c.n_heads; ++h) {
      if (call.sparse->sparse(h)) {
        const auto& sh = call.sparse->heads[size_t(h)];
        for (int32_t b = sh.first_block + sh.n_blocks - 1; b >= sh.first_block; --b) items.push_back({h, b});
      } else {
        for (int64_t k = n_chunks - 1; k >= 0; --k) items.push_back({h, -int32_t(k) - 1});
      }
    }
    std::stable_sort(items.begin(), items.end(), [](const Item& a, const Item& b) {
      return (a.block >= 0 ? a.block : -a.block) > (b.block >= 0 ? b.block : -b.block);
    });
#pragma omp parallel for schedule(dynamic) if (items.size() > 1)
    for (size_t k = 0; k < items.size(); ++k) {
      const Item it = items[k];
      if (it.block >= 0) {
        attend_sparse_block(call, it.head, it.block, nullptr);
      } else {
        const int64_t i0 = int64_t(-it.block - 1) * kQueryChunkRows;
        attend_head(call, it.head, i0, std::min(n, i0 + kQueryChunkRows), nullptr);
      }
    }
  } else if (!cpu::attention_tiled_supports(c.head_dim)) {
    const int64_t n_chunks = (n + kQueryChunkRows - 1) / kQueryChunkRows;
    const int64_t items = int64_t(c.n_heads) * n_chunks;
#pragma omp parallel for schedule(dynamic) if (items > 1)
    for (int64_t item = 0; item < items; ++item) {
      const int64_t i0 = (item % n_chunks) * kQueryChunkRows;
      attend_head(call, int32_t(item / n_chunks), i0, std::min(n, i0 + kQueryChunkRows), nullptr);
    }
  } else if (n <= kSplitKeyRows) {
    attend_split_keys(call);
  } else {
    attend_groups(call, false);
  }
  if (call.mask != nullptr)  // masked heads output zeros (the grouped kernels computed them with the group)
    for (int32_t h = 0; h < c.n_heads; ++h)
      if (call.mask->heads[size_t(h)] == 0)
        for (int64_t i = 0; i < n; ++i) std::fill_n(&attn_[size_t(i * c.q_dim() + h * c.head_dim)], c.head_dim, 0.0f);
  if (time_attention_)
    attention_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return ok_status();
}

// Attention of query rows [r0, r1) of head h. With key_mass (per stored token),
// adds each key's softmax probability to it.
void CpuBackend::attend_head(const AttentionRefs& call, int32_t h, int64_t r0, int64_t r1, float* key_mass) {
  const ModelConfig& c = config_;
  const int64_t hd = c.head_dim;
  const int32_t g = h / c.group_size(), u = call.unit_of(h);
  const float scale = 1.0f / std::sqrt(float(hd));
  float* out = &attn_[size_t(r0 * c.q_dim() + h * hd)];
  const float* q = &q_[size_t(r0 * c.q_dim() + h * hd)];
  if (call.mask != nullptr && call.mask->heads[size_t(h)] == 0) {
    for (int64_t i = r0; i < r1; ++i) std::fill_n(&attn_[size_t(i * c.q_dim() + h * hd)], hd, 0.0f);
    return;
  }
  if (call.sparse != nullptr && call.sparse->sparse(h)) {  // called with all rows (statistics): block by block
    const int32_t bs = call.sparse->heads[size_t(h)].block_size, cached = call.cached_before[size_t(g)];
    for (int32_t b = (cached + int32_t(r0)) / bs; b * bs < cached + int32_t(r1); ++b)
      attend_sparse_block(call, h, b, key_mass);
    return;
  }
  const auto& refs = call.refs[size_t(u)];
  std::vector<float> concat_mass;
  if (key_mass != nullptr) concat_mass.assign(size_t(call.old_visible[size_t(u)] + n_), 0.0f);
  for (int64_t i0 = r0; i0 < r1; i0 += kQueryChunkRows) {
    const int64_t rows = std::min(kQueryChunkRows, r1 - i0);
    int32_t visible[kQueryChunkRows];
    for (int64_t r = 0; r < rows; ++r) visible[r] = call.old_visible[size_t(u)] + int32_t(i0 + r) + 1;
    if (key_mass == nullptr && cpu::attention_tiled_supports(hd)) {
      const cpu::QueryTile tile{q + (i0 - r0) * c.q_dim(), rows, 1, c.q_dim(), hd, visible,
                                out + (i0 - r0) * c.q_dim(), c.q_dim(), hd};
      cpu::attention_tiled(tile, refs.data(), int64_t(refs.size()), hd, scale);
      continue;
    }
    cpu::attention_paged(q + (i0 - r0) * c.q_dim(), rows, c.q_dim(), refs.data(), int64_t(refs.size()), visible, hd,
                         scale, out + (i0 - r0) * c.q_dim(), c.q_dim(),
                         key_mass != nullptr ? concat_mass.data() : nullptr);
  }
  if (key_mass != nullptr) scatter_mass(refs, call.ref_start[size_t(u)], concat_mass, key_mass);
}

// Local value pruning: each head's rows one by one (every key scored, P·V over
// the most probable only; cpu::attention_row_value_topk). With statistics,
// each key's full probability goes into the head's mass (reset by attention()). `skipped` (when not
// null) gets, per kv head, the cached keys its rows read whose V row no query
// head of the group accumulated.
void CpuBackend::attend_values_pruned(const AttentionRefs& call, const ValuePruning& values, bool keep_stats,
                                      int64_t* skipped, const KvQuantization* requant, RequantTally* tally) {
  const ModelConfig& c = config_;
  const int64_t n = n_, hd = c.head_dim, qd = c.q_dim();
  const int32_t gs = c.group_size();
  const float scale = 1.0f / std::sqrt(float(hd));
  // Per query head, which stored tokens' values it accumulated (any row).
  std::vector<std::vector<uint8_t>> used(size_t(c.n_heads));
  // Progressive quantization, per (head, row): whether it was refetched, and
  // the cached keys and kept cached values whose LSB planes it read.
  std::vector<uint8_t> refetched(requant != nullptr ? size_t(c.n_heads * n) : 0, 0);
  std::vector<int64_t> lsb_keys(refetched.size(), 0), lsb_values(refetched.size(), 0);
#pragma omp parallel for schedule(dynamic)
  for (int32_t h = 0; h < c.n_heads; ++h) {
    const int32_t g = h / gs, u = call.unit_of(h);
    const int32_t stored = call.cached_before[size_t(g)] + int32_t(n);
    if (call.mask != nullptr && call.mask->heads[size_t(h)] == 0) {
      for (int64_t i = 0; i < n; ++i) std::fill_n(&attn_[size_t(i * qd + h * hd)], hd, 0.0f);
      continue;
    }
    const auto& refs = call.refs[size_t(u)];
    const auto& starts = call.ref_start[size_t(u)];
    used[size_t(h)].assign(size_t(stored), 0);
    const int64_t total = call.old_visible[size_t(u)] + n;
    std::vector<float> probs(static_cast<size_t>(total));
    std::vector<uint8_t> kept(static_cast<size_t>(total));
    for (int64_t i = 0; i < n; ++i) {
      const int64_t visible = call.old_visible[size_t(u)] + i + 1;
      const float* q = &q_[size_t(i * qd + h * hd)];
      float* out = &attn_[size_t(i * qd + h * hd)];
      // With bit planes a flat row is recomputed from both (its probabilities and kept values replacing the MSB pass's).
      bool again = false;
      if (requant != nullptr)
        again = cpu::attention_row_progressive(q, refs.data(), int64_t(refs.size()), visible, hd, scale, values.keep,
                                               values.renormalize, float(requant->requant_threshold), out,
                                               probs.data(), kept.data());
      else
        cpu::attention_row_value_topk(q, refs.data(), int64_t(refs.size()), visible, hd, scale, values.keep,
                                      values.renormalize, out, probs.data(), kept.data());
      if (again) {
        const int64_t cached = call.old_visible[size_t(u)];
        refetched[size_t(h * n + i)] = 1;
        lsb_keys[size_t(h * n + i)] = cached;
        lsb_values[size_t(h * n + i)] = std::count(kept.begin(), kept.begin() + cached, uint8_t{1});
      }
      // Concatenation index -> stored token.
      for (size_t r = 0, at = 0; r < refs.size() && int64_t(at) < visible; at += size_t(refs[r].n_tokens), ++r)
        for (int32_t t = 0; t < refs[r].n_tokens && int64_t(at) + t < visible; ++t) {
          const size_t j = at + size_t(t), token = size_t(starts[r] + t);
          if (kept[j] != 0) used[size_t(h)][token] = 1;
          if (keep_stats) head_mass_[size_t(h)][token] += probs[j];
        }
    }
  }
  if (requant != nullptr) {
    std::vector<uint8_t> computed(static_cast<size_t>(c.n_heads));
    for (int32_t h = 0; h < c.n_heads; ++h) computed[size_t(h)] = !used[size_t(h)].empty();  // empty: masked
    tally->add(gs, n, computed, refetched, lsb_keys, lsb_values);
  }
  if (skipped == nullptr) return;
  *skipped = 0;
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    const int32_t stored = call.cached_before[size_t(g)] + int32_t(n);
    std::vector<uint8_t> read(static_cast<size_t>(stored), 0), accumulated(static_cast<size_t>(stored), 0);
    for (int32_t j = 0; j < gs; ++j) {
      const int32_t h = g * gs + j, u = call.unit_of(h);
      if (used[size_t(h)].empty()) continue;  // masked: reads nothing
      for (size_t r = 0; r < call.refs[size_t(u)].size(); ++r)
        for (int32_t t = 0; t < call.refs[size_t(u)][r].n_tokens; ++t)
          read[size_t(call.ref_start[size_t(u)][r] + t)] = 1;
      for (int32_t t = 0; t < stored; ++t) accumulated[size_t(t)] |= used[size_t(h)][size_t(t)];
    }
    for (int32_t t = 0; t < call.cached_before[size_t(g)]; ++t)  // the cached keys (the traffic counters' own)
      *skipped += read[size_t(t)] != 0 && accumulated[size_t(t)] == 0;
  }
}

// Query block `qb` of sparse head h (its rows of this call): one online-softmax
// pass over the block's ranges and columns, merged in stored order, each row
// seeing the listed keys <= its own position. With key_mass (per stored
// token), the exact kernel adds each key's probability to it.
void CpuBackend::attend_sparse_block(const AttentionRefs& call, int32_t h, int32_t qb, float* key_mass) {
  const ModelConfig& c = config_;
  const int64_t hd = c.head_dim, qd = c.q_dim();
  const int32_t g = h / c.group_size();
  const int32_t bs = call.sparse->heads[size_t(h)].block_size, cached = call.cached_before[size_t(g)];
  const int64_t i0 = std::max<int64_t>(0, int64_t(qb) * bs - cached);
  const int64_t i1 = std::min<int64_t>(n_, int64_t(qb + 1) * bs - cached);
  if (i1 <= i0) return;
  const float scale = 1.0f / std::sqrt(float(hd));
  if (call.mask != nullptr && call.mask->heads[size_t(h)] == 0) {
    for (int64_t i = i0; i < i1; ++i) std::fill_n(&attn_[size_t(i * qd + h * hd)], hd, 0.0f);
    return;
  }
  // The block's keys in stored order: ranges and columns are disjoint.
  thread_local std::vector<KeyRange> keys;
  thread_local std::vector<cpu::KvPageRef> refs;
  thread_local std::vector<int32_t> starts, visible;
  keys.clear();
  const auto ranges = call.sparse->block_ranges(h, qb);
  const auto columns = call.sparse->block_columns(h, qb);
  size_t r = 0, k = 0;
  while (r < ranges.size() || k < columns.size()) {
    const bool take_range = k == columns.size() || (r < ranges.size() && ranges[r] < columns[k]);
    const KeyRange next = take_range ? KeyRange{ranges[r], ranges[r + 1] - ranges[r]} : KeyRange{columns[k], 1};
    if (take_range) r += 2; else ++k;
    if (!keys.empty() && keys.back().start + keys.back().len == next.start)
      keys.back().len += next.len;
    else
      keys.push_back(next);
  }
  refs.clear();
  starts.clear();
  ranges_to_refs(*call.seq, call.layer, g, keys, refs, starts);
  // Row self sees the keys <= self: a prefix of the stored-order list.
  visible.resize(size_t(i1 - i0));
  int32_t full = 0;
  size_t j = 0;
  for (int64_t i = i0; i < i1; ++i) {
    const int32_t self = cached + int32_t(i);
    while (j < keys.size() && keys[j].start + keys[j].len <= self + 1) full += keys[j++].len;
    visible[size_t(i - i0)] = full + (j < keys.size() && keys[j].start <= self ? self + 1 - keys[j].start : 0);
  }
  const float* q = &q_[size_t(i0 * qd + h * hd)];
  float* out = &attn_[size_t(i0 * qd + h * hd)];
  if (key_mass == nullptr && cpu::attention_tiled_supports(hd)) {
    const cpu::QueryTile tile{q, i1 - i0, 1, qd, hd, visible.data(), out, qd, hd};
    cpu::attention_tiled(tile, refs.data(), int64_t(refs.size()), hd, scale);
    return;
  }
  int64_t total = 0;
  for (const KeyRange& kr : keys) total += kr.len;
  std::vector<float> concat_mass(key_mass != nullptr ? size_t(total) : 0, 0.0f);
  for (int64_t i = i0; i < i1; ++i) {
    const int32_t v = visible[size_t(i - i0)];
    if (v == 0) {
      std::fill_n(out + (i - i0) * qd, hd, 0.0f);
      continue;
    }
    cpu::attention_paged(q + (i - i0) * qd, 1, qd, refs.data(), int64_t(refs.size()), &v, hd, scale,
                         out + (i - i0) * qd, qd, key_mass != nullptr ? concat_mass.data() : nullptr);
  }
  if (key_mass != nullptr) scatter_mass(refs, starts, concat_mass, key_mass);  // concat_mass covers every ref's keys
}

// Prefill: a work item is a unit's query heads (a kv group's) x 16 rows, so
// each tile of keys is read once for all of them. Later rows see more keys:
// they go first. With keep_stats, each query vector's final softmax max and
// sum are kept (stats_ml_: per head, n maxima then n sums) for add_key_mass.
void CpuBackend::attend_groups(const AttentionRefs& call, bool keep_stats) {
  const ModelConfig& c = config_;
  const int64_t n = n_, gs = call.unit_heads, hd = c.head_dim, qd = c.q_dim(), nkv = call.n_units();
  const float scale = 1.0f / std::sqrt(float(hd));
  const int64_t n_chunks = (n + kQueryChunkRows - 1) / kQueryChunkRows;
  if (keep_stats) stats_ml_.resize(size_t(c.n_heads * 2 * n));
#pragma omp parallel for schedule(dynamic)
  for (int64_t item = 0; item < nkv * n_chunks; ++item) {
    const int32_t g = int32_t(item % nkv);  // the unit
    if (call.unit_masked(g)) continue;      // zeros (attention() writes them); its keys are not read
    const int64_t i0 = (n_chunks - 1 - item / nkv) * kQueryChunkRows, i1 = std::min(n, i0 + kQueryChunkRows);
    int32_t visible[kQueryChunkRows];
    for (int64_t i = i0; i < i1; ++i) visible[i - i0] = call.old_visible[size_t(g)] + int32_t(i) + 1;
    const auto& refs = call.refs[size_t(g)];
    const int64_t at = i0 * qd + g * gs * hd;
    const cpu::QueryTile tile{&q_[size_t(at)], i1 - i0, gs, qd, hd, visible, &attn_[size_t(at)], qd, hd};
    if (!keep_stats) {
      cpu::attention_tiled(tile, refs.data(), int64_t(refs.size()), hd, scale);
      continue;
    }
    thread_local std::vector<float> o, ml;
    o.resize(size_t(tile.n_vectors() * hd));
    ml.resize(size_t(2 * tile.n_vectors()));
    const cpu::SoftmaxPartial part{o.data(), ml.data(), ml.data() + tile.n_vectors()};
    cpu::attention_tiled_partial(tile, refs.data(), int64_t(refs.size()), hd, scale, 0, INT32_MAX, part);
    cpu::attention_merge(tile, &part, 1, hd);
    for (int64_t i = i0; i < i1; ++i)
      for (int64_t j = 0; j < gs; ++j) {
        float* head_ml = &stats_ml_[size_t((g * gs + j) * 2 * n)];
        head_ml[i] = part.m[(i - i0) * gs + j];
        head_ml[n + i] = part.l[(i - i0) * gs + j];
      }
  }
}

// Head h's statistics of the call attend_groups computed: the probability each
// key received from each row, summed per stored token. With `refetched`, a
// row marked there gets its probabilities from both bit planes (as it was
// recomputed), the others from the MSB planes.
void CpuBackend::add_key_mass(const AttentionRefs& call, int32_t h, const uint8_t* refetched) {
  const ModelConfig& c = config_;
  const int64_t n = n_, hd = c.head_dim;
  const int32_t g = call.unit_of(h);
  if (call.mask != nullptr && call.mask->heads[size_t(h)] == 0) return;
  std::vector<int32_t> visible(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) visible[size_t(i)] = call.old_visible[size_t(g)] + int32_t(i) + 1;
  std::vector<float> concat_mass(size_t(call.old_visible[size_t(g)] + n), 0.0f);
  const float* ml = &stats_ml_[size_t(h * 2 * n)];
  const auto& refs = call.refs[size_t(g)];
  // Runs of rows read with one set of planes.
  for (int64_t i0 = 0, i1 = 0; i0 < n; i0 = i1) {
    const bool full = refetched != nullptr && refetched[i0] != 0;
    for (i1 = i0 + 1; i1 < n && refetched != nullptr && (refetched[i1] != 0) == full;) ++i1;
    if (refetched == nullptr) i1 = n;
    const auto& run_refs = full ? call.full_refs[size_t(g)] : refs;
    const cpu::QueryTile tile{&q_[size_t(i0 * c.q_dim() + h * hd)], i1 - i0, 1, c.q_dim(), 0, visible.data() + i0,
                              nullptr, 0, 0};
    cpu::attention_key_mass(tile, run_refs.data(), int64_t(run_refs.size()), hd, 1.0f / std::sqrt(float(hd)), ml + i0,
                            ml + n + i0, concat_mass.data());
  }
  scatter_mass(refs, call.ref_start[size_t(g)], concat_mass, head_mass_[size_t(h)].data());
}

// Progressive quantization (bit-plane pages): every query vector from the MSB
// planes (attend_groups, or attend_split_keys for a few rows, keeping its
// softmax max and sum); a vector whose
// largest probability, 1 / sum in the max-relative sum, is below the
// threshold is recomputed from both planes, its max and sum replacing the
// MSB pass's; then the statistics, each row's from the planes it ended with.
void CpuBackend::attend_progressive(const AttentionRefs& call, bool keep_stats, const KvQuantization& requant,
                                    RequantTally& tally) {
  const ModelConfig& c = config_;
  const int64_t n = n_, hd = c.head_dim, qd = c.q_dim();
  const int32_t gs = c.group_size();
  const float scale = 1.0f / std::sqrt(float(hd)), threshold = float(requant.requant_threshold);
  if (n <= kSplitKeyRows)  // decode: keys split across threads, as without bit planes
    attend_split_keys(call, true);
  else
    attend_groups(call, true);
  std::vector<uint8_t> refetched(size_t(c.n_heads * n), 0), computed(static_cast<size_t>(c.n_heads), 0);
  std::vector<int64_t> lsb_keys(refetched.size(), 0);  // the cached keys a refetched vector read (K and V alike)
  std::vector<std::pair<int32_t, int64_t>> flagged;  // (head, row)
  for (int32_t h = 0; h < c.n_heads; ++h) {
    if (call.mask != nullptr && call.mask->heads[size_t(h)] == 0) continue;
    computed[size_t(h)] = 1;
    for (int64_t i = 0; i < n; ++i) {
      const float l = stats_ml_[size_t(h * 2 * n + n + i)];
      if (l > 0.0f && 1.0f / l < threshold) {
        refetched[size_t(h * n + i)] = 1;
        lsb_keys[size_t(h * n + i)] = call.old_visible[size_t(call.unit_of(h))];
        flagged.emplace_back(h, i);
      }
    }
  }
#pragma omp parallel for schedule(dynamic) if (flagged.size() > 1)
  for (size_t k = 0; k < flagged.size(); ++k) {
    const auto [h, i] = flagged[k];
    const int32_t u = call.unit_of(h);
    const int32_t visible = call.old_visible[size_t(u)] + int32_t(i) + 1;
    const cpu::QueryTile tile{&q_[size_t(i * qd + h * hd)], 1, 1, qd, hd, &visible, &attn_[size_t(i * qd + h * hd)],
                              qd, hd};
    thread_local std::vector<float> o;
    o.resize(size_t(hd));
    float m = 0.0f, l = 0.0f;
    const cpu::SoftmaxPartial part{o.data(), &m, &l};
    const auto& full = call.full_refs[size_t(u)];
    cpu::attention_tiled_partial(tile, full.data(), int64_t(full.size()), hd, scale, 0, INT32_MAX, part);
    cpu::attention_merge(tile, &part, 1, hd);
    stats_ml_[size_t(h * 2 * n + i)] = m;
    stats_ml_[size_t(h * 2 * n + n + i)] = l;
  }
  if (keep_stats) {
#pragma omp parallel for schedule(dynamic)
    for (int32_t h = 0; h < c.n_heads; ++h) add_key_mass(call, h, &refetched[size_t(h * n)]);
  }
  tally.add(gs, n, computed, refetched, lsb_keys, lsb_keys);  // every value is accumulated: V as K
}

// Decode (a few rows): each unit's (kv group's) keys are cut into slices, one
// work item per (unit, slice) writing softmax partials, then each unit merges
// its slices (flash-decoding, as the CUDA backend's split-K kernel).
void CpuBackend::attend_split_keys(const AttentionRefs& call, bool keep_stats) {
  const ModelConfig& c = config_;
  const int64_t n = n_, gs = call.unit_heads, hd = c.head_dim, qd = c.q_dim(), nkv = call.n_units(), nv = n * gs;
  const float scale = 1.0f / std::sqrt(float(hd));
  std::vector<int64_t> first(size_t(nkv + 1), 0), slice(static_cast<size_t>(nkv));
  for (int64_t g = 0; g < nkv; ++g) {
    const int64_t keys = call.old_visible[size_t(g)] + n;
    const int64_t splits = std::clamp<int64_t>(keys / kMinSplitKeys, 1, kMaxSplits);
    slice[size_t(g)] = (keys + splits - 1) / splits;
    first[size_t(g + 1)] = first[size_t(g)] + splits;
  }
  const int64_t items = first[size_t(nkv)];
  split_o_.resize(size_t(items * nv * hd));
  split_ml_.resize(size_t(items * nv * 2));
  auto part = [&](int64_t item) {
    return cpu::SoftmaxPartial{&split_o_[size_t(item * nv * hd)], &split_ml_[size_t(item * nv * 2)],
                               &split_ml_[size_t(item * nv * 2 + nv)]};
  };
  auto tile_of = [&](int64_t g, int32_t* visible) {
    for (int64_t i = 0; i < n; ++i) visible[i] = call.old_visible[size_t(g)] + int32_t(i) + 1;
    const int64_t at = g * gs * hd;
    return cpu::QueryTile{&q_[size_t(at)], n, gs, qd, hd, visible, &attn_[size_t(at)], qd, hd};
  };
#pragma omp parallel for schedule(dynamic) if (items > 1)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t g = std::upper_bound(first.begin(), first.end(), item) - first.begin() - 1;
    const int64_t s = item - first[size_t(g)];
    if (call.unit_masked(int32_t(g))) continue;
    int32_t visible[kSplitKeyRows];
    const auto& refs = call.refs[size_t(g)];
    cpu::attention_tiled_partial(tile_of(g, visible), refs.data(), int64_t(refs.size()), hd, scale,
                                 s * slice[size_t(g)], (s + 1) * slice[size_t(g)], part(item));
  }
  if (keep_stats) stats_ml_.resize(size_t(c.n_heads * 2 * n));
  for (int64_t g = 0; g < nkv; ++g) {
    if (call.unit_masked(int32_t(g))) continue;
    int32_t visible[kSplitKeyRows];
    std::vector<cpu::SoftmaxPartial> parts;
    for (int64_t item = first[size_t(g)]; item < first[size_t(g + 1)]; ++item) parts.push_back(part(item));
    cpu::attention_merge(tile_of(g, visible), parts.data(), int64_t(parts.size()), hd);
    if (!keep_stats) continue;
    // Each vector's max and sum over every slice (log2 domain), as attend_groups keeps them.
    for (int64_t v = 0; v < nv; ++v) {
      float m = -std::numeric_limits<float>::infinity(), l = 0.0f;
      for (const auto& pt : parts) m = std::max(m, pt.m[v]);
      for (const auto& pt : parts)
        if (pt.l[v] > 0.0f) l += pt.l[v] * std::exp2(pt.m[v] - m);
      const int64_t i = v / gs, h = g * gs + v % gs;
      stats_ml_[size_t(h * 2 * n + i)] = m;
      stats_ml_[size_t(h * 2 * n + n + i)] = l;
    }
  }
}

// Mass per stored token of kv head g: its query heads' statistics, summed in order.
void CpuBackend::group_mass(int32_t g, std::vector<float>& mass) const {
  const int32_t gs = config_.group_size();
  mass.assign(head_mass_[size_t(g * gs)].size(), 0.0f);
  for (int32_t j = 0; j < gs; ++j) {
    const auto& hm = head_mass_[size_t(g * gs + j)];
    for (size_t t = 0; t < mass.size(); ++t) mass[t] += hm[t];
  }
}

Status CpuBackend::read_statistics(const KvSequence&, int32_t l, LayerStatistics& out) {
  const ModelConfig& c = config_;
  if (stats_layer_ != l) return Error{fmt::format("cpu backend: no attention statistics for layer {}", l)};
  out.key_mass.resize(size_t(c.n_kv_heads));
  for (int32_t g = 0; g < c.n_kv_heads; ++g) group_mass(g, out.key_mass[size_t(g)]);
  out.head_norms.assign(size_t(c.n_heads), 0.0f);
  out.head_l1.assign(size_t(c.n_heads), 0.0f);
  cpu::head_output_norms(attn_.data(), int32_t(n_), c.n_heads, int32_t(c.head_dim), out.head_norms.data(),
                         out.head_l1.data());
  return ok_status();
}

Status CpuBackend::retain(KvSequence& seq, int32_t l, const RetentionPolicy& policy,
                          std::span<const RetentionBudget> budgets, std::vector<std::vector<int32_t>>& drops) {
  const ModelConfig& c = config_;
  if (stats_layer_ != l) return Error{fmt::format("cpu backend: no attention statistics for layer {}", l)};
  if (policy.scope == RetentionScope::PerSequence) return retain_sequence(seq, l, policy, budgets[0], drops);
  const int32_t ps = seq.pool().shape().page_size;
  float* plane = seq.pool().plane(SlotPlane::Score);
  drops.assign(size_t(c.n_kv_heads), {});
  std::vector<float> mass, score;
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    group_mass(g, mass);
    const HeadPageTable& t = seq.table(l, g);
    const int32_t n = t.n_tokens();
    score.resize(size_t(n));
    for (int32_t i = 0; i < n; ++i) {
      float& s = plane[int64_t(t.pages[size_t(i / ps)]) * ps + i % ps];
      s = policy.score == RetentionScore::LastMass ? mass[size_t(i)] : s + mass[size_t(i)];
      score[size_t(i)] = s;
    }
    const RetentionBudget& b = budgets[size_t(g)];
    if (b.heavy < 0 || int64_t(n) <= int64_t(b.sink) + b.recent + b.heavy) continue;
    cpu::retention_drops(score.data(), n, b.sink, b.recent, b.heavy, drops[size_t(g)]);
  }
  return ok_status();
}

// One score per position of the sequence, summed over layers and kv heads, in
// the sequence's planes; every kv head of the layer keeps the same tokens.
Status CpuBackend::retain_sequence(KvSequence& seq, int32_t l, const RetentionPolicy& policy,
                                   const RetentionBudget& budget, std::vector<std::vector<int32_t>>& drops) {
  const ModelConfig& c = config_;
  const HeadPageTable& head0 = seq.table(l, 0);  // every kv head holds these tokens (the schedule checked)
  const int32_t n = head0.n_tokens();
  const int32_t capacity = sequence_plane_capacity(max_context_, call_first_position_ + int32_t(call_rows_));
  auto* score = static_cast<float*>(seq.sequence_plane(SequencePlane::Score, capacity));
  auto* dropped_at = static_cast<int32_t*>(seq.sequence_plane(SequencePlane::DroppedAt, capacity));
  if (!sequence_retention_started_) {  // this call's tokens are new at their positions
    sequence_retention_started_ = true;
    const int32_t first = call_first_position_;
    std::fill(score + first, score + first + call_rows_, 0.0f);
    std::fill(dropped_at + first, dropped_at + first + call_rows_, 0);
    if (policy.score == RetentionScore::LastMass) std::fill(score, score + capacity, 0.0f);
  }
  std::vector<float> mass(size_t(c.n_kv_heads) * size_t(n)), one;
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    group_mass(g, one);
    std::copy(one.begin(), one.end(), mass.begin() + int64_t(g) * n);
  }
  std::vector<int32_t> out(static_cast<size_t>(n));
  int32_t n_out = 0;
  kernels::SequenceRetentionCall call;
  call.n_kv_heads = c.n_kv_heads;
  call.n_tokens = n;
  call.layer = l;
  call.positions = head0.positions.data();
  call.mass = mass.data();
  call.mass_stride = n;
  call.score = score;
  call.dropped_at = dropped_at;
  call.sink = budget.sink;
  call.recent = budget.recent;
  call.heavy = budget.heavy;
  call.drops = out.data();
  call.n_drops = &n_out;
  cpu::sequence_retention_update(call);
  cpu::sequence_retention_select(call);
  drops.assign(size_t(c.n_kv_heads), std::vector<int32_t>(out.begin(), out.begin() + n_out));
  return ok_status();
}

Status CpuBackend::select_by_bound(const KvSequence& seq, int32_t l, KeyPlan& plan) {
  // Bounds of stale pages are refreshed first (cpu::page_bounds_update), then
  // every head with a budget is scored at once.
  const ModelConfig& c = config_;
  const auto t0 = time_attention_ ? std::chrono::steady_clock::now() : std::chrono::steady_clock::time_point{};
  const int32_t ps = pool_->shape().page_size, nkv = c.n_kv_heads;
  std::vector<int32_t> stale_pages, stale_counts;
  std::vector<PageBoundSync> covered(static_cast<size_t>(nkv));
  int32_t max_pages = 0;
  for (int32_t g = 0; g < nkv; ++g) {
    if (plan.budget[size_t(g)] <= 0) continue;
    const int32_t cached = plan.cached[size_t(g)];
    covered[size_t(g)] = stale_bound_pages(seq, l, g, cached, bound_sync_[size_t(l) * size_t(nkv) + size_t(g)],
                                           stale_pages, stale_counts);
    max_pages = std::max(max_pages, (cached + ps - 1) / ps);
  }
  const kernels::KvPages kv{pool_->chunks().data(), pool_->pages_per_chunk(), ps, int32_t(c.head_dim),
                            pool_->dtype()};
  page_bounds_.resize(size_t(pool_->pages_reserved()) * 2 * size_t(c.head_dim));  // bounds in the pages' type fit
  cpu::page_bounds_update(kv, page_bounds_.data(), stale_pages.data(), stale_counts.data(),
                          int32_t(stale_pages.size()));
  for (int32_t g = 0; g < nkv; ++g)
    if (plan.budget[size_t(g)] > 0) bound_sync_[size_t(l) * size_t(nkv) + size_t(g)] = covered[size_t(g)];
  const int32_t stride = max_pages;
  std::vector<int32_t> table(size_t(nkv) * size_t(stride), 0);
  for (int32_t g = 0; g < nkv; ++g)
    if (plan.budget[size_t(g)] > 0) {
      const auto& pages = seq.table(l, g).pages;
      std::copy(pages.begin(), pages.begin() + (plan.cached[size_t(g)] + ps - 1) / ps,
                table.begin() + int64_t(g) * stride);
    }
  const int32_t selections = plan.by_bound_per_head ? c.group_size() : 1;  // per kv head
  bound_scores_.resize(size_t(nkv) * size_t(selections) * size_t(stride));
  kernels::PageSelectCall call;
  call.n_kv_heads = nkv;
  call.group_size = c.group_size();
  call.head_dim = int32_t(c.head_dim);
  call.page_size = ps;
  call.dtype = pool_->dtype();
  call.bounds = page_bounds_.data();
  call.table = {table.data(), stride};
  call.q = &q_[size_t((n_ - 1) * c.q_dim())];
  call.n_cached = plan.cached.data();
  call.keep = plan.budget.data();
  call.out_offset = plan.indptr.data();
  call.out = plan.indices.data();
  call.scores = bound_scores_.data();
  call.score_stride = stride;
  call.per_head = plan.by_bound_per_head ? 1 : 0;
  call.out_heads = plan.by_bound_per_head ? plan.heads.data() : nullptr;
  cpu::page_select(call);
  if (time_attention_)
    attention_seconds_ += std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return ok_status();
}


// The indices of estimated heads first (in parallel, each head alone), then
// every head's blocks in order.
Status CpuBackend::plan_sparse_prefill(const KvSequence& seq, int32_t l,
                                       std::span<const std::optional<PrefillPattern>> patterns, SparsePlan& plan) {
  using Kind = PrefillPattern::Kind;
  const ModelConfig& c = config_;
  const auto t0 = std::chrono::steady_clock::now();
  const int64_t hd = c.head_dim, qd = c.q_dim(), n = n_;
  const int32_t nh = c.n_heads, gs = c.group_size();
  const float scale = 1.0f / std::sqrt(float(hd));
  // Per head: kept columns and diagonals (VerticalSlash), or per query block
  // of the call the kept key blocks (BlockTopK).
  std::vector<std::vector<int32_t>> columns(static_cast<size_t>(nh)), diagonals(static_cast<size_t>(nh));
  std::vector<std::vector<std::vector<int32_t>>> key_blocks(static_cast<size_t>(nh));
#pragma omp parallel for schedule(dynamic)
  for (int32_t h = 0; h < nh; ++h) {
    const auto& p = patterns[size_t(h)];
    if (!p || (p->kind != Kind::VerticalSlash && p->kind != Kind::BlockTopK)) continue;
    const int32_t g = h / gs, stored = seq.table(l, g).n_tokens(), cached = stored - int32_t(n);
    std::vector<cpu::KvPageRef> refs;
    std::vector<int32_t> starts;
    ranges_to_refs(seq, l, g, {KeyRange{0, stored}}, refs, starts);
    if (p->kind == Kind::VerticalSlash) {
      const int64_t rows = std::min<int64_t>(p->last_q, n);
      std::vector<int32_t> self(static_cast<size_t>(rows));
      for (int64_t i = 0; i < rows; ++i) self[size_t(i)] = cached + int32_t(n - rows + i);
      std::vector<float> vertical(size_t(stored), 0.0f), slash(size_t(stored), 0.0f), scratch;
      cpu::vertical_slash_scores(&q_[size_t((n - rows) * qd + h * hd)], rows, qd, self.data(), refs.data(),
                                 int64_t(refs.size()), hd, scale, vertical.data(), slash.data(), scratch);
      const float inf = std::numeric_limits<float>::infinity();
      std::fill_n(vertical.begin(), std::min(p->keep_first_columns, stored), inf);
      std::fill_n(slash.begin(), std::min(p->keep_last_diagonals, stored), inf);
      cpu::top_k_ascending(vertical.data(), stored, p->verticals, columns[size_t(h)]);
      cpu::top_k_ascending(slash.data(), stored, p->slashes, diagonals[size_t(h)]);
    } else {
      const int64_t bs = p->block_size, n_kb = (stored + bs - 1) / bs, first_qb = cached / bs;
      const int64_t n_qb = (stored - 1) / bs - first_qb + 1;
      std::vector<float> pooled_k(static_cast<size_t>(n_kb * hd)), pooled_q(static_cast<size_t>(n_qb * hd)),
          scores(static_cast<size_t>(n_kb));
      cpu::mean_pool_keys(refs.data(), int64_t(refs.size()), stored, hd, bs, pooled_k.data());
      cpu::mean_pool_rows(&q_[size_t(h * hd)], n, qd, cached, hd, bs, pooled_q.data());
      auto& chosen = key_blocks[size_t(h)];
      chosen.resize(size_t(n_qb));
      for (int64_t b = 0; b < n_qb; ++b) {
        const int64_t qb = first_qb + b;
        for (int64_t kb = 0; kb <= qb; ++kb) {
          float dot = 0.0f;
          for (int64_t d = 0; d < hd; ++d) dot += pooled_q[size_t(b * hd + d)] * pooled_k[size_t(kb * hd + d)];
          scores[size_t(kb)] = dot;
        }
        cpu::top_k_ascending(scores.data(), qb + 1, p->top_k, chosen[size_t(b)]);
      }
    }
  }
  SparsePlanBuilder builder(nh);
  std::vector<std::pair<int32_t, int32_t>> ranges;
  for (int32_t h = 0; h < nh; ++h) {
    const auto& p = patterns[size_t(h)];
    if (!p) continue;
    const int32_t stored = seq.table(l, h / gs).n_tokens(), cached = stored - int32_t(n), bs = p->block_size;
    if (p->kind == Kind::Blocks || p->kind == Kind::AShape) {
      builder.add_fixed_head(h, *p, cached, stored);
      continue;
    }
    builder.begin_head(h, bs, cached, stored);
    for (int32_t qb = cached / bs, b = 0; qb * bs < stored; ++qb, ++b) {
      ranges.clear();
      std::span<const int32_t> cols;
      if (p->kind == Kind::VerticalSlash) {
        slash_ranges(diagonals[size_t(h)], qb * bs, qb * bs + bs, ranges);
        cols = columns[size_t(h)];
      } else {
        for (const int32_t kb : key_blocks[size_t(h)][size_t(b)]) ranges.emplace_back(kb * bs, kb * bs + bs);
      }
      builder.add_block(ranges, cols);
    }
  }
  plan = builder.finish();
  plan.plan_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return ok_status();
}

}  // namespace inferlab
