// What the forward schedule decides and a backend carries out: which cached
// keys each kv head reads (KeyPlan), which keys each query head's prefill rows
// read (SparsePlan), and what a whole step will need (StepPlan). Plans are
// host data in the CSR layouts the attention kernels read (kernel_types.h),
// so a backend uploads them as they are.
#pragma once

#include <cstdint>
#include <optional>
#include <span>
#include <utility>
#include <vector>

#include "inferlab/plugin.h"
#include "kernel_types.h"

namespace inferlab {

// The cached keys (stored before this call) each kv head of one layer reads:
// KeySelect::All, or the listed logical pages or stored tokens. A head with a
// page budget lists `budget` slots (mode Pages) that the backend fills with
// the pages its key bounds select (Backend::select_by_bound). Per query head
// (by_bound_per_head) it lists group * (budget - 1) + 1 slots: the union of
// its query heads' pages, ascending after the unused slots (-1), with `heads`.
struct KeyPlan {
  std::vector<kernels::KeySelect> mode;  // (n_kv_heads)
  std::vector<int32_t> budget;           // (n_kv_heads) > 0: pages selected by key bound
  std::vector<int32_t> indptr;           // (n_kv_heads + 1) ranges of indices
  std::vector<int32_t> indices;          // ascending logical pages or stored tokens per head
  std::vector<int32_t> cached;           // (n_kv_heads) stored tokens before this call
  // Empty: every query head of a group reads its kv head's keys. Otherwise
  // one mask per index: bit j = query head g * group + j reads it.
  std::vector<uint32_t> heads;
  bool by_bound_per_head = false;        // budgets select per query head (BoundScope::QueryHead)

  bool any_selected() const;
  bool any_by_bound() const;
  std::span<const int32_t> head(int32_t g) const {
    return {indices.data() + indptr[size_t(g)], size_t(indptr[size_t(g) + 1] - indptr[size_t(g)])};
  }
};

// Keys and pages a kv head reads under its plan: one definition for every
// backend and for graph replays, so the traffic counters agree by construction.
// A per-query-head selection by bound counts the union in its filled slots.
struct HeadTraffic {
  int64_t keys = 0, pages = 0;
};
HeadTraffic head_traffic(const KeyPlan& plan, int32_t kv_head, int32_t page_size);

// Sparse prefill of one layer (PrefillPattern), the form every kind takes: per
// query head with a pattern, per query block of its block size that holds rows
// of this call, ascending disjoint key ranges [begin, end) and ascending single
// key columns outside them (stored-token indices). A row at stored position
// `self` reads the listed keys <= self. Built by Backend::plan_sparse_prefill.
// The CSR layout is kernels::SparseLayout's with begin = indptr and end =
// indptr + 1. A backend that builds the plan where it computes (CUDA) leaves
// the arrays empty and sets `device`; heads and the counters are filled.
struct SparsePlan {
  using Head = kernels::SparseHead;
  std::vector<Head> heads;            // (n_heads)
  std::vector<int32_t> range_indptr;  // (blocks + 1) ranges of `ranges` (pairs)
  std::vector<int32_t> ranges;        // begin, end, begin, end, ...
  std::vector<int32_t> column_indptr; // (blocks + 1) ranges of `columns`
  std::vector<int32_t> columns;
  int64_t keys_read = 0;    // sum over the sparse heads' rows of the keys they read
  int64_t keys_causal = 0;  // ... and of the keys a dense row reads (self + 1)
  double plan_seconds = 0;  // the backend's time to estimate and build it
  bool device = false;      // built and kept by the backend (the arrays above are empty)

  bool active() const { return device || !range_indptr.empty(); }
  bool sparse(int32_t head) const { return active() && heads[size_t(head)].block_size > 0; }
  // Query block qb (absolute) of head h: its ranges (pairs) and its columns.
  std::span<const int32_t> block_ranges(int32_t head, int32_t qb) const;
  std::span<const int32_t> block_columns(int32_t head, int32_t qb) const;

 private:
  int64_t block_index(int32_t head, int32_t qb) const;
};

// Builds a SparsePlan head by head, block by block: ranges in any order are
// sorted, clipped to [0, q1) and merged; columns are kept when below q1 and
// outside every range. Counts keys_read and keys_causal for the rows
// [row_begin, row_end) (stored positions) of each block.
class SparsePlanBuilder {
 public:
  explicit SparsePlanBuilder(int32_t n_heads);
  // Head h's blocks follow, block_size > 0, the call's rows at stored positions [row_begin, row_end).
  void begin_head(int32_t head, int32_t block_size, int32_t row_begin, int32_t row_end);
  // The next query block of the current head.
  void add_block(std::vector<std::pair<int32_t, int32_t>>& ranges, std::span<const int32_t> columns);
  // A whole head of a kind needing no estimation (Blocks, AShape): begin_head
  // and one add_block per query block from pattern_block_ranges.
  void add_fixed_head(int32_t head, const PrefillPattern& pattern, int32_t row_begin, int32_t row_end);
  SparsePlan finish();

