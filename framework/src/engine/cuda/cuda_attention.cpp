// The CUDA backend's attention half of a layer: stored counts and KV append,
// the key plan of each layer in its own device region (so a captured step
// finds every layer's plan at a fixed address), selection by key bound, the
// attention kernels and their statistics.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "cuda/activation.cuh"
#include "cuda/attention.cuh"
#include "cuda/kv_cache_ops.cuh"
#include "cuda/page_bounds.cuh"
#include "cuda/value_topk.cuh"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/cuda_kv_storage.h"

namespace inferlab {

namespace kc = kernels::cuda;

namespace {

// Scratch of the kernels that keep every row's probabilities (value pruning,
// bit planes): all rows at once up to 512 MiB, else passes of fewer rows (a
// long prefill's rows would take gigabytes).
size_t row_scratch_bytes(const kernels::AttentionCall& call, int32_t max_keys) {
  constexpr size_t kMaxBytes = size_t(512) << 20;
  return std::max(kc::value_topk_row_scratch_bytes(call, max_keys),
                  std::min(kc::value_topk_scratch_bytes(call, max_keys), kMaxBytes));
}

}  // namespace

// Stored counts of `layer` before this call: the first new token's index per
// kv head (in the staging slot: a batched call's segments each have their own).
Status CudaBackend::stage_counts(const KvSequence& seq, int32_t l) {
  const int32_t nkv = config_.n_kv_heads;
  int32_t* counts = counts_at(l, true);
  for (int32_t g = 0; g < nkv; ++g) counts[g] = seq.table(l, g).n_tokens();
  CUDA_TRY(cudaMemcpyAsync(counts_at(l), counts, size_t(nkv) * 4, cudaMemcpyHostToDevice, stream_),
           "upload stored counts");
  return ok_status();
}

// Pages and bookkeeping for the call's `n` new tokens of `layer`; the device
// copy of its page tables follows.
Status CudaBackend::stage_append(KvSequence& seq, int32_t l, int32_t n) {
  const int32_t* positions = host_positions_.data() + focus_row_;
  std::vector<int32_t> rotary(static_cast<size_t>(n));
  for (int32_t g = 0; g < config_.n_kv_heads; ++g) {
    const int32_t stored = seq.table(l, g).n_tokens();
    for (int32_t i = 0; i < n; ++i) rotary[size_t(i)] = cache_positions_ ? stored + i : positions[i];
    seq.reserve(l, g, n, positions, rotary.data());
    if (auto s = sync_table(seq, l, g); !s) return s;
  }
  return ok_status();
}

// Into the sequence's own pool: the default one, or a method's bit planes
// (rows quantized by the kernel as it writes them).
Status CudaBackend::append_kv(KvSequence& seq, int32_t l) {
  const ModelConfig& c = config_;
  if (!capturing_)
    if (auto s = stage_append(seq, l, int32_t(n_)); !s) return s;
  const kernels::LayerPageTable table = layer_table(l);
  CUDA_TRY(kc::kv_append(cuda_kv_pages(seq.pool()), table, counts_at(l),
                         sequence_rows(k_, c.kv_dim()), sequence_rows(v_, c.kv_dim()), int32_t(n_), c.n_kv_heads,
                         stream_),
           "KV append");
  // A new token has no retention score yet.
  CUDA_TRY(kc::slot_plane_fill(table, counts_at(l), int32_t(n_), c.n_kv_heads,
                               options_.page_size, seq.pool().plane<uint32_t>(SlotPlane::Score), 0u, stream_),
           "KV append");
  return ok_status();
}

// Regions: indptr (nkv + 1), keep (nkv), stale pages (nkv), stale counts (nkv),
// indices (capacity), heads (capacity), modes (nkv bytes, rounded up to ints).
Status CudaBackend::ensure_plan_capacity(int64_t indices) {
  if (indices <= plan_capacity_ && plans_.bytes() > 0) return ok_status();
  const int64_t nkv = config_.n_kv_heads;
  const int64_t capacity = std::max({indices, 2 * plan_capacity_, int64_t(64)});
  const int64_t ints = 4 * nkv + 1 + 2 * capacity + (nkv + 3) / 4;
  CUDA_TRY(cudaStreamSynchronize(stream_), "key plans");  // earlier layers' kernels may still read the old regions
  drop_graphs();
  plan_capacity_ = 0;
  region_ints_ = 0;
  const size_t bytes = size_t(std::max(staging_slots_, 1)) * size_t(config_.n_layers) * size_t(ints) * 4;
  if (!plans_.reserve(bytes) || !host_plans_.reserve(bytes)) return Error{"cuda engine: out of GPU memory for key plans"};
  plan_capacity_ = capacity;
  region_ints_ = ints;
  return ok_status();
}

CudaBackend::PlanRegion CudaBackend::plan_region(int32_t l, bool host) const {
  const int64_t nkv = config_.n_kv_heads;
  int32_t* base = (host ? host_plans_.as<int32_t>() : plans_.as<int32_t>()) +
                  (int64_t(staging_slot()) * config_.n_layers + l) * region_ints_;
  return PlanRegion{base,
                    base + nkv + 1,
                    base + 2 * nkv + 1,
                    base + 3 * nkv + 1,
                    base + 4 * nkv + 1,
                    reinterpret_cast<uint32_t*>(base + 4 * nkv + 1 + plan_capacity_),
                    reinterpret_cast<uint8_t*>(base + 4 * nkv + 1 + 2 * plan_capacity_)};
}

// The layer's key plan into its region, and up to the device.
Status CudaBackend::stage_key_plan(int32_t l, const KeyPlan& plan) {
  const int32_t nkv = config_.n_kv_heads;
  if (auto s = ensure_plan_capacity(int64_t(plan.indices.size())); !s) return s;
  const PlanRegion r = plan_region(l, true);
  std::copy(plan.indptr.begin(), plan.indptr.end(), r.indptr);
  std::copy(plan.budget.begin(), plan.budget.end(), r.keep);
  std::copy(plan.indices.begin(), plan.indices.end(), r.indices);
  std::copy(plan.heads.begin(), plan.heads.end(), r.heads);
  for (int32_t g = 0; g < nkv; ++g) r.modes[g] = uint8_t(plan.mode[size_t(g)]);
  CUDA_TRY(cudaMemcpyAsync(plan_region(l, false).indptr, r.indptr, size_t(region_ints_) * 4, cudaMemcpyHostToDevice,
                           stream_),
           "upload key plan");
  return ok_status();
}

// The slots (and head masks) select_by_bound filled on the device, for the
// traffic counters: the size of a per-query-head union is known only there.
Status CudaBackend::read_bound_selection(int32_t l, KeyPlan& plan) {
  const PlanRegion r = plan_region(l, false);
  if (auto s = download(r.indices, plan.indices.size() * 4, plan.indices.data()); !s) return s;
  return download(r.heads, plan.heads.size() * 4, plan.heads.data());
}

kernels::AttentionCall CudaBackend::base_call(const KvPagePool& pool, int32_t l, int64_t n) const {
  const ModelConfig& c = config_;
  kernels::AttentionCall call;
  call.n_rows = int32_t(n);
  call.n_heads = c.n_heads;
  call.n_kv_heads = c.n_kv_heads;
  call.head_dim = c.head_dim;
  call.scale = 1.0f / std::sqrt(float(c.head_dim));
  call.q = sequence_rows(q_, c.q_dim());
  call.out = sequence_rows(attn_, c.q_dim());
  call.n_cached = counts_at(l);
  call.kv = cuda_kv_pages(pool);
  call.table = layer_table(l);
  return call;
}

// Bounds live per physical page: they grow (keeping what they hold) with the pool.
Status CudaBackend::ensure_page_bounds() {
  const int64_t page_bound_bytes = 2 * int64_t(config_.head_dim) * kernels::dtype_bytes(dtype_);
  const int64_t needed = pool_->pages_reserved();
  if (needed <= bound_pages_) return ok_status();
  const int64_t grown = std::max(needed, bound_pages_ + bound_pages_ / 4);
  DeviceMemory bigger;
  if (!bigger.reserve(size_t(grown * page_bound_bytes))) return Error{"cuda engine: out of GPU memory for page bounds"};
  if (bound_pages_ > 0)
    CUDA_TRY(cudaMemcpyAsync(bigger.as(), page_bounds_.as(), size_t(bound_pages_ * page_bound_bytes),
                             cudaMemcpyDeviceToDevice, stream_),
             "grow page bounds");
  CUDA_TRY(cudaStreamSynchronize(stream_), "grow page bounds");
  drop_graphs();  // they hold the old address
  page_bounds_ = std::move(bigger);
  bound_pages_ = grown;
  return ok_status();
}

size_t CudaBackend::bound_scratch_bytes(int32_t max_pages, bool per_head) const {
  const size_t per_page = per_head ? size_t(config_.n_heads) + size_t(config_.n_kv_heads) : size_t(config_.n_kv_heads);
  return per_page * size_t(max_pages) * 4;
}

kernels::PageSelectCall CudaBackend::select_call(int32_t l, const PlanRegion& region, int32_t max_pages,
                                                 bool per_head) const {
  const ModelConfig& c = config_;
  kernels::PageSelectCall call;
  call.n_kv_heads = c.n_kv_heads;
  call.group_size = c.group_size();
  call.head_dim = c.head_dim;
  call.page_size = options_.page_size;
  call.dtype = dtype_;
  call.bounds = page_bounds_.as();
  call.table = layer_table(l);
  call.q = sequence_rows(q_, c.q_dim()) + (n_ - 1) * c.q_dim();
  call.n_cached = counts_at(l);
  call.keep = region.keep;
  call.out_offset = region.indptr;
  call.out = region.indices;
  call.scores = bound_scores_.as<float>();
  call.score_stride = max_pages;
  if (per_head) {  // scores per query head, then the marks of the union
    call.per_head = 1;
    call.out_heads = region.heads;
    call.marks = reinterpret_cast<uint32_t*>(bound_scores_.as<float>() + int64_t(c.n_heads) * max_pages);
  }
  return call;
}

// Refreshes the key bounds of the stale pages of every head with a budget,
// then scores and selects on the device into the plan region's slots. A
// replayed step has its (one per head) stale pages staged in the region.
Status CudaBackend::select_by_bound(const KvSequence& seq, int32_t l, KeyPlan& plan) {
  const ModelConfig& c = config_;
  const int32_t nkv = c.n_kv_heads, ps = options_.page_size;
  // Page bounds are kept per physical page of the default pool, in its element type.
  if (&seq.pool() != pool_.get())
    return Error{"cuda engine: selection by key bound over bit-plane KV pages is not supported (page bounds are "
                 "kept for the f16/bf16 pages)"};
  int32_t max_pages = 0;
  for (int32_t g = 0; g < nkv; ++g)
    if (plan.budget[size_t(g)] > 0) max_pages = std::max(max_pages, (plan.cached[size_t(g)] + ps - 1) / ps);
  const kernels::KvPages kv = cuda_kv_pages(*pool_);
  const PlanRegion region = plan_region(l, false);
  cudaEvent_t* events = nullptr;  // the selection counts as attention time, as in Quest's kernel timings
  if (capturing_) {
    max_pages = (graph_bound_ + ps - 1) / ps;  // the grid the graph was captured with
    CUDA_TRY(kc::page_bounds_update(kv, page_bounds_.as(), region.stale_pages, region.stale_counts, nkv, stream_),
             "page bounds");
  } else {
    if (auto s = ensure_page_bounds(); !s) return s;
    if (auto s = stage_key_plan(l, plan); !s) return s;
    std::vector<int32_t> pages, counts;
    std::vector<PageBoundSync> covered(static_cast<size_t>(nkv));  // recorded once the kernels are launched
    for (int32_t g = 0; g < nkv; ++g)
      if (plan.budget[size_t(g)] > 0)
        covered[size_t(g)] = stale_bound_pages(seq, l, g, plan.cached[size_t(g)],
                                               bound_sync_[size_t(l) * size_t(nkv) + size_t(g)], pages, counts);
    const int32_t stale = int32_t(pages.size());
    pages.insert(pages.end(), counts.begin(), counts.end());
    const size_t score_bytes = bound_scratch_bytes(max_pages, plan.by_bound_per_head);
    if (score_bytes > bound_scores_.bytes()) drop_graphs();  // they hold the scores' address
    if (!bound_work_.reserve(pages.size() * 4) || !bound_scores_.reserve(score_bytes))
      return Error{"cuda engine: out of GPU memory for page selection"};
    if (!pages.empty()) {
      CUDA_TRY(cudaMemcpyAsync(bound_work_.as(), pages.data(), pages.size() * 4, cudaMemcpyHostToDevice, stream_),
               "upload page bounds work");
      CUDA_TRY(cudaStreamSynchronize(stream_), "upload page bounds work");  // `pages` is pageable and ours
    }
    if (auto s = next_event_pair(events); !s) return s;
    if (events != nullptr) CUDA_TRY(cudaEventRecord(events[0], stream_), "attention timing");
    CUDA_TRY(kc::page_bounds_update(kv, page_bounds_.as(), bound_work_.as<int32_t>(),
                                    bound_work_.as<int32_t>() + stale, stale, stream_),
             "page bounds");
    for (int32_t g = 0; g < nkv; ++g)
      if (plan.budget[size_t(g)] > 0) bound_sync_[size_t(l) * size_t(nkv) + size_t(g)] = covered[size_t(g)];
  }
  const auto call = select_call(l, region, max_pages, plan.by_bound_per_head);
  CUDA_TRY(kc::page_select(call, max_pages, stream_), "page selection");
  if (events != nullptr) CUDA_TRY(cudaEventRecord(events[1], stream_), "attention timing");
  return ok_status();
}

Status CudaBackend::attention(const KvSequence& seq, const LayerAttention& work) {
  const ModelConfig& c = config_;
  const int32_t l = work.layer;
  kernels::AttentionCall call = base_call(seq.pool(), l, n_);
  int32_t max_keys = 0;
  for (int32_t cached : work.keys->cached) max_keys = std::max(max_keys, cached);
  max_keys += int32_t(n_);
  if (capturing_) max_keys = graph_bound_;
  if (work.predicted_heads) {  // the predictors' head flags, on the device
    if (pred_last_layer_ == l) {
      if (auto s = wait_predicted(pred_heads_ready_, pred_heads_pending_); !s) return s;
    } else if (auto s = join_predictions(); !s) {
      return s;
    }
    call.head_active = pred_head_flags_.as<uint8_t>() + int64_t(l) * c.n_heads;
  } else if (work.mask != nullptr) {
    CUDA_TRY(cudaMemcpyAsync(head_active_.as(), work.mask->heads.data(), size_t(c.n_heads), cudaMemcpyHostToDevice,
                             stream_),
             "upload head mask");
    CUDA_TRY(cudaStreamSynchronize(stream_), "upload head mask");
    call.head_active = head_active_.as<uint8_t>();
  }
  if (work.keys->any_selected()) {
    // Heads selected by bound were staged (and filled) by select_by_bound.
    if (!capturing_ && !work.keys->any_by_bound())
      if (auto s = stage_key_plan(l, *work.keys); !s) return s;
    const PlanRegion region = plan_region(l, false);
    call.select = region.modes;
    call.select_indptr = region.indptr;
    call.select_index = region.indices;
    if (!work.keys->heads.empty()) call.select_heads = region.heads;  // each query head its own keys
  }
  if (work.sparse != nullptr && work.sparse->active()) {
    if (!work.sparse->device) return Error{"cuda engine: a sparse prefill plan must be built by plan_sparse_prefill"};
    call.sparse = sparse_layout_;
  }
  if (work.statistics) {
    CUDA_TRY(cudaMemsetAsync(key_mass_.as(), 0, size_t(c.n_kv_heads) * size_t(max_context_) * 4, stream_), "stats");
    call.key_mass = key_mass_.as<float>();
    call.mass_stride = max_context_;
  }
  const bool values = work.values != nullptr && work.values->active();
  if (call.kv.planes.active() || values) {
    // Their counters come back to the host and, as the CPU backend's, leave
    // out the heads attention did not compute; predicted heads are flagged
    // on the device only, so their flags come back as the mask.
    LayerAttention counted = work;
    ComponentMask predicted;
    if (work.predicted_heads && (work.values_skipped != nullptr || work.requant_tally != nullptr)) {
      predicted.heads.resize(size_t(c.n_heads));
      if (auto s = download(call.head_active, predicted.heads.size(), predicted.heads.data()); !s) return s;
      counted.mask = &predicted;
    }
    if (call.kv.planes.active()) return attention_bit_planes(counted, call, max_keys);
    return attention_values_pruned(counted, call, max_keys);
  }
  const size_t ws = kc::attention_workspace_bytes(call, max_keys);
  if (ws > attention_ws_.bytes()) {
    if (capturing_) return Error{"cuda engine: the attention workspace was not staged for this graph"};
    drop_graphs();  // they hold the workspace's old address
    if (!attention_ws_.reserve(ws)) return Error{"cuda engine: out of GPU memory for the attention workspace"};
  }
  cudaEvent_t* events = nullptr;
  if (auto s = next_event_pair(events); !s) return s;
  if (events != nullptr) CUDA_TRY(cudaEventRecord(events[0], stream_), "attention timing");
  CUDA_TRY(kc::attention(call, max_keys, attention_ws_.as(), attention_ws_.bytes(), stream_), "attention");
  if (events != nullptr) CUDA_TRY(cudaEventRecord(events[1], stream_), "attention timing");
  return ok_status();
}

// Local value pruning (kc::attention_value_topk): every key scored, P·V over
// each row's most probable. For the traffic counters, the last row's kept
// keys come back and each kv head counts the cached keys none of its query
// heads accumulated (their V rows were not read).
Status CudaBackend::attention_values_pruned(const LayerAttention& work, const kernels::AttentionCall& call,
                                            int32_t max_keys) {
  const ModelConfig& c = config_;
  if (call.sparse.heads != nullptr) return Error{"cuda engine: local value pruning with a sparse prefill plan"};
  const size_t scratch = row_scratch_bytes(call, max_keys), kept_bytes = size_t(c.n_heads) * size_t(max_keys);
  if (!value_work_.reserve(scratch + kept_bytes)) return Error{"cuda engine: out of GPU memory for value pruning"};
  uint8_t* kept = work.values_skipped != nullptr ? value_work_.as<uint8_t>() + scratch : nullptr;
  cudaEvent_t* events = nullptr;
  if (auto s = next_event_pair(events); !s) return s;
  if (events != nullptr) CUDA_TRY(cudaEventRecord(events[0], stream_), "attention timing");
  CUDA_TRY(kc::attention_value_topk(call, max_keys, work.values->keep, work.values->renormalize, kept,
                                    value_work_.as(), scratch, stream_),
           "attention (value pruning)");
  if (events != nullptr) CUDA_TRY(cudaEventRecord(events[1], stream_), "attention timing");
  if (kept == nullptr) return ok_status();
  std::vector<uint8_t> host(kept_bytes);
  if (auto s = download(kept, kept_bytes, host.data()); !s) return s;
  *work.values_skipped = values_skipped(work, host, max_keys);
  return ok_status();
}

// As the CPU backend counts: per kv head, the cached keys that a computed
// query head of the group read and none accumulated. A masked head reads
// nothing (the kernel leaves its kept row unwritten), so a group masked whole
// adds 0; under per-query-head selections a key counts only when a computed
// head selected it.
int64_t CudaBackend::values_skipped(const LayerAttention& work, const std::vector<uint8_t>& kept,
                                    int32_t max_keys) const {
  const ModelConfig& c = config_;
  const KeyPlan& plan = *work.keys;
  const int32_t gs = c.group_size(), ps = options_.page_size;
  int64_t skipped = 0;
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    std::vector<int32_t> computed;  // the group's computed query heads, by index in the group
    for (int32_t j = 0; j < gs; ++j)
      if (work.mask == nullptr || work.mask->heads[size_t(g * gs + j)] != 0) computed.push_back(j);
    if (computed.empty()) continue;
    // Per-query-head selections: a mask of reading heads per listed page or
    // token, the list (as the kernels walk it) starting after the unused slots.
    const kernels::KeySelect mode = plan.mode[size_t(g)];
    const bool per_head = !plan.heads.empty() && mode != kernels::KeySelect::All;
    const std::span<const int32_t> listed = plan.head(g);
    const size_t first = size_t(plan.indptr[size_t(g)]) +
                         size_t(std::count_if(listed.begin(), listed.end(), [](int32_t x) { return x < 0; }));
    const int64_t cached = head_traffic(plan, g, ps).keys;  // the kv head's key list starts with them
    for (int64_t k = 0; k < cached && k < max_keys; ++k) {
      const uint32_t readers =
          per_head ? plan.heads[first + size_t(mode == kernels::KeySelect::Tokens ? k : k / ps)] : ~0u;
      bool read = false, accumulated = false;
      for (int32_t j : computed) {
        read = read || !per_head || ((readers >> j) & 1u) != 0;  // per-head groups hold at most 32 heads
        accumulated = accumulated || kept[size_t(int64_t(g * gs + j) * max_keys + k)] != 0;
      }
      skipped += read && !accumulated ? 1 : 0;
    }
  }
  return skipped;
}

