// Re-rotation of moved keys with cache positions (StreamingLLM). The CUDA
// backend stores f16/bf16 keys and turns a moved key from its original (the
// row as first written) rather than from its last rotation; the bookkeeping of
// which tokens have a saved original follows the tokens through appends,
// eviction, clones and truncation. The arithmetic case below is the reason,
// with the device kernels' CPU twins: turning the stored key by one position
// per eviction drifts (a low-frequency pair's one-position turn is smaller than
// an f16/bf16 ulp, so each rounding loses much of it and the error grows with
// every move), while turning the original rounds once.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>
#include <random>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/cpu_twins.h"
#include "engine/kv_cache.h"

namespace inferlab {
namespace test_rerotation {

namespace cpu = kernels::cpu;
using kernels::DType;

// The first K value of the row at (pool page, slot).
float key_at(const KvPagePool& pool, int32_t page, int32_t slot) { return pool.k(page)[slot * pool.shape().head_dim]; }

// Saved originals live in origin pages of the same pool; they move with their
// tokens through eviction, are copied by clone and freed with their tokens.
TEST(Rerotation, OriginPagesFollowTheTokens) {
  auto pool = std::make_shared<KvPagePool>(KvCacheShape{1, 1, 4, 4}, /*pages_per_chunk=*/8);
  auto seq = std::make_unique<KvSequence>(pool);
  const auto row = [](float x) { return std::vector<float>(4, x); };
  for (int32_t p = 0; p < 10; ++p) seq->append(0, 0, row(float(p)).data(), row(0).data(), p);
  HeadPageTable& t = seq->table(0, 0);
  ASSERT_TRUE(seq->evict(0, 0, {0}).ok());
  EXPECT_TRUE(t.origin.empty());  // nothing saved: no bookkeeping, no pages (the CPU backend's case)
  EXPECT_TRUE(t.origin_pages.empty());
  EXPECT_EQ(seq->pages_held(), 3);

  // As a backend saves them: the keys of positions 5 and 7 (indices 4 and 6, logical page 1).
  for (int32_t i : {4, 6}) {
    const int32_t page = seq->origin_page(0, 0, i / 4);
    std::copy_n(row(1000.0f + float(t.positions[size_t(i)])).data(), 4, pool->k(page) + (i % 4) * 4);
    t.origin[size_t(i)] = i;
  }
  EXPECT_EQ(t.origin_pages[0], -1);
  EXPECT_GE(t.origin_pages[1], 0);
  EXPECT_EQ(seq->pages_held(), 4);
  EXPECT_EQ(pool->pages_in_use(), 4);
  seq->append(0, 0, row(10).data(), row(0).data(), 10);
  const int32_t next[2] = {11, 12};
  seq->reserve(0, 0, 2, next, next);
  EXPECT_EQ(t.origin, (std::vector<int32_t>{-1, -1, -1, -1, 4, -1, 6, -1, -1, -1, -1, -1}));
  EXPECT_EQ(t.origin_pages.size(), t.pages.size());

  // Positions 5 and 7 move down to logical page 0, which gets an origin page; their originals go along.
  ASSERT_TRUE(seq->evict(0, 0, {1, 2, 5}).ok());
  EXPECT_EQ(t.positions, (std::vector<int32_t>{1, 4, 5, 7, 8, 9, 10, 11, 12}));
  EXPECT_EQ(t.origin, (std::vector<int32_t>{-1, -1, 4, 6, -1, -1, -1, -1, -1}));
  ASSERT_GE(t.origin_pages[0], 0);
  EXPECT_EQ(key_at(*pool, t.origin_pages[0], 2), 1005.0f);
  EXPECT_EQ(key_at(*pool, t.origin_pages[0], 3), 1007.0f);
  EXPECT_EQ(key_at(*pool, t.pages[0], 2), 5.0f);  // the keys themselves moved as ever
  EXPECT_EQ(seq->pages_held(), 5);                // 3 pages, origin pages of logical pages 0 and 1

  // A clone has its own origin pages with the same originals.
  auto copy = seq->clone();
  const HeadPageTable& c = copy->table(0, 0);
  EXPECT_EQ(c.origin, t.origin);
  ASSERT_GE(c.origin_pages[0], 0);
  EXPECT_NE(c.origin_pages[0], t.origin_pages[0]);
  EXPECT_EQ(key_at(*pool, c.origin_pages[0], 2), 1005.0f);
  EXPECT_EQ(key_at(*pool, c.origin_pages[0], 3), 1007.0f);
  EXPECT_EQ(copy->pages_held(), 5);

  // Pages left empty go back with their origin pages.
  ASSERT_TRUE(seq->evict(0, 0, {4, 5, 6, 7, 8}).ok());
  EXPECT_EQ(t.positions, (std::vector<int32_t>{1, 4, 5, 7}));
  EXPECT_EQ(t.origin_pages.size(), 1u);
  EXPECT_EQ(key_at(*pool, t.origin_pages[0], 3), 1007.0f);
  EXPECT_EQ(seq->pages_held(), 2);
  seq->truncate(6);
  EXPECT_EQ(t.origin, (std::vector<int32_t>{-1, -1, 4}));
  EXPECT_EQ(seq->pages_held(), 2);
  seq->truncate(0);
  EXPECT_TRUE(t.origin.empty());
  EXPECT_EQ(seq->pages_held(), 0);
  EXPECT_EQ(pool->pages_in_use(), copy->pages_held());
  copy.reset();
  EXPECT_EQ(pool->pages_in_use(), 0);
}

// ||a - b|| / ||b||.
double relative_error(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff += double(a[i] - b[i]) * double(a[i] - b[i]);
    ref += double(b[i]) * double(b[i]);
  }
  return std::sqrt(diff / ref);
}

// One page of `rows` keys (head_dim 64) in dtype, on the host, in the layout
// of the device pages, so the kernels' CPU twins run on it.
struct KeyPage {
  static constexpr int32_t kHeadDim = 64;
  std::vector<uint8_t> bytes;
  void* base = nullptr;
  kernels::KvPages kv;
  KeyPage(DType dtype, int32_t rows) : bytes(size_t(2 * rows * kHeadDim * dtype_bytes(dtype))) {
    base = bytes.data();
    kv = {&base, 1, rows, kHeadDim, dtype};
  }
  std::vector<float> keys() const {
    std::vector<float> out(size_t(kv.page_size * kHeadDim));
    cpu::convert_to_float(bytes.data(), kv.dtype, int64_t(out.size()), out.data());
    return out;
  }
};

// 4096 evictions, each moving 64 keys down by one index (a StreamingLLM
// stream keeps a key through `window` of them): the f32 composition (the CPU
// backend) against the stored key turned in place each time (cpu::kv_rope_shift,
// twin of the old device path) and the original turned once by the total
// (twin of kv_rope_from_originals).
TEST(Rerotation, FromTheOriginalRoundsOnceWhereTurningInPlaceDrifts) {
  const int32_t rows = 64, hd = KeyPage::kHeadDim;
  for (DType dtype : {DType::F16, DType::BF16}) {
    // The unit roundoff of the stored type bounds one rounding's relative error.
    const double one_rounding = dtype == DType::F16 ? std::ldexp(1.0, -11) : std::ldexp(1.0, -8);
    KeyPage original(dtype, rows), in_place(dtype, rows);
    std::mt19937_64 rng(7);
    std::normal_distribution<float> normal(0.0f, 1.0f);
    std::vector<float> first(size_t(rows * hd));
    for (float& x : first) x = normal(rng);
    cpu::convert_from_float(first.data(), int64_t(first.size()), original.bytes.data(), dtype);
    in_place.bytes = original.bytes;
    std::vector<float> f32 = original.keys();  // the CPU backend's keys, turned in float32
    const size_t n = static_cast<size_t>(rows);
    std::vector<int32_t> page(n, 0), slot(n), minus_one(n, -1), total(n);
    for (int32_t r = 0; r < rows; ++r) slot[size_t(r)] = r;
    for (int32_t step = 1; step <= 4096; ++step) {
      cpu::rope_shift(f32.data(), rows, hd, hd, hd, -1, 10000.0f, false);
      cpu::kv_rope_shift(in_place.kv, page.data(), slot.data(), minus_one.data(), rows, hd, 10000.0f, false);
      if (step % 256 != 0) continue;
      KeyPage turned(dtype, rows);
      turned.bytes = original.bytes;
      std::fill(total.begin(), total.end(), -step);
      cpu::kv_rope_shift(turned.kv, page.data(), slot.data(), total.data(), rows, hd, 10000.0f, false);
      const double once = relative_error(turned.keys(), f32), drift = relative_error(in_place.keys(), f32);
      EXPECT_LT(once, one_rounding) << dtype_name(dtype) << " after " << step << " moves";
      // Already after 256 moves (a 256-token window) in-place turns are tens of roundings off.
      EXPECT_GT(drift, 10 * one_rounding) << dtype_name(dtype) << " after " << step << " moves";
    }
  }
}

}  // namespace test_rerotation
}  // namespace inferlab
