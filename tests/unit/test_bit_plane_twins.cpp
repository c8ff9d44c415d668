// The CPU twins of the CUDA kernels on bit-plane pages (kernels/cpu/cpu_twins.h):
// kv_append writes cpu::bit_plane_encode's record at each token's slot, moves
// and copies carry whole records, kv_load decodes both planes, and
// attention_row_progressive recomputes a row from both planes exactly when
// its largest MSB-plane probability is below the threshold. The GPU tests
// hold the device kernels to these.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/cpu_twins.h"

namespace inferlab::kernels::cpu {
namespace test_bit_plane_twins {

// A host pool of bit-plane pages, every byte 0xab until written.
struct PlanePool {
  std::vector<std::vector<uint8_t>> chunks;
  std::vector<void*> bases;
  KvPages kv;

  PlanePool(BitPlanes planes, int32_t n_chunks, int32_t pages_per_chunk, int32_t page_size, int32_t head_dim) {
    kv = {nullptr, pages_per_chunk, page_size, head_dim, DType::F16, planes};
    for (int32_t c = 0; c < n_chunks; ++c) {
      chunks.emplace_back(size_t(pages_per_chunk * kv.page_bytes()), uint8_t{0xab});
      bases.push_back(chunks.back().data());
    }
    kv.chunk_base = bases.data();
  }
  const uint8_t* record(int32_t page, int32_t slot, bool value) const {
    return chunks[size_t(page / kv.pages_per_chunk)].data() +
           (int64_t(page % kv.pages_per_chunk) * 2 * kv.page_size + (value ? kv.page_size : 0) + slot) * kv.row_bytes();
  }
};

std::vector<float> normal_rows(size_t n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> dist(0.0f, 1.0f);
  std::vector<float> x(n);
  for (float& v : x) v = dist(rng);
  return x;
}

// The device encoder (kv_cache_ops.cu) writes each byte of a record's planes
// with bit_plane_pack_byte from the row's grid values: for every width and
// odd head sizes those bytes are the host encoder's.
TEST(BitPlaneTwins, BytePackingIsTheHostEncodersPacking) {
  uint32_t seed = 0;
  for (int64_t hd : {5, 16, 24, 64, 128})
    for (int32_t msb = 1; msb <= 8; ++msb)
      for (int32_t lsb = msb == 1 ? 1 : 0; lsb <= 8; ++lsb) {
        const BitPlanes p{msb, lsb};
        const auto x = normal_rows(size_t(hd), ++seed);
        std::vector<uint8_t> record(size_t(bit_plane_row_bytes(hd, p)));
        bit_plane_encode(x.data(), hd, p, record.data());
        std::vector<uint16_t> levels(static_cast<size_t>(hd));
        for (int64_t i = 0; i < hd; ++i) {
          const uint32_t hi = bit_plane_get(record.data() + 4, i, msb);
          const uint32_t lo = lsb > 0 ? bit_plane_get(record.data() + 4 + bit_plane_bytes(hd, msb), i, lsb) : 0u;
          levels[size_t(i)] = uint16_t(hi << lsb | lo);
        }
        for (int64_t b = 0; b + 4 < int64_t(record.size()); ++b)
          ASSERT_EQ(bit_plane_pack_byte(levels.data(), hd, p, b), record[size_t(4 + b)])
              << "head_dim " << hd << ", planes " << msb << "+" << lsb << ", byte " << b;
      }
}

TEST(BitPlaneTwins, KvAppendWritesEachRowsRecordAtItsSlot) {
  const BitPlanes planes{3, 5};  // 3-bit values straddle bytes
  const int32_t hd = 24, ps = 4, n_rows = 6, nkv = 2;
  PlanePool pool(planes, 2, 3, ps, hd);
  EXPECT_EQ(pool.kv.row_bytes(), bit_plane_row_bytes(hd, planes));
  EXPECT_EQ(pool.kv.page_bytes(), 2 * ps * (4 + 9 + 15));
  const std::vector<int32_t> table = {4, 1, 5, -1, 0, 2, 3, -1};  // (nkv, 4) physical page of each logical page
  const std::vector<int32_t> first = {3, 1};
  const auto k = normal_rows(size_t(n_rows * nkv * hd), 1), v = normal_rows(k.size(), 2);
  kv_append(pool.kv, {table.data(), 4}, first.data(), k.data(), v.data(), n_rows, nkv);
  std::vector<uint8_t> want(size_t(pool.kv.row_bytes()));
  int64_t written = 0;
  for (int32_t g = 0; g < nkv; ++g)
    for (int32_t i = 0; i < n_rows; ++i) {
      const int32_t t = first[size_t(g)] + i, page = table[size_t(g * 4 + t / ps)], slot = t % ps;
      const float* src_k = &k[size_t((i * nkv + g) * hd)];
      bit_plane_encode(src_k, hd, planes, want.data());
      EXPECT_EQ(std::memcmp(pool.record(page, slot, false), want.data(), want.size()), 0) << g << " " << i;
      for (int32_t d = 0; d < hd; ++d)
        EXPECT_EQ(kv_load(pool.kv, page, slot, false, d), bit_plane_value(want.data(), hd, planes, d, true));
      bit_plane_encode(&v[size_t((i * nkv + g) * hd)], hd, planes, want.data());
      EXPECT_EQ(std::memcmp(pool.record(page, slot, true), want.data(), want.size()), 0) << g << " " << i;
      written += 2 * int64_t(want.size());
    }
  int64_t untouched = 0;
  for (const auto& chunk : pool.chunks) untouched += std::count(chunk.begin(), chunk.end(), uint8_t{0xab});
  EXPECT_GE(untouched, int64_t(pool.chunks.size() * pool.chunks[0].size()) - written);  // nothing else was written
}

TEST(BitPlaneTwins, MovesAndCopiesCarryWholeRecords) {
  const BitPlanes planes{5, 0};  // a 4 + 15-byte record: odd row bytes
  const int32_t hd = 24, ps = 3;
  PlanePool pool(planes, 2, 4, ps, hd);
  // Distinct records everywhere.
  const auto x = normal_rows(size_t(2 * 4 * 2 * ps * hd), 3);
  const int64_t rb = pool.kv.row_bytes();
  for (size_t c = 0; c < pool.chunks.size(); ++c)
    for (int64_t r = 0; r < 4 * 2 * ps; ++r)
      bit_plane_encode(&x[size_t((int64_t(c) * 4 * 2 * ps + r) * hd)], hd, planes, pool.chunks[c].data() + r * rb);
  const PlanePool before = pool;
  // Compaction of page 0's tokens 0..2 and page 5's: token (5, 1) -> (0, 0), (5, 2) -> (0, 1), a chain.
  const std::vector<int32_t> src_page = {5, 5, 0}, src_slot = {1, 2, 2}, dst_page = {0, 0, 5}, dst_slot = {0, 1, 1};
  PlanePool moved = before;
  moved.bases.clear();
  for (auto& chunk : moved.chunks) moved.bases.push_back(chunk.data());
  moved.kv.chunk_base = moved.bases.data();
  kv_move_rows(moved.kv, src_page.data(), src_slot.data(), dst_page.data(), dst_slot.data(), 3);
  for (int j = 0; j < 3; ++j)
    for (bool value : {false, true})
      EXPECT_EQ(std::memcmp(moved.record(dst_page[size_t(j)], dst_slot[size_t(j)], value),
                            before.record(src_page[size_t(j)], src_slot[size_t(j)], value), size_t(rb)),
                0)
          << "move " << j;
  const std::vector<int32_t> src = {1, 6}, dst = {7, 2};
  kv_copy_pages(pool.kv, src.data(), dst.data(), 2);
  for (int j = 0; j < 2; ++j)
    EXPECT_EQ(std::memcmp(pool.record(dst[size_t(j)], 0, false), before.record(src[size_t(j)], 0, false),
                          size_t(pool.kv.page_bytes())),
              0)
        << "page " << src[size_t(j)];
}

// Random keys over two pages: the row's largest MSB-plane probability p; a
// threshold just above p recomputes it from both planes (the result of
// attention_row_value_topk over the full rows), one just below keeps the MSB
// pass's (that over the MSB planes).
TEST(BitPlaneTwins, ProgressiveRowRefetchesExactlyBelowTheThreshold) {
  const BitPlanes planes{3, 5};
  const int64_t hd = 32, n = 70;
  const int64_t rb = bit_plane_row_bytes(hd, planes);
  std::vector<uint8_t> k(size_t(n * rb)), v(size_t(n * rb));
  const auto kx = normal_rows(size_t(n * hd), 4), vx = normal_rows(size_t(n * hd), 5), q = normal_rows(size_t(hd), 6);
  for (int64_t t = 0; t < n; ++t) {
    bit_plane_encode(&kx[size_t(t * hd)], hd, planes, &k[size_t(t * rb)]);
    bit_plane_encode(&vx[size_t(t * hd)], hd, planes, &v[size_t(t * rb)]);
  }
  const KvPageRef pages[2] = {{k.data(), v.data(), 30, DType::F32, planes, true},
                              {&k[size_t(30 * rb)], &v[size_t(30 * rb)], int32_t(n - 30), DType::F32, planes, true}};
  KvPageRef msb[2] = {pages[0], pages[1]};
  msb[0].lsb = msb[1].lsb = false;
  const float scale = 0.4f;
  for (double keep : {1.0, 0.3}) {
    std::vector<float> out_msb(hd), out_full(hd), out(hd), probs_msb(n), probs_full(n), probs(n);
    std::vector<uint8_t> kept_msb(n), kept_full(n), kept(n);
    attention_row_value_topk(q.data(), msb, 2, n, hd, scale, keep, true, out_msb.data(), probs_msb.data(),
                             kept_msb.data());
    attention_row_value_topk(q.data(), pages, 2, n, hd, scale, keep, true, out_full.data(), probs_full.data(),
                             kept_full.data());
    ASSERT_NE(out_msb, out_full) << "the LSB planes change nothing here";
    const float largest = *std::max_element(probs_msb.begin(), probs_msb.end());
    EXPECT_TRUE(attention_row_progressive(q.data(), pages, 2, n, hd, scale, keep, true, std::nextafter(largest, 1.0f),
                                          out.data(), probs.data(), kept.data()));
    EXPECT_EQ(out, out_full);
    EXPECT_EQ(probs, probs_full);
    EXPECT_EQ(kept, kept_full);
    EXPECT_FALSE(attention_row_progressive(q.data(), pages, 2, n, hd, scale, keep, true, largest, out.data(),
                                           probs.data(), kept.data()));
    EXPECT_EQ(out, out_msb);
    EXPECT_EQ(probs, probs_msb);
    EXPECT_EQ(kept, kept_msb);
  }
}

}  // namespace test_bit_plane_twins
}  // namespace inferlab::kernels::cpu
