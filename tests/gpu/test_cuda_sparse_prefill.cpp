// MInference's index estimation on the device (cuda/sparse_prefill.cuh)
// against its CPU twins (cpu/sparse_prefill.h): vertical-slash scores from a
// paged f16/bf16/f32 cache (GQA, two kv heads holding different counts, the
// call's last rows), pooled block scores at two block sizes, the segmented
// top-k with ties, NaNs and always-kept entries (exact, same indices), and the
// device plan build against SparsePlanBuilder (exact: same ranges, columns
// and keys read).
#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/sparse_prefill.h"
#include "engine/plans.h"
#include "cuda/sparse_prefill.cuh"
#include "gpu_kernel_support.h"
#include "gpu_test_support.h"

namespace inferlab::kernels {
namespace test_cuda_sparse_prefill {

using gpu_test::DeviceBuffer;
using gpu_test::MirrorPool;
using gpu_test::normalized_error;
using gpu_test::param_name;
using gpu_test::random_floats;
using gpu_test::shuffled_ids;

// A call of `call_rows` rows on 4 query heads over 2 kv heads that hold 150
// and 97 tokens after it (so their first rows sit at different, unaligned
// positions), in a shuffled paged pool mirrored on the host; the call's
// queries; a kv head's keys read back from the host pool as f32 rows.
struct PagedCall {
  static constexpr int32_t n_heads = 4, n_kv = 2, ps = 16;
  static constexpr int32_t pages_per_head = (150 + ps - 1) / ps, n_pool = 2 * pages_per_head + 3;
  int32_t call_rows, head_dim;
  std::vector<int32_t> stored = {150, 97}, n_cached, table;
  MirrorPool pool;
  std::vector<float> q;
  DeviceBuffer<int32_t> d_table, d_cached;
  DeviceBuffer<float> d_q;

