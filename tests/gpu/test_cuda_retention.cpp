// Engine-side retention on the GPU (kernels/cuda/retention.cu) and the slot
// planes its scores live in (kv_cache_ops.cu), against their CPU twins, which
// are the host reference the CPU backend uses: the same scores bit for bit
// and the same dropped tokens, on crafted and random scores with ties, NaN,
// sinks, windows, budgets of zero and budgets that keep everything.
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "cpu/cpu_twins.h"
#include "cuda/kv_cache_ops.cuh"
#include "cuda/retention.cuh"
#include "gpu_kernel_support.h"
#include "gpu_test_support.h"

namespace inferlab::kernels {
namespace test_cuda_retention {

using gpu_test::DeviceBuffer;

struct RetentionCase {
  std::string label;
  int32_t n_kv_heads, page_size, n_rows, max_cached;
  int32_t rule;   // 0 accumulated, 1 last
  int32_t levels; // scores drawn from this many values (ties), 0: continuous
  bool nan;       // a NaN mass somewhere
  std::string name() const { return label; }
};

class CudaRetention : public testing::TestWithParam<RetentionCase> {};

TEST_P(CudaRetention, ScoresAndDropsMatchTheTwin) {
  INFERLAB_REQUIRE_GPU();
  const RetentionCase& p = GetParam();
  std::mt19937_64 rng(17);
  const int32_t nkv = p.n_kv_heads, ps = p.page_size;
  const int32_t stride = p.max_cached + p.n_rows;
  const int32_t pages_per_head = (stride + ps - 1) / ps;
  // Each head's pages at shuffled physical ids; every head a different count.
  const auto ids = gpu_test::shuffled_ids(nkv * pages_per_head, 3);
  std::vector<int32_t> table(ids.begin(), ids.end()), cached(static_cast<size_t>(nkv)), budget;
  for (int32_t g = 0; g < nkv; ++g) {
    cached[size_t(g)] = int32_t(rng() % uint64_t(p.max_cached + 1));
    const int32_t n = cached[size_t(g)] + p.n_rows;
    const int32_t sink = int32_t(rng() % 5), recent = int32_t(rng() % 9);
    // Heads cycle through: drop some, keep everything (heavy < 0), heavy 0, a budget covering the head.
    const int32_t heavy = g % 4 == 0 ? std::max(0, n / 3) : g % 4 == 1 ? -1 : g % 4 == 2 ? 0 : n;
    budget.insert(budget.end(), {sink, recent, heavy});
  }
  auto draw = [&] {
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    return p.levels > 0 ? float(rng() % uint64_t(p.levels)) / float(p.levels) : u(rng);
  };
  std::vector<float> plane(size_t(nkv * pages_per_head * ps)), mass(size_t(nkv) * size_t(stride));
  for (float& x : plane) x = draw();
  for (float& x : mass) x = draw();
  if (p.nan) mass[size_t(stride / 2)] = std::numeric_limits<float>::quiet_NaN();

  DeviceBuffer<int32_t> d_table(table), d_cached(cached), d_budget(budget);
  DeviceBuffer<float> d_plane(plane), d_mass(mass), d_scores(size_t(nkv) * stride);
  DeviceBuffer<int32_t> d_drops(size_t(nkv) * stride), d_counts{size_t(nkv)};
  RetentionCall call;
  call.n_kv_heads = nkv;
  call.page_size = ps;
  call.table = {d_table.get(), pages_per_head};
  call.plane = d_plane.get();
  call.n_cached = d_cached.get();
  call.n_rows = p.n_rows;
  call.mass = d_mass.get();
  call.mass_stride = stride;
  call.rule = p.rule;
  call.budget = d_budget.get();
  call.scores = d_scores.get();
  call.drops = d_drops.get();
  call.n_drops = d_counts.get();
  call.stride = stride;
  INFERLAB_CUDA_OK(cuda::retention_update(call, stride, nullptr));
  INFERLAB_CUDA_OK(cuda::retention_select(call, nullptr));
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());

  std::vector<float> scores(size_t(nkv) * stride, 0.0f);
  std::vector<int32_t> drops(size_t(nkv) * stride, 0), counts(size_t(nkv), 0);
  RetentionCall twin = call;
  twin.table.pages = table.data();
  twin.plane = plane.data();
  twin.n_cached = cached.data();
  twin.mass = mass.data();
  twin.budget = budget.data();
  twin.scores = scores.data();
  twin.drops = drops.data();
  twin.n_drops = counts.data();
  cpu::retention_update(twin);
  cpu::retention_select(twin);

