// The CUDA backend's changes to a sequence's cache: page-table copies on the
// device, eviction, re-rotation of moved keys, truncation, and engine-side
// retention (scores and the choice of what leaves, on the device).
#include <fmt/format.h>

#include <algorithm>
#include <vector>

#include "cuda/kv_cache_ops.cuh"
#include "cuda/retention.cuh"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/cuda_kv_storage.h"

namespace inferlab {

namespace kc = kernels::cuda;

Status CudaBackend::sync_table(const KvSequence& seq, int32_t l, int32_t g) {
  const HeadPageTable& t = seq.table(l, g);
  TableSync& s = table_sync_[size_t(table_index(l, g))];
  const int32_t pages = int32_t(t.pages.size());
  if (pages > max_pages_) return Error{fmt::format("cuda engine: page table of {} pages exceeds {}", pages, max_pages_)};
  const int32_t from = s.seq_id == seq.id() && s.rewrites == t.rewrites ? std::min(s.pages, pages) : 0;
  if (from < pages) {
    int32_t* host = table_at(l, g, true);
    std::copy(t.pages.begin() + from, t.pages.end(), host + from);
    int32_t* device = table_at(l, g);
    CUDA_TRY(cudaMemcpyAsync(device + from, host + from, size_t(pages - from) * 4, cudaMemcpyHostToDevice, stream_),
             "upload page table");
  }
  s = TableSync{seq.id(), t.rewrites, pages};
  return ok_status();
}

Result<int32_t> CudaBackend::evict(KvSequence& seq, int32_t l, int32_t g, std::vector<int32_t> drop) {
  // The pinned host tables may still feed an upload of this head's row.
  CUDA_TRY(cudaStreamSynchronize(stream_), "eviction");
  return seq.evict(l, g, std::move(drop));
}

Status CudaBackend::rerotate(KvSequence& seq, int32_t l, int32_t g) {
  // RoPE rotations compose, so a key moved to index i is its original (the
  // row as first written, saved in an origin page at its first move) turned
  // by i - origin: one rounding to f16/bf16 however often it moves. Turning
  // the stored key by each eviction's delta rounded every time and drifted.
  const ModelConfig& c = config_;
  if (seq.pool().bit_planes().active())
    return Error{"cuda engine: re-rotation of bit-plane KV pages is not supported (cache positions turn f16/bf16 "
                 "keys)"};
  // Room for every stored key first: nothing changes when the device has none.
  if (!scratch_.reserve(size_t(5 * seq.table(l, g).n_tokens()) * 4))
    return Error{"cuda engine: out of GPU memory for re-rotation"};
  const std::vector<int32_t> moved = seq.rerotation_moves(l, g);  // (5, n)
  if (moved.empty()) return ok_status();
  const int32_t n = int32_t(moved.size() / 5);
  const int32_t* d = scratch_.as<int32_t>();
  CUDA_TRY(cudaMemcpyAsync(scratch_.as(), moved.data(), moved.size() * 4, cudaMemcpyHostToDevice, stream_),
           "re-rotate");
  CUDA_TRY(kc::kv_rope_from_originals(cuda_kv_pages(seq.pool()), d, d + n, d + 2 * n, d + 3 * n, d + 4 * n, n,
                                      c.rope_dim, c.rope_theta, c.rope_neox, stream_, c.rope()),
           "re-rotate");
  CUDA_TRY(cudaStreamSynchronize(stream_), "re-rotate");  // `moved` is pageable and ours
  return ok_status();
}

Status CudaBackend::truncate(KvSequence& seq, int32_t n) {
  CUDA_TRY(cudaStreamSynchronize(stream_), "truncate");  // kernels in flight may still read the pages
  seq.truncate(n);
  return ok_status();
}

Status CudaBackend::retain(KvSequence& seq, int32_t l, const RetentionPolicy& policy,
                           std::span<const RetentionBudget> budgets, std::vector<std::vector<int32_t>>& drops) {
  const ModelConfig& c = config_;
  const int32_t nkv = c.n_kv_heads;
  if (policy.scope == RetentionScope::PerSequence) return retain_sequence(seq, l, policy, budgets[0], drops);
  int32_t* staged = host_retention_budgets_.as<int32_t>();
  int32_t max_tokens = 0;
  for (int32_t g = 0; g < nkv; ++g) {
    staged[3 * g] = budgets[size_t(g)].sink;
    staged[3 * g + 1] = budgets[size_t(g)].recent;
    staged[3 * g + 2] = budgets[size_t(g)].heavy;
    max_tokens = std::max(max_tokens, seq.table(l, g).n_tokens());
  }
  const size_t per_head = size_t(max_context_);
  if (!retention_scores_.reserve(size_t(nkv) * per_head * 4) || !retention_drops_.reserve(size_t(nkv) * per_head * 4) ||
      !host_drops_.reserve(size_t(nkv) * per_head * 4))
    return Error{"cuda engine: out of GPU memory for retention"};
  CUDA_TRY(cudaMemcpyAsync(retention_budgets_.as(), staged, size_t(nkv) * 3 * 4, cudaMemcpyHostToDevice, stream_),
           "upload retention budgets");
  kernels::RetentionCall call;
  call.n_kv_heads = nkv;
  call.page_size = options_.page_size;
  call.table = layer_table(l);
  call.plane = seq.pool().plane<float>(SlotPlane::Score);
  call.n_cached = counts_at(l);
  call.n_rows = int32_t(n_);
  call.mass = key_mass_.as<float>();
  call.mass_stride = max_context_;
  call.rule = policy.score == RetentionScore::LastMass ? 1 : 0;
  call.budget = retention_budgets_.as<int32_t>();
  call.scores = retention_scores_.as<float>();
  call.drops = retention_drops_.as<int32_t>();
  call.n_drops = retention_counts_.as<int32_t>();
  call.stride = max_context_;
  CUDA_TRY(kc::retention_update(call, max_tokens, stream_), "retention scores");
  CUDA_TRY(kc::retention_select(call, stream_), "retention");
  // What leaves crosses to the host (the compaction's bookkeeping lives there).
  int32_t* host = host_drops_.as<int32_t>();
  CUDA_TRY(cudaMemcpyAsync(host, retention_counts_.as(), size_t(nkv) * 4, cudaMemcpyDeviceToHost, stream_),
           "retention");
  CUDA_TRY(cudaStreamSynchronize(stream_), "retention");
  std::vector<int32_t> counts(host, host + nkv);
  drops.assign(size_t(nkv), {});
  for (int32_t g = 0; g < nkv; ++g)
    if (counts[size_t(g)] > 0)
      CUDA_TRY(cudaMemcpyAsync(host + int64_t(g) * max_context_, retention_drops_.as<int32_t>() + int64_t(g) * max_context_,
                               size_t(counts[size_t(g)]) * 4, cudaMemcpyDeviceToHost, stream_),
               "retention");
  CUDA_TRY(cudaStreamSynchronize(stream_), "retention");
  for (int32_t g = 0; g < nkv; ++g) {
    const int32_t* first = host + int64_t(g) * max_context_;
    drops[size_t(g)].assign(first, first + counts[size_t(g)]);
  }
  return ok_status();
}

// One score per position of the sequence, summed over layers and kv heads, in
// the sequence's planes on the device; every kv head of the layer keeps the
// same tokens. The layer's positions go up (4 bytes a token); what leaves comes back.
Status CudaBackend::retain_sequence(KvSequence& seq, int32_t l, const RetentionPolicy& policy,
                                    const RetentionBudget& budget, std::vector<std::vector<int32_t>>& drops) {
  const ModelConfig& c = config_;
  const HeadPageTable& head0 = seq.table(l, 0);  // every kv head holds these tokens (the schedule checked)
  const int32_t n = head0.n_tokens();
  const int32_t capacity = sequence_plane_capacity(max_context_, first_position_ + int32_t(call_rows_));
  auto* score = static_cast<float*>(seq.sequence_plane(SequencePlane::Score, capacity));
  auto* dropped_at = static_cast<int32_t*>(seq.sequence_plane(SequencePlane::DroppedAt, capacity));
  if (!sequence_retention_started_) {  // this call's tokens are new at their positions
    sequence_retention_started_ = true;
    CUDA_TRY(cudaMemsetAsync(score + first_position_, 0, size_t(call_rows_) * 4, stream_), "retention");
    CUDA_TRY(cudaMemsetAsync(dropped_at + first_position_, 0, size_t(call_rows_) * 4, stream_), "retention");
    if (policy.score == RetentionScore::LastMass)
      CUDA_TRY(cudaMemsetAsync(score, 0, size_t(capacity) * 4, stream_), "retention");
  }
  // positions (n), scratch (3n), drops (n), count (1)
  if (!sequence_work_.reserve(size_t(6 * int64_t(n) + 1) * 4) || !host_drops_.reserve(size_t(n + 1) * 4))
    return Error{"cuda engine: out of GPU memory for retention"};
  int32_t* d = sequence_work_.as<int32_t>();
  CUDA_TRY(cudaMemcpyAsync(d, head0.positions.data(), size_t(n) * 4, cudaMemcpyHostToDevice, stream_), "retention");
  kernels::SequenceRetentionCall call;
  call.n_kv_heads = c.n_kv_heads;
  call.n_tokens = n;
  call.layer = l;
  call.positions = d;
  call.mass = key_mass_.as<float>();
  call.mass_stride = max_context_;
  call.score = score;
  call.dropped_at = dropped_at;
  call.sink = budget.sink;
  call.recent = budget.recent;
  call.heavy = budget.heavy;
  call.scratch = d + n;
  call.drops = d + 4 * int64_t(n);
  call.n_drops = d + 5 * int64_t(n);
  CUDA_TRY(kc::sequence_retention_update(call, stream_), "retention scores");
  CUDA_TRY(kc::sequence_retention_select(call, stream_), "retention");
  int32_t* host = host_drops_.as<int32_t>();
  CUDA_TRY(cudaMemcpyAsync(host, call.n_drops, 4, cudaMemcpyDeviceToHost, stream_), "retention");
  CUDA_TRY(cudaStreamSynchronize(stream_), "retention");  // also ends the upload from the pageable positions
  const int32_t count = host[0];
  if (count > 0) {
    CUDA_TRY(cudaMemcpyAsync(host, call.drops, size_t(count) * 4, cudaMemcpyDeviceToHost, stream_), "retention");
    CUDA_TRY(cudaStreamSynchronize(stream_), "retention");
  }
  drops.assign(size_t(c.n_kv_heads), std::vector<int32_t>(host, host + count));
  return ok_status();
}

}  // namespace inferlab
