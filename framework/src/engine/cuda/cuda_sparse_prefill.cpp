// The CUDA backend's sparse prefill plan (Feature::SparsePrefill). Estimated
// heads stay on the device from scores to plan: vertical-slash scores or
// pooled block scores, segmented top-k, then the ranges and columns of every
// query block written in place (room per block), one launch per step for all
// heads. Heads whose pattern needs no estimation (Blocks, AShape) are built on
// the host by the same SparsePlanBuilder as the CPU backend's and uploaded.
// The only host wait is at the end: the keys the device plan reads (a
// counter) and the plan's time.
#include <fmt/format.h>

#include <algorithm>
#include <cmath>

#include "cuda/sparse_prefill.cuh"
#include "engine/cuda/cuda_backend.h"
#include "engine/cuda/cuda_check.h"
#include "engine/cuda/cuda_kv_storage.h"

namespace inferlab {

namespace kc = kernels::cuda;

namespace {

// Offsets of the pieces of one device buffer, each aligned.
struct Carve {
  size_t bytes = 0;
  size_t take(size_t n, size_t align = 16) {
    bytes = (bytes + align - 1) / align * align;
    const size_t at = bytes;
    bytes += n;
    return at;
  }
};

// Sum over stored positions r in [r0, r1) of r + 1: what dense rows read.
int64_t causal_keys(int64_t r0, int64_t r1) { return (r1 * (r1 + 1) - r0 * (r0 + 1)) / 2; }

}  // namespace

Status CudaBackend::plan_sparse_prefill(const KvSequence& seq, int32_t l,
                                        std::span<const std::optional<PrefillPattern>> patterns, SparsePlan& plan) {
  using Kind = PrefillPattern::Kind;
  const ModelConfig& c = config_;
  const int32_t nh = c.n_heads, gs = c.group_size(), n = int32_t(n_), hd = c.head_dim;
  if (seq.pool().bit_planes().active())
    return Error{"cuda engine: sparse prefill over bit-plane KV pages is not supported (the estimates read f16/bf16 "
                 "keys)"};
  plan = SparsePlan{};
  plan.heads.resize(size_t(nh));
  plan.device = true;

  // Every sparse head's blocks, in head order; the host-built heads' ranges.
  struct Estimated {
    int32_t h;
    const PrefillPattern* p;
    int32_t stored, cached;
  };
  std::vector<Estimated> vs, bt;
  SparsePlanBuilder builder(nh);
  int32_t blocks = 0, max_blocks = 0;
  for (int32_t h = 0; h < nh; ++h) {
    const auto& p = patterns[size_t(h)];
    if (!p) continue;
    const int32_t stored = seq.table(l, h / gs).n_tokens(), cached = stored - n, bs = p->block_size;
    SparsePlan::Head& head = plan.heads[size_t(h)];
    head = {bs, cached / bs, (stored - 1) / bs - cached / bs + 1, blocks};
    blocks += head.n_blocks;
    max_blocks = std::max(max_blocks, head.n_blocks);
    plan.keys_causal += causal_keys(cached, stored);
    switch (p->kind) {
      case Kind::Blocks:
      case Kind::AShape: builder.add_fixed_head(h, *p, cached, stored); break;
      case Kind::VerticalSlash: vs.push_back({h, &*p, stored, cached}); break;
      case Kind::BlockTopK: bt.push_back({h, &*p, stored, cached}); break;
    }
  }
  const SparsePlan host = builder.finish();
  plan.keys_read = host.keys_read;
  const int64_t host_pairs = int64_t(host.ranges.size() / 2), host_columns = int64_t(host.columns.size());

  // Sizes of the estimated heads' work and room.
  const int32_t n_vs = int32_t(vs.size()), n_bt = int32_t(bt.size());
  int32_t vs_stride = 0, v_room = 0, d_room = 0, max_last_q = 0;
  for (const auto& e : vs) {
    vs_stride = std::max(vs_stride, e.stored);
    v_room = std::max(v_room, std::min(e.p->verticals, e.stored));
    d_room = std::max(d_room, std::min(e.p->slashes, e.stored));
    max_last_q = std::max(max_last_q, std::min(e.p->last_q, n));
  }
  int32_t segments = 0, max_kb = 0, max_qb = 0, k_room = 0;
  std::vector<int32_t> bt_segment_at;
  for (const auto& e : bt) {
    const SparsePlan::Head& head = plan.heads[size_t(e.h)];
    bt_segment_at.push_back(segments);
    segments += head.n_blocks;
    const int32_t n_kb = (e.stored + head.block_size - 1) / head.block_size;
    max_kb = std::max(max_kb, n_kb);
    max_qb = std::max(max_qb, head.n_blocks);
    k_room = std::max(k_room, std::min(e.p->top_k, n_kb));
  }
  int64_t device_pairs = 0, device_columns = 0;
  std::vector<kernels::SparseBuildHead> build;
  for (const auto& e : vs) {
    const SparsePlan::Head& head = plan.heads[size_t(e.h)];
    kernels::SparseBuildHead b;
    b.kind = int32_t(Kind::VerticalSlash);
    b.range_room = std::min(e.p->slashes, e.stored);
    b.column_room = std::min(e.p->verticals, e.stored);
    b.n_columns = b.column_room;
    b.n_diagonals = b.range_room;
    b.range_base = int32_t(host_pairs + device_pairs);
    b.column_base = int32_t(host_columns + device_columns);
    device_pairs += int64_t(head.n_blocks) * b.range_room;
    device_columns += int64_t(head.n_blocks) * b.column_room;
    build.push_back(b);
  }
  for (int32_t i = 0; i < n_bt; ++i) {
    const auto& e = bt[size_t(i)];
    const SparsePlan::Head& head = plan.heads[size_t(e.h)];
    kernels::SparseBuildHead b;
    b.kind = int32_t(Kind::BlockTopK);
    b.range_room = std::min(e.p->top_k, (e.stored + head.block_size - 1) / head.block_size);
    b.range_base = int32_t(host_pairs + device_pairs);
    b.column_base = int32_t(host_columns + device_columns);
    device_pairs += int64_t(head.n_blocks) * b.range_room;
    build.push_back(b);
  }
  if (host_pairs + device_pairs > INT32_MAX || host_columns + device_columns > INT32_MAX)
    return Error{fmt::format("cuda engine: the sparse prefill plan of layer {} needs {} key ranges and {} columns, "
                             "more than 32-bit indices address; lower the vertical/slash budgets",
                             l, host_pairs + device_pairs, host_columns + device_columns)};

  // One buffer: what the host writes first (uploaded in one copy), then the
  // ranges and columns, then the estimation's outputs and scratch.
  Carve carve;
  const size_t at_heads = carve.take(size_t(nh) * sizeof(kernels::SparseHead));
  const size_t at_bounds = carve.take(size_t(4) * size_t(blocks) * 4);  // range begin/end, column begin/end
  const size_t at_vs_ints = carve.take(size_t(8) * size_t(n_vs) * 4);   // heads, last_q, n, k_v, keep_v, k_d, keep_d, spare
  const size_t at_bt_ints = carve.take(size_t(3) * size_t(n_bt) * 4 + size_t(2) * size_t(segments) * 4);
  const size_t at_build = carve.take(build.size() * sizeof(kernels::SparseBuildHead));
  const size_t at_counter = carve.take(8);
  const size_t upload_bytes = carve.bytes;
  const size_t at_ranges = carve.take(size_t(2 * (host_pairs + device_pairs)) * 4);
  const size_t at_columns = carve.take(size_t(host_columns + device_columns) * 4);
  const size_t at_vs_out = carve.take(size_t(n_vs) * size_t(v_room + d_room + 2) * 4);
  const size_t at_bt_out = carve.take(size_t(segments) * size_t(k_room + 1) * 4);
  const size_t at_vs_scores = carve.take(size_t(2) * size_t(n_vs) * size_t(vs_stride) * 4);
  const size_t at_pooled = carve.take(size_t(n_bt) * size_t(max_kb + max_qb) * size_t(hd) * 4);
  const size_t at_bt_scores = carve.take(size_t(segments) * size_t(max_kb) * 4);
  if (carve.bytes > sparse_.bytes()) {
    CUDA_TRY(cudaStreamSynchronize(stream_), "sparse prefill plan");  // an earlier layer's kernels may read it
    if (!sparse_.reserve(carve.bytes + carve.bytes / 4))
      return Error{fmt::format("cuda engine: out of GPU memory for the sparse prefill plan of layer {} ({} MiB)", l,
                               carve.bytes >> 20)};
  }
  char* base = sparse_.as<char>();
  auto dev = [&](size_t at) { return reinterpret_cast<int32_t*>(base + at); };

  std::vector<unsigned char> image(upload_bytes, 0);
  auto host_ints = [&](size_t at) { return reinterpret_cast<int32_t*>(image.data() + at); };
  std::copy(plan.heads.begin(), plan.heads.end(), reinterpret_cast<kernels::SparseHead*>(image.data() + at_heads));
  int32_t* range_begin = host_ints(at_bounds);
  int32_t* range_end = range_begin + blocks;
  int32_t* column_begin = range_end + blocks;
  int32_t* column_end = column_begin + blocks;
  for (int32_t h = 0; h < nh; ++h) {  // host-built heads: the builder's CSR, shifted to the plan's blocks
    const SparsePlan::Head& hh = host.heads[size_t(h)];
    if (hh.block_size == 0) continue;
    const SparsePlan::Head& ph = plan.heads[size_t(h)];
    for (int32_t i = 0; i < ph.n_blocks; ++i) {
      const size_t b = size_t(ph.at + i), k = size_t(hh.at + i);
      range_begin[b] = host.range_indptr[k];
      range_end[b] = host.range_indptr[k + 1];
      column_begin[b] = host.column_indptr[k];
      column_end[b] = host.column_indptr[k + 1];
    }
  }
  int32_t* vs_ints = host_ints(at_vs_ints);
  int32_t* const vs_heads = vs_ints;
  int32_t* const vs_last_q = vs_ints + n_vs;
  int32_t* const vs_n = vs_ints + 2 * n_vs;
  int32_t* const vs_kv = vs_ints + 3 * n_vs;
  int32_t* const vs_keep_v = vs_ints + 4 * n_vs;
  int32_t* const vs_kd = vs_ints + 5 * n_vs;
  int32_t* const vs_keep_d = vs_ints + 6 * n_vs;
  for (int32_t i = 0; i < n_vs; ++i) {
    const auto& e = vs[size_t(i)];
    vs_heads[i] = e.h;
    vs_last_q[i] = e.p->last_q;
    vs_n[i] = e.stored;
    vs_kv[i] = e.p->verticals;
    vs_keep_v[i] = e.p->keep_first_columns;
    vs_kd[i] = e.p->slashes;
    vs_keep_d[i] = e.p->keep_last_diagonals;
  }
  int32_t* bt_ints = host_ints(at_bt_ints);
  int32_t* const bt_heads = bt_ints;
  int32_t* const bt_bs = bt_ints + n_bt;
  int32_t* const bt_seg = bt_ints + 2 * n_bt;
  int32_t* const bt_n = bt_ints + 3 * n_bt;
  int32_t* const bt_k = bt_n + segments;
  for (int32_t i = 0; i < n_bt; ++i) {
    const auto& e = bt[size_t(i)];
    const SparsePlan::Head& head = plan.heads[size_t(e.h)];
    bt_heads[i] = e.h;
    bt_bs[i] = head.block_size;
    bt_seg[i] = bt_segment_at[size_t(i)];
    for (int32_t j = 0; j < head.n_blocks; ++j) {
      bt_n[bt_seg[i] + j] = head.first_block + j + 1;
      bt_k[bt_seg[i] + j] = e.p->top_k;
    }
  }
  // Device addresses of the estimation's outputs, for the build descriptors.
  int32_t* const v_out = dev(at_vs_out);
  int32_t* const d_out = v_out + int64_t(n_vs) * v_room;
  int32_t* const v_count = d_out + int64_t(n_vs) * d_room;
  int32_t* const d_count = v_count + n_vs;
  int32_t* const k_out = dev(at_bt_out);
  int32_t* const k_count = k_out + int64_t(segments) * k_room;
  for (int32_t i = 0; i < n_vs + n_bt; ++i) {
    kernels::SparseBuildHead& b = build[size_t(i)];
    const bool is_vs = i < n_vs;
    const int32_t h = is_vs ? vs[size_t(i)].h : bt[size_t(i - n_vs)].h;
    const SparsePlan::Head& head = plan.heads[size_t(h)];
    b.block_size = head.block_size;
    b.first_block = head.first_block;
    b.n_blocks = head.n_blocks;
    b.at = head.at;
    const auto& e = is_vs ? vs[size_t(i)] : bt[size_t(i - n_vs)];
    b.row_begin = e.cached;
    b.row_end = e.stored;
    if (is_vs) {
      b.columns = v_out + int64_t(i) * v_room;
      b.diagonals = d_out + int64_t(i) * d_room;
    } else {
      const int32_t seg = bt_segment_at[size_t(i - n_vs)];
      b.key_blocks = k_out + int64_t(seg) * k_room;
      b.key_block_count = k_count + seg;
      b.key_block_stride = k_room;
    }
  }
  std::copy(build.begin(), build.end(), reinterpret_cast<kernels::SparseBuildHead*>(image.data() + at_build));

  if (sparse_events_[0] == nullptr)
    for (auto& e : sparse_events_) CUDA_TRY(cudaEventCreate(&e), "sparse prefill timing");
  CUDA_TRY(cudaEventRecord(sparse_events_[0], stream_), "sparse prefill timing");
  CUDA_TRY(cudaMemcpyAsync(base, image.data(), upload_bytes, cudaMemcpyHostToDevice, stream_), "sparse prefill plan");
  if (host_pairs > 0)
    CUDA_TRY(cudaMemcpyAsync(base + at_ranges, host.ranges.data(), host.ranges.size() * 4, cudaMemcpyHostToDevice,
                             stream_),
             "sparse prefill plan");
  if (host_columns > 0)
    CUDA_TRY(cudaMemcpyAsync(base + at_columns, host.columns.data(), host.columns.size() * 4, cudaMemcpyHostToDevice,
                             stream_),
             "sparse prefill plan");

  const kernels::KvPages kv = cuda_kv_pages(seq.pool());
  const kernels::LayerPageTable table = layer_table(l);
  const int32_t* n_cached = counts_at(l);
  auto describe = [&](auto& call) {  // the fields both estimation calls share
    call.kv = kv;
    call.table = table;
    call.n_heads = nh;
    call.n_kv_heads = c.n_kv_heads;
    call.head_dim = hd;
    call.q = sequence_rows(q_, c.q_dim());
    call.call_rows = n;
    call.n_cached = n_cached;
  };
  float* const vs_scores = reinterpret_cast<float*>(base + at_vs_scores);
  if (n_vs > 0) {
    kernels::VerticalSlashCall call;
    describe(call);
    call.scale = 1.0f / std::sqrt(float(hd));
    call.n_list = n_vs;
    call.heads = dev(at_vs_ints);
    call.last_q = dev(at_vs_ints) + n_vs;
    call.max_last_q = max_last_q;
    call.vertical = vs_scores;
    call.slash = vs_scores + int64_t(n_vs) * vs_stride;
    call.stride = vs_stride;
    CUDA_TRY(kc::vertical_slash_scores(call, stream_), "vertical-slash scores");
    const int32_t* ints = dev(at_vs_ints);
    kernels::TopKCall top;
    top.stride = vs_stride;
    top.n_segments = n_vs;
    top.n = ints + 2 * n_vs;
    top.scores = call.vertical;
    top.k = ints + 3 * n_vs;
    top.keep_first = ints + 4 * n_vs;
    top.out = v_out;
    top.out_stride = v_room;
    top.out_count = v_count;
    CUDA_TRY(kc::top_k_segments(top, stream_), "vertical top-k");
    top.scores = call.slash;
    top.k = ints + 5 * n_vs;
    top.keep_first = ints + 6 * n_vs;
    top.out = d_out;
    top.out_stride = d_room;
    top.out_count = d_count;
    CUDA_TRY(kc::top_k_segments(top, stream_), "slash top-k");
  }
  if (n_bt > 0) {
    kernels::BlockScoresCall call;
    describe(call);
    call.n_list = n_bt;
    const int32_t* ints = dev(at_bt_ints);
    call.heads = ints;
    call.block_size = ints + n_bt;
    call.segment_at = ints + 2 * n_bt;
    call.max_kb = max_kb;
    call.max_qb = max_qb;
    call.pooled_k = reinterpret_cast<float*>(base + at_pooled);
    call.pooled_q = call.pooled_k + int64_t(n_bt) * max_kb * hd;
    call.scores = reinterpret_cast<float*>(base + at_bt_scores);
    call.stride = max_kb;
    CUDA_TRY(kc::block_scores(call, stream_), "block scores");
    kernels::TopKCall top;
    top.scores = call.scores;
    top.stride = max_kb;
    top.n_segments = segments;
    top.n = ints + 3 * n_bt;
    top.k = ints + 3 * n_bt + segments;
    top.out = k_out;
    top.out_stride = k_room;
    top.out_count = k_count;
    CUDA_TRY(kc::top_k_segments(top, stream_), "block top-k");
  }
  kernels::SparseBuildCall call;
  call.n_list = n_vs + n_bt;
  call.heads = reinterpret_cast<const kernels::SparseBuildHead*>(base + at_build);
  call.max_blocks = max_blocks;
  call.range_begin = dev(at_bounds);
  call.range_end = call.range_begin + blocks;
  call.column_begin = call.range_end + blocks;
  call.column_end = call.column_begin + blocks;
  call.ranges = dev(at_ranges);
  call.columns = dev(at_columns);
  call.keys_read = reinterpret_cast<unsigned long long*>(base + at_counter);
  CUDA_TRY(kc::build_sparse_plan(call, stream_), "sparse prefill plan");
  CUDA_TRY(cudaEventRecord(sparse_events_[1], stream_), "sparse prefill timing");

  unsigned long long device_reads = 0;
  CUDA_TRY(cudaMemcpyAsync(&device_reads, call.keys_read, 8, cudaMemcpyDeviceToHost, stream_), "sparse prefill plan");
  CUDA_TRY(cudaStreamSynchronize(stream_), "sparse prefill plan");  // also keeps `image` and `host` alive until read
  float ms = 0;
  CUDA_TRY(cudaEventElapsedTime(&ms, sparse_events_[0], sparse_events_[1]), "sparse prefill timing");
  plan.keys_read += int64_t(device_reads);
  plan.plan_seconds = double(ms) / 1e3;
  sparse_layout_ = {reinterpret_cast<const kernels::SparseHead*>(base + at_heads),
                    call.range_begin,
                    call.range_end,
                    call.ranges,
                    call.column_begin,
                    call.column_end,
                    call.columns};
  return ok_status();
}

}  // namespace inferlab