  const auto got_plane = d_plane.download(), got_scores = d_scores.download();
  const auto got_counts = d_counts.download(), got_drops = d_drops.download();
  for (size_t i = 0; i < plane.size(); ++i)
    ASSERT_TRUE(got_plane[i] == plane[i] || (std::isnan(got_plane[i]) && std::isnan(plane[i]))) << "slot " << i;
  for (int32_t g = 0; g < nkv; ++g) {
    const int32_t n = cached[size_t(g)] + p.n_rows;
    for (int32_t t = 0; t < n; ++t)
      ASSERT_EQ(got_scores[size_t(g) * stride + t], scores[size_t(g) * stride + t]) << "head " << g << " token " << t;
    ASSERT_EQ(got_counts[size_t(g)], counts[size_t(g)]) << "head " << g;
    for (int32_t j = 0; j < counts[size_t(g)]; ++j)
      ASSERT_EQ(got_drops[size_t(g) * stride + j], drops[size_t(g) * stride + j]) << "head " << g << " drop " << j;
  }
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CudaRetention,
    testing::Values(RetentionCase{"decode_gqa8_accumulated", 8, 16, 1, 300, 0, 0, false},
                    RetentionCase{"prefill_ties_last", 4, 7, 37, 100, 1, 3, false},
                    RetentionCase{"ties_everywhere", 4, 16, 1, 2000, 0, 2, false},
                    RetentionCase{"nan_mass", 4, 16, 5, 500, 0, 0, true},
                    RetentionCase{"long_head", 2, 16, 1, 70000, 0, 64, false},
                    RetentionCase{"one_head_page1", 1, 1, 3, 40, 1, 0, false}),
    gpu_test::param_name<RetentionCase>);

// Retention per sequence: scores by position summed over heads, drops that
// cascade from shallower layers, the same choice as the twin.
struct SequenceCase {
  std::string label;
  int32_t n_kv_heads, n_tokens, layer, sink, recent, heavy;
  int32_t levels;  // 0: continuous scores
  std::string name() const { return label; }
};

class CudaSequenceRetention : public testing::TestWithParam<SequenceCase> {};

TEST_P(CudaSequenceRetention, ScoresAndDropsMatchTheTwin) {
  INFERLAB_REQUIRE_GPU();
  const SequenceCase& p = GetParam();
  std::mt19937_64 rng(23);
  const int32_t n = p.n_tokens, capacity = 2 * n + 10;
  std::vector<int32_t> positions;
  for (int32_t pos = 0; int32_t(positions.size()) < n; ++pos)
    if (rng() % 4 != 0) positions.push_back(pos);  // gaps: tokens evicted earlier
  auto draw = [&] {
    std::uniform_real_distribution<float> u(0.0f, 1.0f);
    return p.levels > 0 ? float(rng() % uint64_t(p.levels)) / float(p.levels) : u(rng);
  };
  std::vector<float> score(static_cast<size_t>(capacity), 0.0f), mass(size_t(p.n_kv_heads) * size_t(n), 0.0f);
  for (float& x : score) x = draw();
  for (float& x : mass) x = draw();
  std::vector<int32_t> dropped_at(size_t(capacity), 0);
  for (int32_t& d : dropped_at) d = rng() % 5 == 0 ? int32_t(rng() % uint64_t(p.layer + 3)) : 0;  // some before, some after this layer

  DeviceBuffer<int32_t> d_positions(positions), d_dropped(dropped_at), d_scratch(size_t(3 * n));
  DeviceBuffer<int32_t> d_drops{static_cast<size_t>(n)}, d_count{size_t(1)};
  DeviceBuffer<float> d_score(score), d_mass(mass);
  SequenceRetentionCall call;
  call.n_kv_heads = p.n_kv_heads;
  call.n_tokens = n;
  call.layer = p.layer;
  call.positions = d_positions.get();
  call.mass = d_mass.get();
  call.mass_stride = n;
  call.score = d_score.get();
  call.dropped_at = d_dropped.get();
  call.sink = p.sink;
  call.recent = p.recent;
  call.heavy = p.heavy;
  call.scratch = d_scratch.get();
  call.drops = d_drops.get();
  call.n_drops = d_count.get();
  INFERLAB_CUDA_OK(cuda::sequence_retention_update(call, nullptr));
  INFERLAB_CUDA_OK(cuda::sequence_retention_select(call, nullptr));
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());

