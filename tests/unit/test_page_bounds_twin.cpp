// The CPU twins of Quest's page bounds and selection by bound
// (cpu::page_bounds_update, cpu::page_select) on crafted inputs whose answers
// are worked out by hand. The GPU tests then hold the kernels to these twins.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "cpu/cpu_twins.h"
#include "cpu/half_convert.h"

namespace inferlab::kernels::cpu {
namespace test_page_bounds_twin {

constexpr float kSentinel = 9.0f;

// Keys of one page of a float pool with 4 slots of 3 channels.
void set_key(std::vector<float>& chunk, const KvPages& kv, int32_t page, int32_t slot, std::vector<float> key) {
  std::copy(key.begin(), key.end(), chunk.begin() + page * kv.page_elems() + slot * kv.head_dim);
}

TEST(CpuTwinsPageBounds, BoundsAreExtremaOfTheFilledSlotsOnly) {
  std::vector<float> chunk(3 * 2 * 4 * 3, 100.0f);  // 3 pages (K then V rows, 4 slots, head_dim 3)
  void* base = chunk.data();
  const KvPages kv{&base, 3, 4, 3, DType::F32};
  set_key(chunk, kv, 1, 0, {1, -2, 5});
  set_key(chunk, kv, 1, 1, {3, -1, 0});
  set_key(chunk, kv, 1, 2, {-4, 7, 2});
  set_key(chunk, kv, 1, 3, {-50, 50, -50});  // not filled: count 3
  set_key(chunk, kv, 2, 0, {0.5f, 0.25f, -0.75f});
  set_key(chunk, kv, 2, 1, {-50, 50, -50});
  std::vector<float> bounds(3 * 2 * 3, kSentinel);  // (pages, 2, head_dim)
  const std::vector<int32_t> pages = {1, 2}, counts = {3, 1};
  page_bounds_update(kv, bounds.data(), pages.data(), counts.data(), 2);
  const std::vector<float> expected = {kSentinel, kSentinel, kSentinel, kSentinel, kSentinel, kSentinel,  // page 0
                                       -4, -2, 0, 3, 7, 5,                                                // page 1
                                       0.5f, 0.25f, -0.75f, 0.5f, 0.25f, -0.75f};                         // page 2
  EXPECT_EQ(bounds, expected);
}

TEST(CpuTwinsPageBounds, F16BoundsAreStoredKeys) {
  const std::vector<float> keys = {1.5f, -0.1f, 0.1f, -3.0f};  // slots 0 and 1, head_dim 2
  std::vector<uint16_t> chunk(2 * 2 * 2, float_to_f16(42.0f));  // one page of 2 slots
  convert_from_float(keys.data(), 4, chunk.data(), DType::F16);
  void* base = chunk.data();
  const KvPages kv{&base, 1, 2, 2, DType::F16};
  std::vector<uint16_t> bounds(4);
  const int32_t page = 0, count = 2;
  page_bounds_update(kv, bounds.data(), &page, &count, 1);
  const std::vector<uint16_t> expected = {float_to_f16(0.1f), float_to_f16(-3.0f), float_to_f16(1.5f),
                                          float_to_f16(-0.1f)};
  EXPECT_EQ(bounds, expected);
}

// Three kv heads of two query heads, head_dim 2, pages of 4 tokens. Head 0
// holds 18 tokens (5 pages); its queries (1, -1) and (2, 0.5) score a page
//   3 * max_0 - min_1 + 0.5 * max_1
// (a negative query takes the minimum), so logical pages 0 .. 3 score 3, 4, 4,
// 10. Head 1 keeps nothing; head 2 (9 tokens, 3 pages) keeps only its last.
struct CraftedSelection {
  std::vector<float> bounds = {
      0, -4,    0, 0,    // physical 0 = head 0's page 1: score 4
      0, -10,   0, 0,    // physical 1 = page 3: 10
      100, 100, 100, 100,  // physical 2 = page 4, the last: never scored
      0, 0,     1, 0,    // physical 3 = page 0: 3
      -1, 0,    1, 2,    // physical 4 = page 2: 3 + 0 + 1 = 4
  };  // (physical pages, 2, head_dim)
  std::vector<int32_t> table = {3, 0, 4, 1, 2, 0, 1, 2, 3, 4, 4, 3, 2, 1, 0};  // (3, 5)
  std::vector<float> q = {1, -1, 2, 0.5f, 7, 7, 7, 7, 1, 1, 1, 1};           // (6, 2)
  std::vector<int32_t> n_cached = {18, 18, 9}, keep = {0, 0, 1}, out_offset = {0, 4, 7};
  std::vector<int32_t> out = std::vector<int32_t>(9, -1);
  std::vector<float> scores = std::vector<float>(3 * 5, kSentinel);  // (3, score stride 5)

