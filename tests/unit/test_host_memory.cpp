// Huge-page host memory (model/host_memory.h): weights and CPU KV chunks.
#include <gtest/gtest.h>

#include <cstdint>
#include <cstring>

#include "engine/kv_cache.h"
#include "model/host_memory.h"

namespace inferlab {
namespace test_host_memory {

bool aligned_to(const void* p, std::uintptr_t to) { return reinterpret_cast<std::uintptr_t>(p) % to == 0; }

TEST(HostMemory, MapHugeIsAlignedZeroedAndWritable) {
  const std::size_t bytes = kHugePageBytes + 12345;
  auto* p = static_cast<unsigned char*>(map_huge(bytes));
  ASSERT_NE(p, nullptr);
  EXPECT_TRUE(aligned_to(p, kHugePageBytes));
  std::size_t nonzero = 0;
  for (std::size_t i = 0; i < bytes; i += 4096) nonzero += p[i] != 0;
  EXPECT_EQ(nonzero, 0u);
  std::memset(p, 0x5a, bytes);  // the whole rounded-down request is usable
  EXPECT_EQ(p[bytes - 1], 0x5a);
  unmap_huge(p, bytes);
}

TEST(HostMemory, ArenaSharesChunksForSmallTensorsAndMapsLargeOnesAlone) {
  WeightArena arena(4 * kHugePageBytes);  // tensors from 2 MiB get their own mapping
  void* a = arena.allocate(100);
  void* b = arena.allocate(1000);
  EXPECT_TRUE(aligned_to(a, 64));
  EXPECT_TRUE(aligned_to(b, 64));
  EXPECT_EQ(static_cast<unsigned char*>(b) - static_cast<unsigned char*>(a), 128);  // 100 rounded to 64s
  EXPECT_EQ(arena.bytes_mapped(), 4 * kHugePageBytes);
  void* big = arena.allocate(3 * kHugePageBytes);
  EXPECT_TRUE(aligned_to(big, kHugePageBytes));
  EXPECT_EQ(arena.bytes_mapped(), 7 * kHugePageBytes);
  void* c = arena.allocate(64);  // the shared chunk is still the current one
  EXPECT_EQ(static_cast<unsigned char*>(c) - static_cast<unsigned char*>(b), 1024);
  // Tensors of 1.5 MiB: five more fit in the shared chunk, the sixth starts a new one.
  const std::size_t mid = kHugePageBytes * 3 / 4;
  void* first = arena.allocate(mid);
  EXPECT_EQ(static_cast<unsigned char*>(first) - static_cast<unsigned char*>(c), 64);
  for (int i = 0; i < 4; ++i) arena.allocate(mid);
  EXPECT_EQ(arena.bytes_mapped(), 7 * kHugePageBytes);
  void* sixth = arena.allocate(mid);
  EXPECT_TRUE(aligned_to(sixth, kHugePageBytes));
  EXPECT_EQ(arena.bytes_mapped(), 11 * kHugePageBytes);
}

TEST(HostMemory, WeightVectorsKeepTheirArenaAlive) {
  WeightVector kept;
  {
    auto arena = std::make_shared<WeightArena>();
    WeightVector v{WeightAllocator<float>(arena)};
    v.assign(1000, 2.5f);
    kept = std::move(v);  // the allocator, and with it the arena, moves along
    EXPECT_EQ(kept.get_allocator().arena, arena);
  }
  ASSERT_EQ(kept.size(), 1000u);
  EXPECT_EQ(kept[999], 2.5f);
  WeightVector copy = kept;  // copies share the arena
  EXPECT_EQ(copy.get_allocator().arena, kept.get_allocator().arena);
  WeightVector plain(10, 1.0f);  // without an arena: the heap
  EXPECT_EQ(plain.get_allocator().arena, nullptr);
  EXPECT_EQ(plain[9], 1.0f);
}

TEST(HostMemory, KvChunksOfTwoMegabytesAreHugePageAligned) {
  // 16 tokens x 64 dims x (k, v) x 4 bytes = 8 KiB pages; 256 of them make 2 MiB.
  KvPagePool pool(KvCacheShape{1, 1, 64, 16}, 256);
  const int32_t page = pool.allocate();
  ASSERT_EQ(pool.chunks().size(), 1u);
  EXPECT_TRUE(aligned_to(pool.chunks()[0], kHugePageBytes));
  EXPECT_EQ(pool.k(page)[0], 0.0f);
  KvPagePool small(KvCacheShape{1, 1, 64, 1}, 4);  // 2 KiB chunks stay on the heap
  small.allocate();
  ASSERT_EQ(small.chunks().size(), 1u);
  EXPECT_EQ(small.page_bytes(), 512);
}

}  // namespace test_host_memory
}  // namespace inferlab
