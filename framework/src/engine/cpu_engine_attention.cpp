// The attention half of a layer, with the method hooks that shape it: decode
// selection (which cached keys are read), block-sparse prefill, head masks,
// attention statistics and eviction. The engine carries out every decision;
// the method only makes it.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>

#include "cpu/cpu_ops.h"
#include "cpu/cpu_twins.h"
#include "engine/cpu_engine.h"

namespace inferlab {

namespace cpu = kernels::cpu;

namespace {

constexpr int64_t kQueryChunkRows = 16;  // attention work item: (head, 16 query rows)

class SequenceKvView final : public KvView {
 public:
  explicit SequenceKvView(const KvSequence& seq) : seq_(seq) {}
  int32_t page_size() const override { return seq_.pool().shape().page_size; }
  int32_t n_tokens(int32_t layer, int32_t kv_head) const override { return seq_.table(layer, kv_head).n_tokens(); }
  std::span<const int32_t> positions(int32_t layer, int32_t kv_head) const override {
    return seq_.table(layer, kv_head).positions;
  }
  const float* key(int32_t layer, int32_t kv_head, int32_t token) const override {
    return seq_.k_row(layer, kv_head, token);
  }
  const float* value(int32_t layer, int32_t kv_head, int32_t token) const override {
    return seq_.v_row(layer, kv_head, token);
  }