  PagedCall(DType dtype, int32_t hd, int32_t rows, uint64_t seed)
      : call_rows(rows),
        head_dim(hd),
        n_cached{150 - rows, 97 - rows},
        table(first_ids(shuffled_ids(n_pool, seed + 1), n_kv * pages_per_head)),
        pool(dtype, n_pool, ps, hd, seed),
        q(random_floats(size_t(rows * n_heads * hd), seed + 2)),
        d_table(table),
        d_cached(n_cached),
        d_q(q) {}
  static std::vector<int32_t> first_ids(std::vector<int32_t> ids, int32_t n) {
    ids.resize(size_t(n));
    return ids;
  }
  template <typename Call>
  void describe(Call& call) const {
    call.kv = pool.device();
    call.table = {d_table.get(), pages_per_head};
    call.n_heads = n_heads;
    call.n_kv_heads = n_kv;
    call.head_dim = head_dim;
    call.q = d_q.get();
    call.call_rows = call_rows;
    call.n_cached = d_cached.get();
  }
  std::vector<float> keys(int32_t g) const {
    std::vector<int32_t> page, slot;
    for (int32_t t = 0; t < stored[size_t(g)]; ++t) {
      page.push_back(table[size_t(g * pages_per_head + t / ps)]);
      slot.push_back(t % ps);
    }
    return pool.key_rows(false, page, slot);
  }
};

struct ScoresCase {
  DType dtype;
  int32_t head_dim;
  std::string name() const { return std::string(dtype_name(dtype)) + "_hd" + std::to_string(head_dim); }
};

class VerticalSlashScores : public testing::TestWithParam<ScoresCase> {};

TEST_P(VerticalSlashScores, MatchTheTwin) {
  INFERLAB_REQUIRE_GPU();
  const ScoresCase& tc = GetParam();
  const PagedCall pc(tc.dtype, tc.head_dim, 40, 51);
  const int32_t n_heads = PagedCall::n_heads, hd = tc.head_dim, call_rows = pc.call_rows;
  const std::vector<int32_t> heads = {0, 3, 2}, last_q = {8, 64, 1};  // 64 > call_rows: all rows
  const int32_t stride = 160, n_list = int32_t(heads.size());

  DeviceBuffer<int32_t> d_heads(heads), d_last(last_q);
  DeviceBuffer<float> d_vertical(size_t(n_list * stride)), d_slash(size_t(n_list * stride));
  VerticalSlashCall call;
  pc.describe(call);
  call.scale = 1.0f / std::sqrt(float(hd));
  call.n_list = n_list;
  call.heads = d_heads.get();
  call.last_q = d_last.get();
  call.max_last_q = call_rows;
  call.vertical = d_vertical.get();
  call.slash = d_slash.get();
  call.stride = stride;
  ASSERT_EQ(cuda::vertical_slash_scores(call, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto vertical = d_vertical.download(), slash = d_slash.download();

  for (int32_t i = 0; i < n_list; ++i) {
    SCOPED_TRACE("listed head " + std::to_string(heads[size_t(i)]));
    const int32_t g = heads[size_t(i)] / (n_heads / PagedCall::n_kv), n_keys = pc.stored[size_t(g)];
    const auto keys = pc.keys(g);  // the twin on the host pool's keys, as f32 rows
    const cpu::KvPageRef ref{keys.data(), keys.data(), n_keys};
    const int32_t rows = std::min(last_q[size_t(i)], call_rows);
    std::vector<int32_t> self;
    for (int32_t r = 0; r < rows; ++r) self.push_back(pc.n_cached[size_t(g)] + call_rows - rows + r);
    std::vector<float> want_v(size_t(stride), 0.0f), want_s(size_t(stride), 0.0f), scratch;
    const float* q0 = pc.q.data() + int64_t(call_rows - rows) * n_heads * hd + int64_t(heads[size_t(i)]) * hd;
    cpu::vertical_slash_scores(q0, rows, int64_t(n_heads) * hd, self.data(), &ref, 1, hd, call.scale, want_v.data(),
                               want_s.data(), scratch);
    const std::vector<float> got_v(vertical.begin() + int64_t(i) * stride, vertical.begin() + int64_t(i + 1) * stride);
    const std::vector<float> got_s(slash.begin() + int64_t(i) * stride, slash.begin() + int64_t(i + 1) * stride);
    EXPECT_LT(normalized_error(got_v, want_v), 1e-5);
    EXPECT_LT(normalized_error(got_s, want_s), 1e-5);
    double total = 0;
    for (float v : got_v) total += v;
    EXPECT_NEAR(total, double(rows), 1e-3);  // each row hands out one unit of probability
  }
}

INSTANTIATE_TEST_SUITE_P(Cuda, VerticalSlashScores,
                         testing::Values(ScoresCase{DType::F16, 64}, ScoresCase{DType::BF16, 128},
                                         ScoresCase{DType::F32, 64}),
                         param_name<ScoresCase>);

TEST(CudaTopKSegments, SameIndicesAsTheTwin) {
  INFERLAB_REQUIRE_GPU();
  const float nan = std::numeric_limits<float>::quiet_NaN();
  // Segments: long with many ties and NaNs and kept entries; k = n; k = 0;
  // k > n; one element; a segment past the select block's size.
  const std::vector<int32_t> n = {3000, 50, 50, 20, 1, 1500};
  const std::vector<int32_t> k = {333, 50, 0, 40, 1, 700};
  const std::vector<int32_t> keep = {30, 0, 5, 100, 0, 0};
  const int32_t stride = 3000, out_stride = 3000, segs = int32_t(n.size());
  std::vector<float> scores(size_t(segs * stride), 0.0f);
  auto r = random_floats(scores.size(), 61);
  for (int32_t s = 0; s < segs; ++s)
    for (int32_t p = 0; p < n[size_t(s)]; ++p) {
      float v = std::round(r[size_t(s * stride + p)] * 4.0f) / 4.0f;  // many exact ties
      if (p % 97 == 5) v = nan;
      scores[size_t(s * stride + p)] = v;
    }
  DeviceBuffer<float> d_scores(scores);
  DeviceBuffer<int32_t> d_n(n), d_k(k), d_keep(keep), d_out(size_t(segs * out_stride)), d_count(static_cast<size_t>(segs));
  TopKCall call;
  call.scores = d_scores.get();
  call.stride = stride;
  call.n_segments = segs;
  call.n = d_n.get();
  call.k = d_k.get();
  call.keep_first = d_keep.get();
  call.out = d_out.get();
  call.out_stride = out_stride;
  call.out_count = d_count.get();
  ASSERT_EQ(cuda::top_k_segments(call, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto out = d_out.download(), count = d_count.download();
  for (int32_t s = 0; s < segs; ++s) {
    SCOPED_TRACE("segment " + std::to_string(s));
    std::vector<float> seg(scores.begin() + int64_t(s) * stride, scores.begin() + int64_t(s) * stride + n[size_t(s)]);
    for (int32_t p = 0; p < std::min(keep[size_t(s)], n[size_t(s)]); ++p) seg[size_t(p)] = INFINITY;
    std::vector<int32_t> want;
    cpu::top_k_ascending(seg.data(), int64_t(seg.size()), k[size_t(s)], want);
    ASSERT_EQ(count[size_t(s)], int32_t(want.size()));
    const std::vector<int32_t> got(out.begin() + int64_t(s) * out_stride,
                                   out.begin() + int64_t(s) * out_stride + count[size_t(s)]);
    EXPECT_EQ(got, want);
  }
}

TEST(CudaBlockScores, MatchTheTwin) {
  INFERLAB_REQUIRE_GPU();
  const PagedCall pc(DType::F16, 64, 45, 71);  // 105 and 52 cached: unaligned to the blocks
  const int32_t n_heads = PagedCall::n_heads, hd = pc.head_dim, call_rows = pc.call_rows;
  const std::vector<int32_t>& stored = pc.stored;
  const std::vector<int32_t>& n_cached = pc.n_cached;
  const std::vector<int32_t> heads = {1, 2}, block_size = {16, 5};
  std::vector<int32_t> segment_at, n_qb, n_kb;
  int32_t segments = 0, max_kb = 0, max_qb = 0;
  for (size_t i = 0; i < heads.size(); ++i) {
    const int32_t g = heads[i] / 2, bs = block_size[i];
    n_qb.push_back((stored[size_t(g)] - 1) / bs - n_cached[size_t(g)] / bs + 1);
    n_kb.push_back((stored[size_t(g)] + bs - 1) / bs);
    segment_at.push_back(segments);
    segments += n_qb.back();
    max_kb = std::max(max_kb, n_kb.back());
    max_qb = std::max(max_qb, n_qb.back());
  }
  const int32_t n_list = int32_t(heads.size());
  DeviceBuffer<int32_t> d_heads(heads), d_bs(block_size), d_at(segment_at);
  DeviceBuffer<float> d_pk(size_t(n_list * max_kb * hd)), d_pq(size_t(n_list * max_qb * hd));
  DeviceBuffer<float> d_scores(std::vector<float>(size_t(segments * max_kb), -7.0f));
  BlockScoresCall call;
  pc.describe(call);
  call.n_list = n_list;
  call.heads = d_heads.get();
  call.block_size = d_bs.get();
  call.segment_at = d_at.get();
  call.max_kb = max_kb;
  call.max_qb = max_qb;
  call.pooled_k = d_pk.get();
  call.pooled_q = d_pq.get();
  call.scores = d_scores.get();
  call.stride = max_kb;
  ASSERT_EQ(cuda::block_scores(call, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto scores = d_scores.download();
  for (int32_t i = 0; i < n_list; ++i) {
    SCOPED_TRACE("listed head " + std::to_string(heads[size_t(i)]));
    const int32_t h = heads[size_t(i)], g = h / 2, bs = block_size[size_t(i)], n_keys = stored[size_t(g)];
    const auto keys = pc.keys(g);
    const cpu::KvPageRef ref{keys.data(), keys.data(), n_keys};
    std::vector<float> pk(size_t(n_kb[size_t(i)] * hd)), pq(size_t(n_qb[size_t(i)] * hd));
    cpu::mean_pool_keys(&ref, 1, n_keys, hd, bs, pk.data());
    cpu::mean_pool_rows(pc.q.data() + int64_t(h) * hd, call_rows, int64_t(n_heads) * hd, n_cached[size_t(g)], hd, bs,
                        pq.data());
    std::vector<float> want, got;
    for (int32_t b = 0; b < n_qb[size_t(i)]; ++b) {
      const int32_t qb = n_cached[size_t(g)] / bs + b;
      for (int32_t kb = 0; kb <= qb; ++kb) {
        float dot = 0;
        for (int32_t d = 0; d < hd; ++d) dot += pq[size_t(b * hd + d)] * pk[size_t(kb * hd + d)];
        want.push_back(dot);
        got.push_back(scores[size_t((segment_at[size_t(i)] + b) * max_kb + kb)]);
      }
    }
    EXPECT_LT(normalized_error(got, want), 1e-5);
  }
}

// Random kept indices for two vertical-slash heads and one block top-k head
// (unaligned first rows, partial last blocks, diagonals past the rows,
// columns inside slash ranges): the device plan equals SparsePlanBuilder's.
TEST(CudaSparsePlanBuild, SameRangesColumnsAndKeysReadAsTheBuilder) {
  INFERLAB_REQUIRE_GPU();
  struct Head {
    int32_t kind, bs, row_begin, row_end;
    std::vector<int32_t> columns, diagonals;     // VerticalSlash
    std::vector<std::vector<int32_t>> key_blocks;  // BlockTopK, per block
  };
  std::mt19937_64 rng(81);
  auto pick = [&](int32_t n, int32_t k) {
    std::vector<int32_t> all(static_cast<size_t>(n));
    std::iota(all.begin(), all.end(), 0);
    std::shuffle(all.begin(), all.end(), rng);
    all.resize(size_t(std::min(n, k)));
    std::sort(all.begin(), all.end());
    return all;
  };
  std::vector<Head> heads = {{1, 64, 37, 700, pick(700, 40), pick(700, 60), {}},
                             {1, 16, 0, 333, pick(333, 5), pick(333, 120), {}},
                             {2, 32, 100, 509, {}, {}, {}}};
  for (int32_t qb = 100 / 32; qb * 32 < 509; ++qb) heads[2].key_blocks.push_back(pick(qb + 1, 6));

  // The builder's plan (CPU twin).
  SparsePlanBuilder builder(int32_t(heads.size()));
  std::vector<std::pair<int32_t, int32_t>> ranges;
  for (size_t h = 0; h < heads.size(); ++h) {
    const Head& x = heads[h];
    builder.begin_head(int32_t(h), x.bs, x.row_begin, x.row_end);
    for (int32_t qb = x.row_begin / x.bs, j = 0; qb * x.bs < x.row_end; ++qb, ++j) {
      ranges.clear();
      if (x.kind == 1) {
        slash_ranges(x.diagonals, qb * x.bs, qb * x.bs + x.bs, ranges);
        builder.add_block(ranges, x.columns);
      } else {
        for (int32_t kb : x.key_blocks[size_t(j)]) ranges.emplace_back(kb * x.bs, kb * x.bs + x.bs);
        builder.add_block(ranges, {});
      }
    }
  }
  const SparsePlan want = builder.finish();

  // The device build from the same indices.
  std::vector<int32_t> indices;
  std::vector<SparseBuildHead> build;
  std::vector<size_t> columns_at, diagonals_at, blocks_at, counts_at;
  int32_t blocks = 0, pairs = 0, cols = 0, max_blocks = 0;
  for (const Head& x : heads) {
    SparseBuildHead b;
    b.kind = x.kind;
    b.block_size = x.bs;
    b.first_block = x.row_begin / x.bs;
    b.n_blocks = (x.row_end - 1) / x.bs - b.first_block + 1;
    b.at = blocks;
    b.row_begin = x.row_begin;
    b.row_end = x.row_end;
    b.range_base = pairs;
    b.range_room = x.kind == 1 ? int32_t(x.diagonals.size()) : 6;
    b.column_base = cols;
    b.column_room = x.kind == 1 ? int32_t(x.columns.size()) : 0;
    b.n_columns = int32_t(x.columns.size());
    b.n_diagonals = int32_t(x.diagonals.size());
    b.key_block_stride = 6;
    columns_at.push_back(indices.size());
    indices.insert(indices.end(), x.columns.begin(), x.columns.end());
    diagonals_at.push_back(indices.size());
    indices.insert(indices.end(), x.diagonals.begin(), x.diagonals.end());
    blocks_at.push_back(indices.size());
    for (const auto& kbs : x.key_blocks) {
      indices.insert(indices.end(), kbs.begin(), kbs.end());
      indices.insert(indices.end(), size_t(6) - kbs.size(), -1);
    }
    counts_at.push_back(indices.size());
    for (const auto& kbs : x.key_blocks) indices.push_back(int32_t(kbs.size()));
    blocks += b.n_blocks;
    max_blocks = std::max(max_blocks, b.n_blocks);
    pairs += b.n_blocks * b.range_room;
    cols += b.n_blocks * b.column_room;
    build.push_back(b);
  }
  DeviceBuffer<int32_t> d_indices(indices);
  for (size_t h = 0; h < build.size(); ++h) {
    build[h].columns = d_indices.get() + columns_at[h];
    build[h].diagonals = d_indices.get() + diagonals_at[h];
    build[h].key_blocks = d_indices.get() + blocks_at[h];
    build[h].key_block_count = d_indices.get() + counts_at[h];
  }
  DeviceBuffer<SparseBuildHead> d_build(build);
  DeviceBuffer<int32_t> d_bounds(size_t(4 * blocks)), d_ranges(size_t(2 * pairs)), d_columns(size_t(std::max(cols, 1)));
  DeviceBuffer<unsigned long long> d_reads(std::vector<unsigned long long>{0});
  SparseBuildCall call;
  call.n_list = int32_t(build.size());
  call.heads = d_build.get();
  call.max_blocks = max_blocks;
  call.range_begin = d_bounds.get();
  call.range_end = d_bounds.get() + blocks;
  call.column_begin = d_bounds.get() + 2 * blocks;
  call.column_end = d_bounds.get() + 3 * blocks;
  call.ranges = d_ranges.get();
  call.columns = d_columns.get();
  call.keys_read = d_reads.get();
  ASSERT_EQ(cuda::build_sparse_plan(call, nullptr), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  const auto bounds = d_bounds.download(), got_ranges = d_ranges.download(), got_columns = d_columns.download();
  EXPECT_EQ(int64_t(d_reads.download()[0]), want.keys_read);
  for (size_t h = 0; h < build.size(); ++h)
    for (int32_t j = 0; j < build[h].n_blocks; ++j) {
      SCOPED_TRACE("head " + std::to_string(h) + " block " + std::to_string(j));
      const int32_t b = build[h].at + j, qb = build[h].first_block + j;
      const std::vector<int32_t> r(got_ranges.begin() + 2 * bounds[size_t(b)],
                                   got_ranges.begin() + 2 * bounds[size_t(blocks + b)]);
      const std::vector<int32_t> c(got_columns.begin() + bounds[size_t(2 * blocks + b)],
                                   got_columns.begin() + bounds[size_t(3 * blocks + b)]);
      const auto wr = want.block_ranges(int32_t(h), qb), wc = want.block_columns(int32_t(h), qb);
      EXPECT_EQ(r, std::vector<int32_t>(wr.begin(), wr.end()));
      EXPECT_EQ(c, std::vector<int32_t>(wc.begin(), wc.end()));
    }
}

}  // namespace test_cuda_sparse_prefill
}  // namespace inferlab::kernels