 private:
  SparsePlan plan_;
  int32_t head_ = -1, row_begin_ = 0, row_end_ = 0, next_block_ = 0;
};

// The ranges of query block qb of a kind needing no estimation (Blocks with
// its pairs sorted, AShape), appended to `ranges`.
void pattern_block_ranges(const PrefillPattern& pattern, int32_t qb, std::vector<std::pair<int32_t, int32_t>>& ranges);

// VerticalSlash's ranges of block [q0, q1) from kept diagonals (any order).
void slash_ranges(std::span<const int32_t> diagonals, int32_t q0, int32_t q1,
                  std::vector<std::pair<int32_t, int32_t>>& ranges);

// What progressive quantization did in one layer's attention call.
struct RequantTally {
  int64_t rows = 0;       // query vectors (row, head) attended from the MSB planes
  int64_t refetched = 0;  // those recomputed with the LSB planes
  // Cached keys (stored before the call) whose K / V LSB planes were read,
  // per kv head (once however many of its query heads refetched), summed.
  int64_t lsb_key_rows = 0;
  int64_t lsb_value_rows = 0;
  // Adds one call of n_rows rows: per (head, row), h * n_rows + i, whether
  // the vector was refetched and the cached keys and kept cached values its
  // refetch read (0 when not refetched); heads with computed[h] == 0 (masked)
  // attended nothing. Per kv head and row, the LSB planes counted are those
  // the most reading of its query heads read.
  void add(int32_t group_size, int64_t n_rows, std::span<const uint8_t> computed,
           std::span<const uint8_t> refetched_rows, std::span<const int64_t> keys, std::span<const int64_t> values);
};

// Everything one layer's attention op needs.
struct LayerAttention {
  int32_t layer = 0;
  const KeyPlan* keys = nullptr;
  const SparsePlan* sparse = nullptr;   // null or inactive: dense prefill (Feature::SparsePrefill)
  const ComponentMask* mask = nullptr;  // null: every head computed
  bool predicted_heads = false;         // the heads of the layer's predicted choice only (Backend::predict)
  bool statistics = false;              // keep key mass and head norms for read_statistics
  const ValuePruning* values = nullptr; // null or inactive: every value accumulated (Feature::ValuePruning)
  // Out, with values: per kv head, the cached keys (stored before this call)
  // its rows read whose V row no query head of the group accumulated (so
  // never read), summed over the kv heads.
  int64_t* values_skipped = nullptr;
  // Bit-plane pages (the sequence's pool): every row attended from the MSB
  // planes, and a query vector (row, head) whose largest probability is below
  // requant->requant_threshold recomputed with the LSB planes too. Null: every
  // row at full precision.
  const KvQuantization* requant = nullptr;
  RequantTally* requant_tally = nullptr;  // out, with requant
};

// A step decided before its first op: which layers run, the page budgets of
// every (layer, kv head), and whether anything in the step needs the host
// between ops (a hook that reads device data or changes the cache mid-step).
// A step that needs nothing from the host can be captured and replayed.
// Where a method's exit policy checks and maps (ExitPolicy without its
// weights, which the backend holds): what the schedule needs per call.
struct ExitLayout {
  ExitMeasure measure = ExitMeasure::Softmax;
  std::vector<uint8_t> check;  // (n_layers) 1 = a confidence after the layer
  std::vector<uint8_t> head;   // (n_layers) 1 = the layer has an exit head; empty: none
  SkippedLayerKv kv_fill = SkippedLayerKv::FromHidden;
  bool active() const { return !check.empty(); }
  bool checks(int32_t layer) const { return active() && check[size_t(layer)] != 0; }
  bool maps(int32_t layer) const { return !head.empty() && head[size_t(layer)] != 0; }
};

struct StepPlan {
  StepInfo step;
  std::vector<uint8_t> run;                   // (n_layers) 1 = computed
  SkippedLayerKv kv_fill = SkippedLayerKv::FromHidden;
  std::vector<std::vector<int32_t>> budgets;  // (n_layers, n_kv_heads): > 0 by bound, 0 all, < 0 ask select_kv
  std::vector<std::vector<RetentionBudget>> retention;  // (n_layers, n_kv_heads) with kHookRetention
  bool bound_per_head = false;  // page budgets select per query head (BoundScope::QueryHead)
  bool host_reads = false;    // a hook reads device data mid-step (hidden, queries, statistics)
  bool host_changes = false;  // a hook changes the cache mid-step (evict)
  int32_t max_keys = 0;       // most keys a head reads: stored + new
  bool exit_checks = false;   // confidences computed after the exit policy's layers (a one-row decode step)
  double exit_threshold = 2;  // ... exiting where one exceeds this

  bool replayable() const { return step.decode() && !host_reads && !host_changes; }
  bool any_bound(int32_t layer) const;
};

}  // namespace inferlab