 private:
  const KvSequence& seq_;
};

struct KeyRange {
  int32_t start = 0;  // stored-token index
  int32_t len = 0;
};

// Splits stored-token ranges of one (layer, kv head) into page references.
void ranges_to_refs(const KvSequence& seq, int32_t layer, int32_t kv_head, const std::vector<KeyRange>& ranges,
                    std::vector<cpu::KvPageRef>& refs, std::vector<int32_t>& ref_start) {
  const HeadPageTable& t = seq.table(layer, kv_head);
  const int32_t ps = seq.pool().shape().page_size;
  const int64_t hd = seq.pool().shape().head_dim;
  for (const KeyRange& r : ranges)
    for (int32_t i = r.start; i < r.start + r.len;) {
      const int32_t page = t.pages[size_t(i / ps)], off = i % ps;
      const int32_t count = std::min(ps - off, r.start + r.len - i);
      refs.push_back({seq.pool().k(page) + off * hd, seq.pool().v(page) + off * hd, count});
      ref_start.push_back(i);
      i += count;
    }
}

// Validates a method's selection and turns it into ascending stored-token ranges.
Result<std::vector<KeyRange>> selection_ranges(const KvSelection& sel, int32_t cached, int32_t page_size,
                                               int32_t layer, int32_t kv_head) {
  if (auto s = check_kv_selection(sel, cached, page_size, layer, kv_head); !s) return s.error();
  const bool pages = sel.unit == KvSelection::Unit::Pages;
  std::vector<KeyRange> ranges;
  for (const int32_t x : sel.indices) {
    const int32_t start = pages ? x * page_size : x;
    const int32_t len = pages ? std::min(page_size, cached - start) : 1;
    if (!ranges.empty() && ranges.back().start + ranges.back().len == start)
      ranges.back().len += len;
    else
      ranges.push_back({start, len});
  }
  return ranges;
}

int64_t pages_touched(const std::vector<KeyRange>& ranges, int32_t page_size) {
  int64_t count = 0, last = -1;
  for (const KeyRange& r : ranges) {
    if (r.len == 0) continue;
    const int64_t first = r.start / page_size, end = (r.start + r.len - 1) / page_size;
    count += end - std::max<int64_t>(first, last + 1) + 1;
    last = end;
  }
  return count;
}

}  // namespace

struct CpuEngine::LayerCall {
  int32_t layer = 0;
  int64_t n = 0;  // new tokens
  const KvSequence* seq = nullptr;
  const ComponentMask* mask = nullptr;
  // Per kv head: the keys this call reads (cached selection, then the new tokens).
  std::vector<std::vector<cpu::KvPageRef>> refs;
  std::vector<std::vector<int32_t>> ref_start;  // stored index of each ref's first key
  std::vector<int32_t> old_visible;             // cached keys in refs, before the new tokens
  std::vector<int32_t> cached_before;           // stored tokens before this call's append
  std::vector<uint8_t> selected;
  // Per query head.
  std::vector<std::optional<BlockPattern>> patterns;
  std::vector<std::vector<float>> head_mass;  // attention mass per stored token (statistics only)
};

Status CpuEngine::attention_layer(KvSequence& seq, const StepInfo& step, int32_t layer, const ComponentMask* mask) {
  const ModelConfig& c = config();
  LayerCall call;
  call.layer = layer;
  call.n = step.n_tokens;
  call.seq = &seq;
  call.mask = mask;
  if (auto s = gather_keys(seq, step, call); !s) return s;
  if (auto s = collect_prefill_patterns(step, call); !s) return s;

  const int64_t n = call.n;
  if ((hooks_ & kHookAttentionFeedback) != 0) {
    call.head_mass.resize(size_t(c.n_heads));
    for (int32_t h = 0; h < c.n_heads; ++h)
      call.head_mass[size_t(h)].assign(size_t(call.cached_before[size_t(h / c.group_size())] + n), 0.0f);
    // One work item per head, so each head's statistics have a single writer.
#pragma omp parallel for schedule(dynamic)
    for (int32_t h = 0; h < c.n_heads; ++h) attend_head(call, h, 0, n, call.head_mass[size_t(h)].data());
  } else {
    const int64_t n_chunks = (n + kQueryChunkRows - 1) / kQueryChunkRows;
    const int64_t work = int64_t(c.n_heads) * n_chunks;
#pragma omp parallel for schedule(dynamic) if (work > 1)
    for (int64_t item = 0; item < work; ++item) {
      const int64_t i0 = (item % n_chunks) * kQueryChunkRows;
      attend_head(call, int32_t(item / n_chunks), i0, std::min(n, i0 + kQueryChunkRows), nullptr);
    }
  }
  if (mask != nullptr)
    counters_.heads_skipped += std::count(mask->heads.begin(), mask->heads.end(), uint8_t{0});
  return feedback_and_evict(seq, step, call);
}

Status CpuEngine::gather_keys(KvSequence& seq, const StepInfo& step, LayerCall& call) {
  const ModelConfig& c = config();
  const int64_t hd = c.head_dim, n = call.n;
  const int32_t ps = seq.pool().shape().page_size, l = call.layer;
  const SequenceKvView view(seq);
  call.refs.resize(size_t(c.n_kv_heads));
  call.ref_start.resize(size_t(c.n_kv_heads));
  call.old_visible.assign(size_t(c.n_kv_heads), 0);
  call.cached_before.assign(size_t(c.n_kv_heads), 0);
  call.selected.assign(size_t(c.n_kv_heads), 0);
  const std::vector<int32_t> budgets = page_budgets(step, view, seq, l);
  std::vector<KvSelection> by_bound;
  if (std::any_of(budgets.begin(), budgets.end(), [](int32_t b) { return b > 0; }))
    by_bound = select_by_bound(seq, step, l, budgets);
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    const int32_t cached = seq.table(l, g).n_tokens();
    std::vector<KeyRange> ranges;
    KvSelection selection;
    const float* queries = &q_[size_t((n - 1) * c.q_dim() + int64_t(g) * c.group_size() * hd)];
    const int32_t budget = budgets[size_t(g)];
    if (budget > 0) selection = std::move(by_bound[size_t(g)]);
    if (budget > 0 ||
        (budget < 0 && (hooks_ & kHookDecodeSelection) != 0 &&
         method_->select_kv(step, view, l, g, std::span<const float>(queries, size_t(c.group_size() * hd)),
                            selection))) {
      auto selected = selection_ranges(selection, cached, ps, l, g);
      if (!selected) return selected.error();
      ranges = std::move(*selected);
      call.selected[size_t(g)] = 1;
    } else if (cached > 0) {
      ranges.push_back({0, cached});
    }
    int32_t old = 0;
    for (const KeyRange& r : ranges) old += r.len;
    if (step.decode()) {
      counters_.decode_keys_read += old;
      counters_.decode_keys_cached += cached;
      counters_.decode_pages_read += pages_touched(ranges, ps);
    }
    for (int64_t i = 0; i < n; ++i)
      seq.append(l, g, &k_[size_t(i * c.kv_dim() + g * hd)], &v_[size_t(i * c.kv_dim() + g * hd)],
                 positions_[size_t(i)], rotary_position(g, i));
    ranges.push_back({cached, int32_t(n)});
    ranges_to_refs(seq, l, g, ranges, call.refs[size_t(g)], call.ref_start[size_t(g)]);
    call.old_visible[size_t(g)] = old;
    call.cached_before[size_t(g)] = cached;
  }
  return ok_status();
}