// Bit-plane pages (a method's progressive quantization): every row through
// kc::attention_progressive, from the MSB planes first when the step asks for
// it (work.requant) and with the method's value pruning, if any. The per-row
// refetch counts come back to fill the tally as the CPU backend does: per kv
// head and row, the LSB planes of the cached keys (and kept values) the most
// reading of its refetching query heads read.
Status CudaBackend::attention_bit_planes(const LayerAttention& work, const kernels::AttentionCall& call,
                                         int32_t max_keys) {
  const ModelConfig& c = config_;
  if (call.sparse.heads != nullptr) return Error{"cuda engine: bit-plane KV pages with a sparse prefill plan"};
  if (capturing_) return Error{"cuda engine: attention over bit-plane KV pages reads its refetches back; not captured"};
  const bool values = work.values != nullptr && work.values->active();
  const bool msb_first = work.requant != nullptr;
  const size_t scratch = row_scratch_bytes(call, max_keys);
  const size_t counts_bytes = work.requant_tally != nullptr ? size_t(c.n_heads) * size_t(n_) * 3 * 4 : 0;
  const size_t kept_bytes = values && work.values_skipped != nullptr ? size_t(c.n_heads) * size_t(max_keys) : 0;
  if (!value_work_.reserve(scratch + counts_bytes + kept_bytes))
    return Error{"cuda engine: out of GPU memory for attention over bit-plane pages"};
  int32_t* counts = counts_bytes > 0 ? reinterpret_cast<int32_t*>(value_work_.as<uint8_t>() + scratch) : nullptr;
  uint8_t* kept = kept_bytes > 0 ? value_work_.as<uint8_t>() + scratch + counts_bytes : nullptr;
  cudaEvent_t* events = nullptr;
  if (auto s = next_event_pair(events); !s) return s;
  if (events != nullptr) CUDA_TRY(cudaEventRecord(events[0], stream_), "attention timing");
  CUDA_TRY(kc::attention_progressive(call, max_keys, msb_first,
                                     msb_first ? float(work.requant->requant_threshold) : 0.0f,
                                     values ? work.values->keep : 1.0, values && work.values->renormalize, kept,
                                     counts, value_work_.as(), scratch, stream_),
           "attention (bit-plane pages)");
  if (events != nullptr) CUDA_TRY(cudaEventRecord(events[1], stream_), "attention timing");
  if (counts != nullptr) {
    const int64_t n = n_;
    std::vector<int32_t> host(counts_bytes / 4);  // (n_heads, n, 3): refetched, cached keys, kept cached values
    if (auto s = download(counts, counts_bytes, host.data()); !s) return s;
    const size_t vectors = size_t(c.n_heads) * size_t(n);
    std::vector<uint8_t> computed(static_cast<size_t>(c.n_heads)), refetched(vectors);
    std::vector<int64_t> keys(vectors), values(vectors);
    for (int32_t h = 0; h < c.n_heads; ++h) computed[size_t(h)] = work.mask == nullptr || work.mask->heads[size_t(h)] != 0;
    for (size_t v = 0; v < vectors; ++v) {
      refetched[v] = uint8_t(host[3 * v]);
      keys[v] = host[3 * v + 1];
      values[v] = host[3 * v + 2];
    }
    work.requant_tally->add(c.group_size(), n, computed, refetched, keys, values);
  }
  if (kept == nullptr) return ok_status();
  std::vector<uint8_t> host(kept_bytes);
  if (auto s = download(kept, kept_bytes, host.data()); !s) return s;
  *work.values_skipped = values_skipped(work, host, max_keys);
  return ok_status();
}

Status CudaBackend::read_statistics(const KvSequence& seq, int32_t l, LayerStatistics& out) {
  const ModelConfig& c = config_;
  float* norms = head_norms_.as<float>();  // (2, n_heads): L2 then L1
  CUDA_TRY(kc::head_output_norms(sequence_rows(attn_, c.q_dim()), int32_t(n_), c.n_heads, c.head_dim, norms,
                                 norms + c.n_heads, stream_),
           "head norms");
  out.head_norms.resize(size_t(c.n_heads));
  out.head_l1.resize(size_t(c.n_heads));
  if (auto s = download(norms, out.head_norms.size() * 4, out.head_norms.data()); !s) return s;
  if (auto s = download(norms + c.n_heads, out.head_l1.size() * 4, out.head_l1.data()); !s) return s;
  out.key_mass.resize(size_t(c.n_kv_heads));
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    auto& mass = out.key_mass[size_t(g)];
    mass.resize(size_t(seq.table(l, g).n_tokens()));
    if (auto s = download(key_mass_.as<float>() + int64_t(g) * max_context_, mass.size() * 4, mass.data()); !s)
      return s;
  }
  return ok_status();
}

}  // namespace inferlab
