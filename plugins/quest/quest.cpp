// Quest (Tang et al., "Quest: Query-Aware Sparsity for Efficient Long-Context
// LLM Inference", ICML 2024): per page of `page_size` tokens, the per-channel
// minimum and maximum of the keys; at each decode step and head, a page's
// score is the upper bound sum_i max(q_i * min_i, q_i * max_i) of its attention
// logits, and only the top token_budget / page_size pages (always including the
// last page, and at least `min_pages`: the reference implementation reads at
// least 3) are read. The first `dense_layers` layers and prefill stay dense;
// nothing is evicted. With grouped-query attention (`gqa`), either a KV head's
// page score is the sum of the bounds of its query heads ("sum"), or each query
// head selects its own pages by its own bound and attends only to them, the KV
// head reading their union ("per_head", the reference evaluation's semantics:
// its models are multi-head, where a head is a KV head).
//
// When `page_size` equals the KV cache's page size, the engine keeps the bounds
// and selects the pages (kHookPageBudget: on CUDA, in device kernels); the
// plugin only says how many. Otherwise the plugin keeps its own bounds over its
// pages and selects their tokens through select_kv, on the host.
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>

#include "inferlab/plugin_export.h"

namespace {

using namespace inferlab;

// Per-channel key bounds of every page of one (layer, kv head), updated as tokens arrive.
struct PageBounds {
  int32_t summarized = 0;   // tokens folded into the bounds so far
  std::vector<float> mins;  // (pages, head_dim)
  std::vector<float> maxs;
};

// The bounds of one sequence's pages (own page size only): per (layer, kv head).
struct QuestState final : SequenceState {
  std::vector<PageBounds> bounds;
  std::unique_ptr<SequenceState> clone() const override { return std::make_unique<QuestState>(*this); }
};

class Quest final : public Method {
 public:
  Quest(int32_t budget, int32_t page_size, int32_t dense_layers, int32_t min_pages, bool per_head)
      : budget_(budget), page_size_(page_size), dense_layers_(dense_layers), min_pages_(min_pages), per_head_(per_head) {}

  bool dense_prefill() const override { return true; }
  BoundScope bound_scope() const override { return per_head_ ? BoundScope::QueryHead : BoundScope::KvHead; }

  void begin_sequence(const ModelShape& shape) override { shape_ = shape; }

  std::unique_ptr<SequenceState> new_sequence_state(const ModelShape& shape) override {
    shape_ = shape;
    auto state = std::make_unique<QuestState>();
    state->bounds.assign(size_t(shape.n_layers) * size_t(shape.n_kv_heads), {});
    return state;
  }

  int32_t page_budget(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head) override {
    if (page_size_ != kv.page_size()) return -1;  // select_kv over this plugin's own pages
    if (!step.decode() || layer < dense_layers_) return 0;
    const int32_t n_pages = (kv.n_tokens(layer, kv_head) + page_size_ - 1) / page_size_;
    count_step(n_pages);
    return n_pages <= keep() ? 0 : keep();
  }

  bool select_kv(const StepInfo& step, const KvView& kv, int32_t layer, int32_t kv_head, std::span<const float> q,
                 KvSelection& selection) override {
    if (!step.decode() || layer < dense_layers_ || page_size_ == kv.page_size()) return false;
    const int32_t n = kv.n_tokens(layer, kv_head);
    const int32_t n_pages = (n + page_size_ - 1) / page_size_;
    PageBounds& b = static_cast<QuestState*>(step.state)->bounds[size_t(layer) * size_t(shape_.n_kv_heads) + size_t(kv_head)];
    update_bounds(kv, layer, kv_head, n, b);
    count_step(n_pages);
    if (n_pages <= keep()) return false;  // the budget covers everything: dense
    selection.unit = KvSelection::Unit::Tokens;
    if (!per_head_) {
      for (int32_t p : top_pages(b, q, n_pages, keep()))
        for (int32_t t = p * page_size_; t < std::min(n, (p + 1) * page_size_); ++t) selection.indices.push_back(t);
      return true;
    }
    // Each query head's own pages; the KV head reads their union.
    const size_t hd = size_t(shape_.head_dim);
    std::vector<uint32_t> heads(size_t(n_pages), 0u);
    for (size_t h = 0; h < q.size() / hd; ++h)
      for (int32_t p : top_pages(b, q.subspan(h * hd, hd), n_pages, keep())) heads[size_t(p)] |= 1u << h;
    for (int32_t p = 0; p < n_pages; ++p) {
      if (heads[size_t(p)] == 0) continue;
      for (int32_t t = p * page_size_; t < std::min(n, (p + 1) * page_size_); ++t) {
        selection.indices.push_back(t);
        selection.heads.push_back(heads[size_t(p)]);
      }
    }
    return true;
  }