// For the kv heads with a page budget, the pages the bounds select: bounds of
// stale pages are refreshed first (cpu::page_bounds_update), then every such
// head is scored at once.
std::vector<KvSelection> CpuEngine::select_by_bound(KvSequence& seq, const StepInfo& step, int32_t l,
                                                    const std::vector<int32_t>& budgets) {
  const ModelConfig& c = config();
  const int32_t ps = seq.pool().shape().page_size;
  std::vector<KvSelection> out(static_cast<size_t>(c.n_kv_heads));
  std::vector<int32_t> cached(static_cast<size_t>(c.n_kv_heads)), offsets(static_cast<size_t>(c.n_kv_heads));
  std::vector<int32_t> stale_pages, stale_counts;
  std::vector<PageBoundSync> covered(static_cast<size_t>(c.n_kv_heads));
  int32_t total = 0, max_pages = 0;
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    cached[size_t(g)] = seq.table(l, g).n_tokens();
    if (budgets[size_t(g)] <= 0) continue;
    covered[size_t(g)] = stale_bound_pages(seq, l, g, cached[size_t(g)],
                                           bound_sync_[size_t(l) * size_t(c.n_kv_heads) + size_t(g)], stale_pages,
                                           stale_counts);
    offsets[size_t(g)] = total;
    total += budgets[size_t(g)];
    max_pages = std::max(max_pages, (cached[size_t(g)] + ps - 1) / ps);
  }
  const kernels::KvPages kv{seq.pool().chunks().data(), seq.pool().pages_per_chunk(), ps, int32_t(c.head_dim),
                            kernels::DType::F32};
  page_bounds_.resize(size_t(seq.pool().pages_reserved()) * 2 * size_t(c.head_dim));
  cpu::page_bounds_update(kv, page_bounds_.data(), stale_pages.data(), stale_counts.data(),
                          int32_t(stale_pages.size()));
  for (int32_t g = 0; g < c.n_kv_heads; ++g)
    if (budgets[size_t(g)] > 0) bound_sync_[size_t(l) * size_t(c.n_kv_heads) + size_t(g)] = covered[size_t(g)];
  std::vector<int32_t> table, selected(static_cast<size_t>(total));
  const int32_t stride = max_pages;
  table.assign(size_t(c.n_kv_heads) * size_t(stride), 0);
  for (int32_t g = 0; g < c.n_kv_heads; ++g)
    if (budgets[size_t(g)] > 0) {
      const auto& pages = seq.table(l, g).pages;
      std::copy(pages.begin(), pages.end(), table.begin() + int64_t(g) * stride);
    }
  bound_scores_.resize(size_t(c.n_kv_heads) * size_t(stride));
  kernels::PageSelectCall call;
  call.n_kv_heads = c.n_kv_heads;
  call.group_size = c.group_size();
  call.head_dim = int32_t(c.head_dim);
  call.page_size = ps;
  call.dtype = kernels::DType::F32;
  call.bounds = page_bounds_.data();
  call.table = {table.data(), stride};
  call.q = &q_[size_t((step.n_tokens - 1) * c.q_dim())];
  std::vector<int32_t> keep(budgets);
  for (int32_t& k : keep) k = std::max(k, 0);
  call.n_cached = cached.data();
  call.keep = keep.data();
  call.out_offset = offsets.data();
  call.out = selected.data();
  call.scores = bound_scores_.data();
  call.score_stride = stride;
  cpu::page_select(call);
  for (int32_t g = 0; g < c.n_kv_heads; ++g)
    if (budgets[size_t(g)] > 0) {
      out[size_t(g)].unit = KvSelection::Unit::Pages;
      out[size_t(g)].indices.assign(selected.begin() + offsets[size_t(g)],
                                    selected.begin() + offsets[size_t(g)] + budgets[size_t(g)]);
    }
  return out;
}

Status CpuEngine::collect_prefill_patterns(const StepInfo& step, LayerCall& call) {
  const ModelConfig& c = config();
  call.patterns.resize(size_t(c.n_heads));
  if ((hooks_ & kHookPrefillPattern) == 0 || step.decode()) return ok_status();
  for (int32_t h = 0; h < c.n_heads; ++h) {
    BlockPattern pattern;
    if (!method_->prefill_pattern(step, call.layer, h, pattern)) continue;
    if (auto s = normalize_block_pattern(pattern, call.layer, h, call.selected[size_t(h / c.group_size())] != 0); !s)
      return s;
    call.patterns[size_t(h)] = std::move(pattern);
    ++counters_.sparse_prefill_heads;
  }
  return ok_status();
}

