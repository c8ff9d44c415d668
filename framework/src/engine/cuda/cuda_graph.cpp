// Decode steps as CUDA graphs. The schedule runs a replayable step (its plan
// needs nothing from the host mid-step) once in capture mode; every buffer the
// graph reads stays at its address and is staged here before each replay:
// stored counts, page tables, every layer's key plan (page budgets and one
// stale page per head for the key bounds). A graph belongs to a plan's shape:
// the key bound (a power of two: the split-K grid and the selection grid
// depend on it), which layers run, and which select pages by bound (per kv
// head or per query head: different kernels). A batched step of one-token
// decode segments is staged segment by segment, each into its own staging
// slot (focused), and its graph belongs to the number of segments and the
// largest bound among them too; its segments select no pages by bound (the
// bounds' bookkeeping is one sequence's per layer and head).
#include <fmt/format.h>

#include <algorithm>

#include "cuda/attention.cuh"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"

namespace inferlab {

namespace kc = kernels::cuda;

namespace {
constexpr int32_t kMinGraphKeys = 1024;  // smallest key bound a decode graph is captured for
}  // namespace

int32_t CudaBackend::key_bound(int32_t max_keys) const {
  int32_t bound = kMinGraphKeys;
  while (bound < max_keys) bound *= 2;
  return std::min(bound, std::max(max_context_, max_keys));
}

std::string CudaBackend::graph_key(const StepPlan& plan) const {
  // A batched step's bound is its segments' largest, gathered by prepare_replay.
  std::string key = segments_.empty() ? fmt::format("{}|{}|", key_bound(plan.max_keys), int(plan.kv_fill))
                                      : fmt::format("B{}|{}|{}|", segments_.size(), graph_bound_, int(plan.kv_fill));
  for (int32_t l = 0; l < config_.n_layers; ++l)
    key += plan.run[size_t(l)] == 0 ? '-' : !plan.any_bound(l) ? 'd' : plan.bound_per_head ? 'h' : 'b';
  return key + (cache_positions_ ? "|cache" : "");
}

bool CudaBackend::has_graph(const StepPlan& plan) const { return graphs_.count(graph_key(plan)) != 0; }

Result<bool> CudaBackend::prepare_replay(KvSequence& seq, const StepPlan& plan, std::vector<KeyPlan>& keys) {
  const ModelConfig& c = config_;
  const int32_t L = c.n_layers, nkv = c.n_kv_heads, ps = options_.page_size;
  const bool batched = !segments_.empty();
  // A batched call: its segments one at a time, each a one-token decode step
  // staged into its own slot, the logits of all in one chunk.
  if (batched && (focused_ < 0 || n_ != 1 || int64_t(segments_.size()) > kLogitsChunkRows)) return false;
  if (!batched && failed_keys_.count(graph_key(plan)) != 0) return false;  // its capture failed once: eager
  // Graphs write the default pool's pages and slot plane (bit-plane steps read their refetches back anyway).
  if (&seq.pool() != pool_.get()) return false;
  // First what decides whether this step can be replayed; nothing changes yet.
  // The key bounds take one stale page per head (the page of last step's token).
  std::vector<int32_t> stale_pages(size_t(L) * size_t(nkv), 0), stale_counts(size_t(L) * size_t(nkv), 0);
  std::vector<PageBoundSync> covered(size_t(L) * size_t(nkv));
  int64_t indices = 0;
  bool any_bound = false;
  for (int32_t l = 0; l < L; ++l) {
    if (plan.run[size_t(l)] == 0) continue;
    indices = std::max<int64_t>(indices, int64_t(keys[size_t(l)].indices.size()));
    for (int32_t g = 0; g < nkv; ++g) {
      if (keys[size_t(l)].budget[size_t(g)] <= 0) continue;
      if (batched) return false;  // bounds are kept per (layer, head) for one sequence
      any_bound = true;
      const size_t at = size_t(l) * size_t(nkv) + size_t(g);
      std::vector<int32_t> pages, counts;
      covered[at] = stale_bound_pages(seq, l, g, keys[size_t(l)].cached[size_t(g)], bound_sync_[at], pages, counts);
      if (pages.size() > 1) return false;  // a head's bounds to rebuild: an eager step does it
      if (!pages.empty()) {
        stale_pages[at] = pages[0];
        stale_counts[at] = counts[0];
      }
    }
  }
  // Buffers at the size the graph needs; a buffer that moves drops the graphs holding it.
  if (batched && focused_ == 0) graph_bound_ = 0;  // the first segment of the step: the bound is gathered anew
  const int32_t bound = std::max(key_bound(plan.max_keys), batched ? graph_bound_ : 0);
  // Growing the key-plan regions moves every slot's: a later segment of a
  // batched step must not undo the earlier ones' staging (this step runs
  // eagerly and grows them; the next is replayed).
  if (batched && focused_ > 0 && indices > plan_capacity_) return false;
  if (auto s = ensure_plan_capacity(indices); !s) return s.error();
  if (any_bound) {
    if (auto s = ensure_page_bounds(); !s) return s.error();
    const size_t score_bytes = bound_scratch_bytes((bound + ps - 1) / ps, plan.bound_per_head);
    if (score_bytes > bound_scores_.bytes()) {
      drop_graphs();
      if (!bound_scores_.reserve(score_bytes)) return Error{"cuda engine: out of GPU memory for page selection"};
    }
  }
  const size_t ws = kc::attention_workspace_bytes(base_call(seq.pool(), 0, 1), bound);
  if (ws > attention_ws_.bytes()) {
    drop_graphs();
    if (!attention_ws_.reserve(ws)) return Error{"cuda engine: out of GPU memory for the attention workspace"};
  }

  // Staging: counts, the new token's slots and page tables, the key plans.
  int32_t* counts = counts_at(0, true);  // every layer's, in the staging slot (a batched step's segment: its own)
  for (int32_t l = 0; l < L; ++l)
    for (int32_t g = 0; g < nkv; ++g) counts[l * nkv + g] = seq.table(l, g).n_tokens();
  CUDA_TRY(cudaMemcpyAsync(counts_at(0), counts, size_t(L) * size_t(nkv) * 4, cudaMemcpyHostToDevice, stream_),
           "upload stored counts");
  for (int32_t l = 0; l < L; ++l)
    if (plan.run[size_t(l)] != 0 || plan.kv_fill == SkippedLayerKv::FromHidden)
      if (auto s = stage_append(seq, l, 1); !s) return s.error();
  // The new slots may have grown the pool and moved its slot plane, which the graphs write.
  if (planes_at_capture_ != pool_->storage().planes_generation()) drop_graphs();
  for (int32_t l = 0; l < L; ++l) {
    if (plan.run[size_t(l)] == 0 || !keys[size_t(l)].any_selected()) continue;
    const KeyPlan& k = keys[size_t(l)];
    const PlanRegion r = plan_region(l, true);
    std::copy(k.indptr.begin(), k.indptr.end(), r.indptr);
    std::copy(k.budget.begin(), k.budget.end(), r.keep);
    std::copy(k.indices.begin(), k.indices.end(), r.indices);
    std::copy(k.heads.begin(), k.heads.end(), r.heads);
    std::copy(stale_pages.begin() + l * nkv, stale_pages.begin() + (l + 1) * nkv, r.stale_pages);
    std::copy(stale_counts.begin() + l * nkv, stale_counts.begin() + (l + 1) * nkv, r.stale_counts);
    for (int32_t g = 0; g < nkv; ++g) r.modes[g] = uint8_t(k.mode[size_t(g)]);
  }
  CUDA_TRY(cudaMemcpyAsync(plan_region(0, false).indptr, plan_region(0, true).indptr,
                           size_t(L) * size_t(region_ints_) * 4, cudaMemcpyHostToDevice, stream_),
           "upload key plans");
  pending_bounds_.clear();
  for (int32_t l = 0; l < L; ++l)
    for (int32_t g = 0; g < nkv; ++g)
      if (plan.run[size_t(l)] != 0 && keys[size_t(l)].budget[size_t(g)] > 0)
        pending_bounds_.emplace_back(size_t(l) * size_t(nkv) + size_t(g), covered[size_t(l) * size_t(nkv) + size_t(g)]);
  graph_bound_ = bound;
  return true;
}

Status CudaBackend::capture_begin(const StepPlan& plan) {
  // A batched step's key is known once every segment is staged.
  if (failed_keys_.count(graph_key(plan)) != 0) return Error{"cuda engine: this step's capture failed before"};
  // A wait on an event recorded before the capture would tie the graph to it.
  if (auto s = join_predictions(); !s) return s;
  CUDA_TRY(cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "graph capture");
  capturing_ = true;
  return ok_status();
}

Status CudaBackend::capture_end(const StepPlan& plan, bool ok) {
  capturing_ = false;
  (void)join_predictions();  // the side stream's captured work joins the main stream before the capture ends
  cudaGraph_t graph = nullptr;
  const cudaError_t end = cudaStreamEndCapture(stream_, &graph);
  if (!ok || end != cudaSuccess) {
    if (graph != nullptr) cudaGraphDestroy(graph);
    cudaGetLastError();
    failed_keys_.insert(graph_key(plan));  // steps of this shape run eagerly from now on
    if (!ok) return ok_status();  // the body's own error is the one to report
    return cuda_error(end, "graph capture");
  }
  cudaGraphExec_t exec = nullptr;
  const cudaError_t inst = cudaGraphInstantiate(&exec, graph, 0);
  cudaGraphDestroy(graph);
  if (inst != cudaSuccess) {
    failed_keys_.insert(graph_key(plan));  // not captured again at every step
    return cuda_error(inst, "graph instantiate");
  }
  if (graphs_.empty()) planes_at_capture_ = pool_->storage().planes_generation();
  graphs_[graph_key(plan)].exec = exec;
  return ok_status();
}

Status CudaBackend::replay(const StepPlan& plan, const LogitsSink& sink) {
  auto it = graphs_.find(graph_key(plan));
  if (it == graphs_.end()) return Error{"cuda engine: no graph captured for this step"};
  CUDA_TRY(cudaGraphLaunch(it->second.exec, stream_), "graph launch");
  for (const auto& [at, coverage] : pending_bounds_) bound_sync_[at] = coverage;  // the bounds kernels ran
  pending_bounds_.clear();
  if (!sink) return ok_status();
  const int64_t vocab = config_.n_vocab, rows = segments_.empty() ? 1 : int64_t(segments_.size());
  float* host = host_logits_.as<float>();
  CUDA_TRY(cudaMemcpyAsync(host, logits_.as(), size_t(rows * vocab) * 4, cudaMemcpyDeviceToHost, stream_), "logits");
  CUDA_TRY(cudaStreamSynchronize(stream_), "decode step");
  for (int64_t r = 0; r < rows; ++r) sink(r, std::span<const float>(host + r * vocab, size_t(vocab)));
  return ok_status();
}

}  // namespace inferlab