  std::vector<int32_t> select(int32_t keep0) {
    keep[0] = keep0;
    std::fill(out.begin(), out.end(), -1);
    page_select({3, 2, 2, 4, DType::F32, bounds.data(), {table.data(), 5}, q.data(), n_cached.data(), keep.data(),
                 out_offset.data(), out.data(), scores.data(), 5});
    return out;
  }
};

TEST(CpuTwinsPageBounds, SelectKeepsTheBestPagesAscendingThenTheLast) {
  CraftedSelection s;
  // keep 3: pages 3 (score 10) and 1 (4, tied with page 2: the lower page wins).
  EXPECT_EQ(s.select(3), (std::vector<int32_t>{1, 3, 4, -1, -1, -1, -1, 2, -1}));
  EXPECT_EQ(std::vector<float>(s.scores.begin(), s.scores.begin() + 5), (std::vector<float>{3, 4, 4, 10, kSentinel}));
  EXPECT_EQ(std::vector<float>(s.scores.begin() + 5, s.scores.begin() + 10), std::vector<float>(5, kSentinel))
      << "head 1 keeps nothing";
  EXPECT_EQ(s.select(2), (std::vector<int32_t>{3, 4, -1, -1, -1, -1, -1, 2, -1}));
  EXPECT_EQ(s.select(4), (std::vector<int32_t>{1, 2, 3, 4, -1, -1, -1, 2, -1}));
}

// Per query head: head 0's query heads score pages 0 .. 3 on their own as
// (1, 4, 1, 10) and (2, 0, 3, 0); head 2's two heads are equal, so their union
// is one selection and leaves a slot unused (-1, first).
TEST(CpuTwinsPageBounds, PerHeadSelectsTheUnionOfEachHeadsBestPages) {
  CraftedSelection s;
  auto select = [&](int32_t keep0) {
    s.keep = {keep0, 0, 2};
    const std::vector<int32_t> offset = {0, 2 * (keep0 - 1) + 1, 2 * (keep0 - 1) + 1};
    std::vector<int32_t> out(size_t(offset[2] + 3), -5);
    std::vector<uint32_t> heads(out.size(), 99u);
    std::vector<float> scores(3 * 2 * 5, kSentinel);  // (kv heads, query heads of the group, stride 5)
    PageSelectCall call{3, 2, 2, 4, DType::F32, s.bounds.data(), {s.table.data(), 5}, s.q.data(), s.n_cached.data(),
                        s.keep.data(), offset.data(), out.data(), scores.data(), 5};
    call.per_head = 1;
    call.out_heads = heads.data();
    page_select(call);
    EXPECT_EQ(std::vector<float>(scores.begin(), scores.begin() + 4), (std::vector<float>{1, 4, 1, 10}));
    EXPECT_EQ(std::vector<float>(scores.begin() + 5, scores.begin() + 9), (std::vector<float>{2, 0, 3, 0}));
    return std::pair{out, heads};
  };
  // keep 2: head 0 reads page 3, head 1 page 2, both the last.
  EXPECT_EQ(select(2), std::pair(std::vector<int32_t>{2, 3, 4, -1, 0, 2},
                                 std::vector<uint32_t>{0b10, 0b01, 0b11, 0, 0b11, 0b11}));
  // keep 3: pages 3 and 1 for head 0, 2 and 0 for head 1: every page, in 5 slots.
  EXPECT_EQ(select(3), std::pair(std::vector<int32_t>{0, 1, 2, 3, 4, -1, 0, 2},
                                 std::vector<uint32_t>{0b10, 0b01, 0b10, 0b01, 0b11, 0, 0b11, 0b11}));
  // keep 1: the last page, for both.
  EXPECT_EQ(select(1), std::pair(std::vector<int32_t>{4, -1, 0, 2}, std::vector<uint32_t>{0b11, 0, 0b11, 0b11}));
}

TEST(CpuTwinsPageBounds, KeepOneSelectsOnlyTheLastPage) {
  CraftedSelection s;
  EXPECT_EQ(s.select(1), (std::vector<int32_t>{4, -1, -1, -1, -1, -1, -1, 2, -1}));
}

TEST(CpuTwinsPageBounds, EqualScoresGoToTheLowerPages) {
  // One kv head, one query head, head_dim 1, pages of 1 token: 10 pages of
  // equal bounds on physical pages 9 .. 0.
  const std::vector<float> bounds(10 * 2, 0.5f), q = {3.0f};
  const std::vector<int32_t> table = {9, 8, 7, 6, 5, 4, 3, 2, 1, 0}, n_cached = {10}, keep = {4}, offset = {0};
  std::vector<int32_t> out(4, -1);
  std::vector<float> scores(10);
  page_select({1, 1, 1, 1, DType::F32, bounds.data(), {table.data(), 10}, q.data(), n_cached.data(), keep.data(),
               offset.data(), out.data(), scores.data(), 10});
  EXPECT_EQ(out, (std::vector<int32_t>{0, 1, 2, 9}));
}

TEST(CpuTwinsPageBounds, InfiniteBoundsTimesAZeroQueryChannel) {
  // Keys that overflowed f16 leave infinite bounds; the query's channel 1 is 0.
  // A NaN product gives way to the other one (fmaxf); a page whose products
  // are both NaN scores -infinity and ranks last.
  const float inf = std::numeric_limits<float>::infinity();
  const std::vector<float> bounds = {9, -inf, 9, inf,  // page 0: both products of channel 1 NaN
                                     1, 0, 1, inf,     // page 1: 1 + max(0, NaN) = 1
                                     0.5f, 0, 0.5f, 0, // page 2: 0.5
                                     0, 0, 0, 0},      // page 3, the last
      q = {1, 0};
  const std::vector<int32_t> table = {0, 1, 2, 3}, n_cached = {4}, keep = {3}, offset = {0};
  std::vector<int32_t> out(3, -1);
  std::vector<float> scores(4);
  page_select({1, 1, 2, 1, DType::F32, bounds.data(), {table.data(), 4}, q.data(), n_cached.data(), keep.data(),
               offset.data(), out.data(), scores.data(), 4});
  EXPECT_EQ(std::vector<float>(scores.begin(), scores.begin() + 3), (std::vector<float>{-inf, 1, 0.5f}));
  EXPECT_EQ(out, (std::vector<int32_t>{1, 2, 3}));
}

}  // namespace test_page_bounds_twin
}  // namespace inferlab::kernels::cpu
