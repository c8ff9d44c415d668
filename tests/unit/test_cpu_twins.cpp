// CPU twins of the CUDA kernels (kernels/cpu/cpu_twins.h) against direct
// computations on crafted inputs. The GPU tests then hold the kernels to these.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/cpu_twins.h"
#include "cpu/half_convert.h"

namespace inferlab::kernels::cpu {
namespace test_cpu_twins {

// A host page pool: chunks of pages_per_chunk pages, every element a distinct
// sentinel so untouched slots can be told apart.
struct HostPool {
  std::vector<std::vector<float>> chunks;  // F32 storage; (pages_per_chunk, 2, page_size, head_dim) each
  std::vector<void*> bases;
  KvPages kv;

  HostPool(int32_t n_chunks, int32_t pages_per_chunk, int32_t page_size, int32_t head_dim) {
    kv.pages_per_chunk = pages_per_chunk;
    kv.page_size = page_size;
    kv.head_dim = head_dim;
    kv.dtype = DType::F32;
    for (int32_t c = 0; c < n_chunks; ++c) {
      chunks.emplace_back(size_t(pages_per_chunk * kv.page_elems()));
      std::iota(chunks.back().begin(), chunks.back().end(), -1e6f * float(c + 1));
      bases.push_back(chunks.back().data());
    }
    kv.chunk_base = bases.data();
  }
};

TEST(CpuTwins, HalfConversionRoundsToNearestEven) {
  EXPECT_EQ(float_to_f16(1.0f), 0x3c00);
  EXPECT_EQ(float_to_f16(1.0f + 0x1p-11f), 0x3c00);       // tie: to even (down)
  EXPECT_EQ(float_to_f16(1.0f + 3 * 0x1p-11f), 0x3c02);   // tie: to even (up)
  EXPECT_EQ(float_to_f16(65504.0f), 0x7bff);
  EXPECT_EQ(float_to_f16(65520.0f), 0x7c00);              // rounds past the largest half
  EXPECT_EQ(float_to_f16(0x1p-24f), 0x0001);              // smallest subnormal
  EXPECT_EQ(float_to_f16(0x1p-25f), 0x0000);              // tie below it: to even (zero)
  EXPECT_EQ(float_to_f16(-2.0f), 0xc000);
  EXPECT_EQ(f16_to_float(0x0001), 0x1p-24f);
  EXPECT_EQ(float_to_bf16(1.0f + 0x1p-8f), 0x3f80);       // tie: to even
  EXPECT_EQ(float_to_bf16(1.0f + 3 * 0x1p-8f), 0x3f82);
  EXPECT_EQ(bf16_to_float(0xc040), -3.0f);
  for (uint32_t h = 0; h < 0x7c00; h += 7) EXPECT_EQ(float_to_f16(f16_to_float(uint16_t(h))), h);
}

TEST(CpuTwins, ConvertRoundTripsEachDtype) {
  const std::vector<float> x = {0.0f, 1.0f, -2.5f, 3.140625f, 1e-3f, 60000.0f};
  for (DType dtype : {DType::F32, DType::F16, DType::BF16}) {
    std::vector<uint32_t> stored(x.size());  // room for F32
    std::vector<float> back(x.size());
    convert_from_float(x.data(), int64_t(x.size()), stored.data(), dtype);
    convert_to_float(stored.data(), dtype, int64_t(x.size()), back.data());
    for (size_t i = 0; i < x.size(); ++i) EXPECT_NEAR(back[i], x[i], std::fabs(x[i]) * 4e-3f) << dtype_name(dtype);
  }
}

TEST(CpuTwins, EmbeddingLookupWidensRows) {
  const int64_t n_embd = 3;
  const std::vector<float> table = {0, 1, 2, 10, 11, 12, 20, 21, 22, 30, 31, 32};  // (4, 3)
  const std::vector<int32_t> ids = {2, 0, 2, 3};
  for (DType dtype : {DType::F32, DType::F16, DType::BF16}) {
    std::vector<uint32_t> stored(table.size());
    convert_from_float(table.data(), int64_t(table.size()), stored.data(), dtype);
    std::vector<float> out(ids.size() * n_embd);
    embedding_lookup(stored.data(), dtype, n_embd, ids.data(), int64_t(ids.size()), out.data());
    for (size_t r = 0; r < ids.size(); ++r)
      for (int64_t j = 0; j < n_embd; ++j) EXPECT_EQ(out[r * n_embd + j], table[ids[r] * n_embd + j]);
  }
}

TEST(CpuTwins, HeadOutputNormsSumRowNorms) {
  // (2 rows, 2 heads, head_dim 2): head 0 rows (3,4), (0,1); head 1 rows (6,8), (5,12).
  const std::vector<float> attn = {3, 4, 6, 8, 0, 1, 5, 12};
  std::vector<float> norms(2), l1(2);
  head_output_norms(attn.data(), 2, 2, 2, norms.data(), l1.data());
  EXPECT_FLOAT_EQ(norms[0], 5.0f + 1.0f);
  EXPECT_FLOAT_EQ(norms[1], 10.0f + 13.0f);
  EXPECT_FLOAT_EQ(l1[0], 7.0f + 1.0f);
  EXPECT_FLOAT_EQ(l1[1], 14.0f + 17.0f);
}

TEST(CpuTwins, GatherRowsCopiesSelectedRows) {
  const std::vector<uint16_t> w = {1, 2, 3, 4, 5, 6, 7, 8, 9};  // (3, 3) f16 bits
  const std::vector<int32_t> rows = {2, 2, 0};
  std::vector<uint16_t> out(9);
  gather_rows(w.data(), DType::F16, 3, rows.data(), 3, out.data());
  EXPECT_EQ(out, (std::vector<uint16_t>{7, 8, 9, 7, 8, 9, 1, 2, 3}));
}

TEST(CpuTwins, KvAppendPlacesRowsAcrossPageBoundaries) {
  HostPool pool(2, 3, 4, 3);  // 6 pages of 4 slots, head_dim 3
  const auto before = pool.chunks;
  const int32_t n_kv_heads = 2, n_rows = 7;
  const std::vector<int32_t> pages = {4, 1, 3, 0, 5, 2};  // (2 heads, stride 3)
  const std::vector<int32_t> first_token = {2, 5};        // head 0 spans 3 pages; head 1 starts in its page 1
  std::vector<float> k(size_t(n_rows * n_kv_heads * 3)), v(k.size());
  for (size_t i = 0; i < k.size(); ++i) k[i] = float(i), v[i] = 1000.0f + float(i);
  kv_append(pool.kv, {pages.data(), 3}, first_token.data(), k.data(), v.data(), n_rows, n_kv_heads);

  std::vector<std::vector<bool>> written(6, std::vector<bool>(4, false));  // (page, slot)
  for (int32_t g = 0; g < n_kv_heads; ++g) {
    for (int32_t i = 0; i < n_rows; ++i) {
      const int32_t t = first_token[g] + i, page = pages[g * 3 + t / 4], slot = t % 4;
      written[page][slot] = true;
      for (int32_t d = 0; d < 3; ++d) {
        EXPECT_EQ(kv_load(pool.kv, page, slot, false, d), k[(i * n_kv_heads + g) * 3 + d]) << g << " " << i;
        EXPECT_EQ(kv_load(pool.kv, page, slot, true, d), v[(i * n_kv_heads + g) * 3 + d]) << g << " " << i;
      }
    }
  }
  // Nothing else changed: compare the K and V rows of every unwritten slot.
  for (int32_t page = 0; page < 6; ++page)
    for (int32_t slot = 0; slot < 4; ++slot)
      for (int32_t kv_half = 0; kv_half < 2 && !written[page][slot]; ++kv_half)
        for (int32_t d = 0; d < 3; ++d) {
          const size_t at = size_t((page % 3) * pool.kv.page_elems() + (kv_half * 4 + slot) * 3 + d);
          EXPECT_EQ(pool.chunks[page / 3][at], before[page / 3][at]);
        }
}

// Stored token t of one head in pages {3, 0, 2} (page size 4) lives at (page, slot).
struct TokenAt {
  int32_t page, slot;
};
TokenAt token_at(int32_t t) { return {std::vector<int32_t>{3, 0, 2}[t / 4], t % 4}; }

TEST(CpuTwins, KvMoveRowsCompactionEqualsSequentialErase) {
  HostPool pool(1, 4, 4, 2);
  const int32_t n_tokens = 12;
  std::vector<float> expected_k;  // surviving tokens' first K element, in order
  std::vector<int32_t> src_page, src_slot, dst_page, dst_slot;
  const std::vector<bool> evict = {false, true, true, false, false, true, false, false, true, true, false, false};
  int32_t kept = 0;
  for (int32_t t = 0; t < n_tokens; ++t) {
    if (evict[t]) continue;
    expected_k.push_back(kv_load(pool.kv, token_at(t).page, token_at(t).slot, false, 0));
    if (kept != t) {  // moves chain: a destination was an earlier token's slot and another move's source
      src_page.push_back(token_at(t).page), src_slot.push_back(token_at(t).slot);
      dst_page.push_back(token_at(kept).page), dst_slot.push_back(token_at(kept).slot);
    }
    ++kept;
  }
  // Present the moves in reverse: only gather-then-scatter is order independent.
  std::reverse(src_page.begin(), src_page.end()), std::reverse(src_slot.begin(), src_slot.end());
  std::reverse(dst_page.begin(), dst_page.end()), std::reverse(dst_slot.begin(), dst_slot.end());
  std::vector<float> expected_v;
  for (int32_t t = 0; t < n_tokens; ++t)
    if (!evict[t]) expected_v.push_back(kv_load(pool.kv, token_at(t).page, token_at(t).slot, true, 1));
  kv_move_rows(pool.kv, src_page.data(), src_slot.data(), dst_page.data(), dst_slot.data(), int32_t(src_page.size()));
  for (int32_t t = 0; t < kept; ++t) {
    EXPECT_EQ(kv_load(pool.kv, token_at(t).page, token_at(t).slot, false, 0), expected_k[t]) << t;
    EXPECT_EQ(kv_load(pool.kv, token_at(t).page, token_at(t).slot, true, 1), expected_v[t]) << t;
  }
}

TEST(CpuTwins, KvMoveRowsSwapsRows) {
  HostPool pool(1, 2, 3, 2);
  const float a = kv_load(pool.kv, 0, 1, false, 0), b = kv_load(pool.kv, 1, 2, true, 1);
  const std::vector<int32_t> src_page = {0, 1}, src_slot = {1, 2}, dst_page = {1, 0}, dst_slot = {2, 1};
  kv_move_rows(pool.kv, src_page.data(), src_slot.data(), dst_page.data(), dst_slot.data(), 2);
  EXPECT_EQ(kv_load(pool.kv, 1, 2, false, 0), a);
  EXPECT_EQ(kv_load(pool.kv, 0, 1, true, 1), b);
}

// A fixed key row rotated to `position`, stored (F32 or F16) in slot 1 of page 2,
// then shifted by delta, against the key rotated to position + delta directly.
void check_rope_shift(DType dtype, bool neox, int32_t position, int32_t delta, int32_t rope_dim, double tolerance) {
  const int32_t head_dim = 8;
  const float theta = 10000.0f;
  std::vector<float> key(head_dim);
  for (int32_t d = 0; d < head_dim; ++d) key[d] = std::sin(1.7f * float(d) + 0.3f);
  std::vector<uint32_t> chunk(size_t(4 * 2 * 3 * head_dim));  // 4 pages of 3 slots, F32-sized
  void* base = chunk.data();
  KvPages kv{&base, 4, 3, head_dim, dtype};

  std::vector<float> rotated = key;
  rope(rotated.data(), 1, 1, head_dim, rope_dim, &position, theta, neox);
  const int64_t key_offset = (2 * 2 * 3 + 1) * head_dim;  // page 2 of (2, 3 slots, head_dim), slot 1
  convert_from_float(rotated.data(), head_dim, static_cast<char*>(base) + key_offset * dtype_bytes(dtype), dtype);

  const int32_t page = 2, slot = 1;
  kv_rope_shift(kv, &page, &slot, &delta, 1, rope_dim, theta, neox);

  std::vector<float> direct = key;
  const int32_t shifted = position + delta;
  rope(direct.data(), 1, 1, head_dim, rope_dim, &shifted, theta, neox);
  for (int32_t d = 0; d < head_dim; ++d)
    EXPECT_NEAR(kv_load(kv, page, slot, false, d), direct[d], tolerance)
        << dtype_name(dtype) << " neox=" << neox << " d=" << d;
}

TEST(CpuTwins, KvRopeShiftByDeltaEqualsRopeAtShiftedPosition) {
  for (bool neox : {false, true}) {
    check_rope_shift(DType::F32, neox, 37, -20, 8, 1e-4);
    check_rope_shift(DType::F32, neox, 5, 100, 8, 1e-4);
    check_rope_shift(DType::F32, neox, 90, -90, 4, 1e-4);  // partial rotary dims
    check_rope_shift(DType::F16, neox, 37, -20, 8, 2e-3);
  }
}

TEST(CpuTwins, KvCopyPagesCopiesWholePages) {
  HostPool pool(2, 2, 3, 2);
  const auto before = pool.chunks;
  const std::vector<int32_t> src = {0, 3}, dst = {2, 1};
  kv_copy_pages(pool.kv, src.data(), dst.data(), 2);
  const int64_t elems = pool.kv.page_elems();
  const auto page_of = [&](const std::vector<std::vector<float>>& chunks, int32_t p) {
    return std::vector<float>(chunks[p / 2].begin() + (p % 2) * elems, chunks[p / 2].begin() + (p % 2 + 1) * elems);
  };
  EXPECT_EQ(page_of(pool.chunks, 2), page_of(before, 0));
  EXPECT_EQ(page_of(pool.chunks, 1), page_of(before, 3));
  EXPECT_EQ(page_of(pool.chunks, 0), page_of(before, 0));
  EXPECT_EQ(page_of(pool.chunks, 3), page_of(before, 3));
}

TEST(CpuTwins, SampleTopPNearZeroIsArgmax) {
  std::vector<float> logits(101);
  for (size_t i = 0; i < logits.size(); ++i) logits[i] = std::sin(float(i) * 0.37f) * 4.0f;
  const auto best = int32_t(argmax(logits.data(), int64_t(logits.size())));
  for (float u : {0.0f, 0.3f, 0.999f}) {
    EXPECT_EQ(sample_top_p(logits.data(), int64_t(logits.size()), 0.8f, 1e-6f, u), best);
    EXPECT_EQ(sample_top_p(logits.data(), int64_t(logits.size()), 0.8f, 0.0f, u), best);
  }
  EXPECT_EQ(sample_top_p(logits.data(), int64_t(logits.size()), 0.0f, 0.9f, 0.5f), best);  // greedy
}

TEST(CpuTwins, SampleTopPWalksDescendingProbabilities) {
  // Probabilities 0.5, 0.1, 0.3, 0.1: descending order is ids 0, 2, 1, 3 (tie: lower id first).
  const std::vector<float> logits = {std::log(0.5f), std::log(0.1f), std::log(0.3f), std::log(0.1f)};
  const auto pick = [&](float top_p, float u) { return sample_top_p(logits.data(), 4, 1.0f, top_p, u); };
  // top_p 0.75 keeps {0, 2} (mass 0.8): target u * 0.8.
  EXPECT_EQ(pick(0.75f, 0.0f), 0);
  EXPECT_EQ(pick(0.75f, 0.6f), 0);   // 0.48 < 0.5
  EXPECT_EQ(pick(0.75f, 0.7f), 2);   // 0.56
  EXPECT_EQ(pick(0.75f, 0.99f), 2);
  // top_p 1 keeps all: cumulative 0.5, 0.8, 0.9, 1.0.
  EXPECT_EQ(pick(1.0f, 0.85f), 1);
  EXPECT_EQ(pick(1.0f, 0.95f), 3);
  // top_p 0.4 keeps only id 0.
  EXPECT_EQ(pick(0.4f, 0.99f), 0);
  // A high temperature flattens: logits / 100 are nearly uniform, so u picks by rank.
  EXPECT_EQ(sample_top_p(logits.data(), 4, 100.0f, 1.0f, 0.3f), 2);
}

TEST(CpuTwins, RandomNormalIsDeterministicAndStandard) {
  const int64_t n = 200000;
  double sum = 0, sum_sq = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = random_normal_value(7, i);
    ASSERT_EQ(x, random_normal_value(7, i));
    sum += x, sum_sq += double(x) * x;
  }
  EXPECT_NEAR(sum / n, 0.0, 0.01);
  EXPECT_NEAR(std::sqrt(sum_sq / n), 1.0, 0.01);
  EXPECT_NE(random_normal_value(7, 0), random_normal_value(8, 0));
  EXPECT_NE(random_normal_value(7, 0), random_normal_value(7, 1));

  std::vector<float> f32(1000);
  std::vector<uint16_t> f16(1000), bf16(1000);
  fill_random_normal(f32.data(), DType::F32, 1000, 3, 0.02f);
  fill_random_normal(f16.data(), DType::F16, 1000, 3, 0.02f);
  fill_random_normal(bf16.data(), DType::BF16, 1000, 3, 0.02f);
  for (int64_t i = 0; i < 1000; ++i) {
    EXPECT_EQ(f32[i], 0.02f * random_normal_value(3, i));
    EXPECT_EQ(f16[i], float_to_f16(f32[i]));
    EXPECT_EQ(bf16[i], float_to_bf16(f32[i]));
  }
}

}  // namespace test_cpu_twins
}  // namespace inferlab::kernels::cpu