  std::map<std::string, double> counters() const override {
    return {{"decode_selections", steps_},
            {"pages_selected", pages_selected_},
            {"pages_available", pages_total_},
            {"selected_fraction", pages_total_ > 0 ? pages_selected_ / pages_total_ : 1.0}};
  }

 private:
  // The last page is always read, so min_pages 0 and 1 are the same floor.
  int32_t keep() const { return std::max({1, min_pages_, budget_ / page_size_}); }

  void count_step(int32_t n_pages) {
    ++steps_;
    pages_total_ += n_pages;
    pages_selected_ += std::min(n_pages, keep());
  }

  void update_bounds(const KvView& kv, int32_t layer, int32_t kv_head, int32_t n, PageBounds& b) const {
    const int32_t hd = shape_.head_dim;
    const size_t needed = size_t((n + page_size_ - 1) / page_size_) * size_t(hd);
    b.mins.resize(needed, std::numeric_limits<float>::infinity());
    b.maxs.resize(needed, -std::numeric_limits<float>::infinity());
    for (; b.summarized < n; ++b.summarized) {
      const float* k = kv.key(layer, kv_head, b.summarized);
      float* lo = &b.mins[size_t(b.summarized / page_size_) * size_t(hd)];
      float* hi = &b.maxs[size_t(b.summarized / page_size_) * size_t(hd)];
      for (int32_t i = 0; i < hd; ++i) {
        lo[i] = std::min(lo[i], k[i]);
        hi[i] = std::max(hi[i], k[i]);
      }
    }
  }

  // The last page always, plus the best-scoring others up to `keep` in all.
  std::vector<int32_t> top_pages(const PageBounds& b, std::span<const float> q, int32_t n_pages,
                                 int32_t keep) const {
    const int32_t hd = shape_.head_dim, heads = int32_t(q.size()) / hd;
    std::vector<float> score(size_t(n_pages - 1), 0.0f);
    for (int32_t p = 0; p + 1 < n_pages; ++p) {
      const float* lo = &b.mins[size_t(p) * size_t(hd)];
      const float* hi = &b.maxs[size_t(p) * size_t(hd)];
      float s = 0;
      for (int32_t h = 0; h < heads; ++h)
        for (int32_t i = 0; i < hd; ++i) {
          const float qi = q[size_t(h * hd + i)];
          s += std::max(qi * lo[i], qi * hi[i]);
        }
      score[size_t(p)] = s;
    }
    std::vector<int32_t> order(size_t(n_pages - 1));
    std::iota(order.begin(), order.end(), 0);
    const int32_t others = std::min(keep - 1, n_pages - 1);
    std::partial_sort(order.begin(), order.begin() + others, order.end(), [&](int32_t a, int32_t c) {
      return score[size_t(a)] > score[size_t(c)] || (score[size_t(a)] == score[size_t(c)] && a < c);
    });
    order.resize(size_t(others));
    order.push_back(n_pages - 1);
    std::sort(order.begin(), order.end());
    return order;
  }

  int32_t budget_, page_size_, dense_layers_, min_pages_;
  bool per_head_;
  ModelShape shape_;
  double steps_ = 0, pages_selected_ = 0, pages_total_ = 0;
};

class QuestPlugin final : public Plugin {
 public:
  PluginInfo info() const override {
    return {"quest",
            "1.0.0",
            "query-aware page selection by key min/max bounds (Tang et al. 2024)",
            hooks_of<Quest>(),
            {ParamSpec::integer("token_budget", 256, 1, 1 << 24, "tokens read per decode step and head"),
             ParamSpec::integer("page_size", 16, 1, 4096, "tokens per page (best equal to the KV page size)"),
             ParamSpec::dense_layers(2),
             ParamSpec::integer("min_pages", 1, 0, 1 << 20,
                                "pages read at least per decode step and kv head, the last included (reference: 3)"),
             ParamSpec::string("gqa", "sum", {"sum", "per_head"},
                               "grouped-query models: a kv head's pages by the sum of its query heads' bounds, or "
                               "each query head's own pages (the reference's semantics), the kv head reading their union")}};
  }
  Result<std::unique_ptr<Method>> create(const ParamValues& p) const override {
    // Past the model's layer count means every layer dense; clamped so int32 cannot wrap.
    const auto dense_layers =
        int32_t(std::min<int64_t>(p.get_int("dense_layers"), std::numeric_limits<int32_t>::max()));
    return std::unique_ptr<Method>(std::make_unique<Quest>(
        int32_t(p.get_int("token_budget")), int32_t(p.get_int("page_size")), dense_layers,
        int32_t(p.get_int("min_pages")), p.get_string("gqa") == "per_head"));
  }
};

}  // namespace

INFERLAB_PLUGIN(QuestPlugin)