  std::vector<int32_t> drops(static_cast<size_t>(n), 0), count(1, 0);
  SequenceRetentionCall twin = call;
  twin.positions = positions.data();
  twin.mass = mass.data();
  twin.score = score.data();
  twin.dropped_at = dropped_at.data();
  twin.scratch = nullptr;
  twin.drops = drops.data();
  twin.n_drops = count.data();
  cpu::sequence_retention_update(twin);
  cpu::sequence_retention_select(twin);

  EXPECT_EQ(d_score.download(), score);
  EXPECT_EQ(d_dropped.download(), dropped_at);
  ASSERT_EQ(d_count.download()[0], count[0]);
  const auto got = d_drops.download();
  EXPECT_EQ(std::vector<int32_t>(got.begin(), got.begin() + count[0]),
            std::vector<int32_t>(drops.begin(), drops.begin() + count[0]));
}

INSTANTIATE_TEST_SUITE_P(
    Cases, CudaSequenceRetention,
    testing::Values(SequenceCase{"gqa8_layer3", 8, 700, 3, 4, 16, 100, 0},
                    SequenceCase{"ties", 2, 2000, 1, 0, 8, 500, 3},
                    SequenceCase{"heavy0_layer0", 4, 100, 0, 2, 2, 0, 0},
                    SequenceCase{"keep_all_but_cascade", 4, 300, 2, 0, 0, -1, 0},
                    SequenceCase{"long", 1, 40000, 5, 4, 64, 4000, 16}),
    gpu_test::param_name<SequenceCase>);

TEST(CudaSlotPlanes, FillMoveAndCopyMatchTheTwins) {
  INFERLAB_REQUIRE_GPU();
  const int32_t ps = 16, nkv = 3, pages = 40;
  std::mt19937 rng(5);
  std::vector<uint32_t> plane(size_t(pages * ps));
  for (uint32_t& x : plane) x = rng();
  std::vector<int32_t> table = gpu_test::shuffled_ids(pages, 9), first = {0, 17, 33};
  DeviceBuffer<uint32_t> d_plane(plane);
  DeviceBuffer<int32_t> d_table(table), d_first(first);
  const LayerPageTable host_table{table.data(), 13}, device_table{d_table.get(), 13};
  INFERLAB_CUDA_OK(cuda::slot_plane_fill(device_table, d_first.get(), 5, nkv, ps, d_plane.get(), 7u, nullptr));
  cpu::slot_plane_fill(host_table, first.data(), 5, nkv, ps, plane.data(), 7u);
  // Compaction-like chained moves: each destination was a source of an earlier move.
  std::vector<int32_t> src_page, src_slot, dst_page, dst_slot;
  for (int32_t i = 0; i < 50; ++i) {
    src_page.push_back(table[size_t((i + 3) / ps)]);
    src_slot.push_back((i + 3) % ps);
    dst_page.push_back(table[size_t(i / ps)]);
    dst_slot.push_back(i % ps);
  }
  DeviceBuffer<int32_t> a(src_page), b(src_slot), c(dst_page), d(dst_slot);
  DeviceBuffer<uint32_t> scratch(src_page.size());
  INFERLAB_CUDA_OK(cuda::slot_plane_move(d_plane.get(), ps, a.get(), b.get(), c.get(), d.get(), 50, scratch.get(), nullptr));
  cpu::slot_plane_move(plane.data(), ps, src_page.data(), src_slot.data(), dst_page.data(), dst_slot.data(), 50);
  std::vector<uint32_t> other(plane.size(), 0);
  DeviceBuffer<uint32_t> d_other(other);
  const std::vector<int32_t> from = {3, 9, 27}, to = {0, 39, 12};
  DeviceBuffer<int32_t> d_from(from), d_to(to);
  INFERLAB_CUDA_OK(cuda::slot_plane_copy_pages(d_plane.get(), d_other.get(), ps, d_from.get(), d_to.get(), 3, nullptr));
  cpu::slot_plane_copy_pages(plane.data(), other.data(), ps, from.data(), to.data(), 3);
  INFERLAB_CUDA_OK(cudaDeviceSynchronize());
  EXPECT_EQ(d_plane.download(), plane);
  EXPECT_EQ(d_other.download(), other);
}

}  // namespace test_cuda_retention
}  // namespace inferlab::kernels