// Attention of query rows [r0, r1) of head h. With key_mass (per stored token),
// adds each key's softmax probability to it.
void CpuEngine::attend_head(const LayerCall& call, int32_t h, int64_t r0, int64_t r1, float* key_mass) {
  const ModelConfig& c = config();
  const int64_t hd = c.head_dim;
  const int32_t g = h / c.group_size();
  const float scale = 1.0f / std::sqrt(float(hd));
  float* out = &attn_[size_t(r0 * c.q_dim() + h * hd)];
  const float* q = &q_[size_t(r0 * c.q_dim() + h * hd)];
  if (call.mask != nullptr && call.mask->heads[size_t(h)] == 0) {
    for (int64_t i = r0; i < r1; ++i) std::fill_n(&attn_[size_t(i * c.q_dim() + h * hd)], hd, 0.0f);
    return;
  }
  std::vector<float> concat_mass;
  auto scatter = [&](const std::vector<cpu::KvPageRef>& refs, const std::vector<int32_t>& starts) {
    for (size_t r = 0, at = 0; r < refs.size(); at += size_t(refs[r].n_tokens), ++r)
      for (int32_t t = 0; t < refs[r].n_tokens; ++t) key_mass[starts[r] + t] += concat_mass[at + size_t(t)];
  };
  const auto& pattern = call.patterns[size_t(h)];
  if (!pattern) {
    const auto& refs = call.refs[size_t(g)];
    if (key_mass != nullptr) concat_mass.assign(size_t(call.old_visible[size_t(g)] + call.n), 0.0f);
    for (int64_t i0 = r0; i0 < r1; i0 += kQueryChunkRows) {
      const int64_t rows = std::min(kQueryChunkRows, r1 - i0);
      int32_t visible[kQueryChunkRows];
      for (int64_t r = 0; r < rows; ++r) visible[r] = call.old_visible[size_t(g)] + int32_t(i0 + r) + 1;
      cpu::attention_paged(q + (i0 - r0) * c.q_dim(), rows, c.q_dim(), refs.data(), int64_t(refs.size()), visible,
                           hd, scale, out + (i0 - r0) * c.q_dim(), c.q_dim(),
                           key_mass != nullptr ? concat_mass.data() : nullptr);
    }
    if (key_mass != nullptr) scatter(refs, call.ref_start[size_t(g)]);
    return;
  }
  // Block-sparse: each row reads the allowed key blocks of its query block.
  const int32_t bs = pattern->block_size;
  std::vector<KeyRange> ranges;
  std::vector<cpu::KvPageRef> refs;
  std::vector<int32_t> starts;
  for (int64_t i = r0; i < r1; ++i) {
    const int32_t self = call.cached_before[size_t(g)] + int32_t(i);
    ranges.clear();
    for (const auto& [qb, kb] : pattern->blocks)
      if (qb == self / bs) ranges.push_back({kb * bs, std::min(kb * bs + bs, self + 1) - kb * bs});
    refs.clear();
    starts.clear();
    ranges_to_refs(*call.seq, call.layer, g, ranges, refs, starts);
    int32_t total = 0;
    for (const auto& r : refs) total += r.n_tokens;
    float* row_out = out + (i - r0) * c.q_dim();
    if (total == 0) {
      std::fill_n(row_out, hd, 0.0f);
      continue;
    }
    if (key_mass != nullptr) concat_mass.assign(size_t(total), 0.0f);
    cpu::attention_paged(q + (i - r0) * c.q_dim(), 1, c.q_dim(), refs.data(), int64_t(refs.size()), &total, hd,
                         scale, row_out, c.q_dim(), key_mass != nullptr ? concat_mass.data() : nullptr);
    if (key_mass != nullptr) scatter(refs, starts);
  }
}

Status CpuEngine::feedback_and_evict(KvSequence& seq, const StepInfo& step, LayerCall& call) {
  const ModelConfig& c = config();
  const SequenceKvView view(seq);
  const int32_t gs = c.group_size();
  if ((hooks_ & kHookAttentionFeedback) != 0) {
    std::vector<float> mass, norms(static_cast<size_t>(gs));
    for (int32_t g = 0; g < c.n_kv_heads; ++g) {
      mass.assign(call.head_mass[size_t(g * gs)].size(), 0.0f);
      for (int32_t j = 0; j < gs; ++j) {
        const int32_t h = g * gs + j;
        const auto& hm = call.head_mass[size_t(h)];
        for (size_t t = 0; t < mass.size(); ++t) mass[t] += hm[t];
        double norm = 0;
        for (int64_t i = 0; i < call.n; ++i) {
          const float* o = &attn_[size_t(i * c.q_dim() + int64_t(h) * c.head_dim)];
          double ss = 0;
          for (int64_t d = 0; d < c.head_dim; ++d) ss += double(o[d]) * o[d];
          norm += std::sqrt(ss);
        }
        norms[size_t(j)] = float(norm);
      }
      method_->on_attention(step, view, AttentionStats{call.layer, g, mass, norms});
    }
  }
  if ((hooks_ & kHookEviction) == 0) return ok_status();
  std::vector<int32_t> drop;
  for (int32_t g = 0; g < c.n_kv_heads; ++g) {
    drop.clear();
    method_->evict(step, view, call.layer, g, drop);
    if (drop.empty()) continue;
    auto dropped = seq.evict(call.layer, g, std::move(drop));
    if (!dropped) return Error{"method: " + dropped.message()};
    counters_.tokens_evicted += *dropped;
    if (cache_positions_) rerotate_keys(seq, call.layer, g);
    drop = {};
  }
  return ok_status();
}

}  // namespace inferlab
