// MInference's index estimation on the device (cuda/sparse_prefill.cuh)
// against its CPU twins (cpu/sparse_prefill.h): vertical-slash scores from a
// paged f16/bf16/f32 cache (GQA, two kv heads holding different counts, the
// call's last rows), and the segmented top-k with ties, NaNs and always-kept
// entries (exact, same indices).
#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <vector>

#include "cpu/sparse_prefill.h"
#include "cuda/sparse_prefill.cuh"
#include "gpu_kernel_support.h"
#include "gpu_test_support.h"

namespace inferlab::kernels {
namespace {

using gpu_test::DeviceBuffer;
using gpu_test::MirrorPool;
using gpu_test::normalized_error;
using gpu_test::param_name;
using gpu_test::random_floats;
using gpu_test::shuffled_ids;

struct ScoresCase {
  DType dtype;
  int32_t head_dim;
  std::string name() const { return std::string(dtype_name(dtype)) + "_hd" + std::to_string(head_dim); }
};

class VerticalSlashScores : public testing::TestWithParam<ScoresCase> {};

TEST_P(VerticalSlashScores, MatchTheTwin) {
  INFERLAB_REQUIRE_GPU();
  const ScoresCase& tc = GetParam();
  const int32_t n_heads = 4, n_kv = 2, ps = 16, hd = tc.head_dim, call_rows = 40;
  const std::vector<int32_t> stored = {150, 97};  // per kv head, after the call's append
  const int32_t pages_per_head = (150 + ps - 1) / ps, n_pool = 2 * pages_per_head + 3;
  MirrorPool pool(tc.dtype, n_pool, ps, hd, 51);
  const auto order = shuffled_ids(n_pool, 52);
  std::vector<int32_t> table(size_t(n_kv * pages_per_head));
  for (size_t j = 0; j < table.size(); ++j) table[j] = order[j];
  const std::vector<int32_t> n_cached = {stored[0] - call_rows, stored[1] - call_rows};
  const auto q = random_floats(size_t(call_rows * n_heads * hd), 53);
  const std::vector<int32_t> heads = {0, 3, 2}, last_q = {8, 64, 1};  // 64 > call_rows: all rows
  const int32_t stride = 160, n_list = int32_t(heads.size());

  DeviceBuffer<int32_t> d_table(table), d_cached(n_cached), d_heads(heads), d_last(last_q);
  DeviceBuffer<float> d_q(q), d_vertical(size_t(n_list * stride)), d_slash(size_t(n_list * stride));
  VerticalSlashCall call;
  call.kv = pool.device();
  call.table = {d_table.get(), pages_per_head};
  call.n_heads = n_heads;
  call.n_kv_heads = n_kv;
  call.head_dim = hd;
  call.scale = 1.0f / std::sqrt(float(hd));
  call.q = d_q.get();
  call.call_rows = call_rows;
  call.n_cached = d_cached.get();
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
    const int32_t g = heads[size_t(i)] / (n_heads / n_kv), n_keys = stored[size_t(g)];
    // The twin on the host pool's keys, as f32 rows.
    std::vector<int32_t> page, slot;
    for (int32_t t = 0; t < n_keys; ++t) {
      page.push_back(table[size_t(g * pages_per_head + t / ps)]);
      slot.push_back(t % ps);
    }
    const auto keys = pool.key_rows(false, page, slot);
    const cpu::KvPageRef ref{keys.data(), keys.data(), n_keys};
    const int32_t rows = std::min(last_q[size_t(i)], call_rows);
    std::vector<int32_t> self;
    for (int32_t r = 0; r < rows; ++r) self.push_back(n_cached[size_t(g)] + call_rows - rows + r);
    std::vector<float> want_v(size_t(stride), 0.0f), want_s(size_t(stride), 0.0f), scratch;
    const float* q0 = q.data() + int64_t(call_rows - rows) * n_heads * hd + int64_t(heads[size_t(i)]) * hd;
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

}  // namespace
}  // namespace inferlab::kernels
