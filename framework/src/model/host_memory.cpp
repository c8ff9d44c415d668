#include "model/host_memory.h"

#include <sys/mman.h>

#include <cstdint>

namespace inferlab {

namespace {

std::size_t round_up(std::size_t n, std::size_t to) { return (n + to - 1) / to * to; }

}  // namespace

void* map_huge(std::size_t bytes) {
  const std::size_t size = round_up(bytes, kHugePageBytes);
  // Over-map by one huge page and trim, so the kept range starts on a 2 MiB boundary.
  const std::size_t span = size + kHugePageBytes;
  void* raw = mmap(nullptr, span, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
  if (raw == MAP_FAILED) return nullptr;
  const auto start = reinterpret_cast<std::uintptr_t>(raw);
  const std::uintptr_t aligned = round_up(start, kHugePageBytes);
  if (aligned > start) munmap(raw, aligned - start);
  const std::uintptr_t end = start + span, kept_end = aligned + size;
  if (end > kept_end) munmap(reinterpret_cast<void*>(kept_end), end - kept_end);
#ifdef MADV_HUGEPAGE
  madvise(reinterpret_cast<void*>(aligned), size, MADV_HUGEPAGE);  // advice: failure leaves 4 KiB pages
#endif
  return reinterpret_cast<void*>(aligned);  // anonymous mappings read as zero
}

void unmap_huge(void* p, std::size_t bytes) {
  if (p != nullptr) munmap(p, round_up(bytes, kHugePageBytes));
}

void release_pages(void* p, std::size_t bytes) {
  constexpr std::uintptr_t kPage = 4096;
  const auto begin = reinterpret_cast<std::uintptr_t>(p), end = begin + bytes;
  const std::uintptr_t first = (begin + kPage - 1) / kPage * kPage, last = end / kPage * kPage;
  if (last > first) madvise(reinterpret_cast<void*>(first), last - first, MADV_DONTNEED);
}

WeightArena::WeightArena(std::size_t chunk_bytes) : chunk_bytes_(round_up(chunk_bytes, kHugePageBytes)) {}

WeightArena::~WeightArena() {
  for (const Chunk& c : chunks_) unmap_huge(c.base, c.bytes);
}

void* WeightArena::allocate(std::size_t bytes) {
  constexpr std::size_t kAlign = 64;
  bytes = round_up(bytes == 0 ? 1 : bytes, kAlign);
  std::lock_guard lock(mutex_);
  if (bytes >= chunk_bytes_ / 4) {  // a large tensor gets its own mapping; the current chunk stays current
    void* base = map_huge(bytes);
    if (base == nullptr) throw std::bad_alloc();
    chunks_.push_back({base, round_up(bytes, kHugePageBytes)});
    return base;
  }
  if (current_ == nullptr || used_ + bytes > chunk_bytes_) {
    current_ = map_huge(chunk_bytes_);
    if (current_ == nullptr) throw std::bad_alloc();
    chunks_.push_back({current_, chunk_bytes_});
    used_ = 0;
  }
  void* p = static_cast<unsigned char*>(current_) + used_;
  used_ += bytes;
  return p;
}

std::size_t WeightArena::bytes_mapped() const {
  std::lock_guard lock(mutex_);
  std::size_t n = 0;
  for (const Chunk& c : chunks_) n += c.bytes;
  return n;
}

}  // namespace inferlab
