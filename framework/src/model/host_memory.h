// Host memory for data streamed once per token (weights, KV pages): mappings
// aligned to 2 MiB and advised for transparent huge pages. A decode step reads
// every weight once; with 4 KiB pages each 4 KiB of that stream costs a TLB walk,
// and on the 2-core VM of results/cpu/ huge pages made f32 decode 5-8% faster.
// Where the kernel has no transparent huge pages the advice is ignored and the
// memory is ordinary.
#pragma once

#include <cstddef>
#include <memory>
#include <mutex>
#include <new>
#include <vector>

namespace inferlab {

inline constexpr std::size_t kHugePageBytes = std::size_t(2) << 20;

// Zeroed, 2 MiB-aligned memory of `bytes` (rounded up to whole huge pages);
// nullptr when the system has none left. Free with unmap_huge(p, bytes).
void* map_huge(std::size_t bytes);
void unmap_huge(void* p, std::size_t bytes);
// The whole 4 KiB pages inside [p, p + bytes) go back to the system (their
// contents are lost; the range stays mapped and reads as zero): a tensor of an
// arena that nothing will read again.
void release_pages(void* p, std::size_t bytes);

// A bump allocator over huge-page mappings for a model's weights, which live
// as long as the model: nothing is returned before the arena goes away.
class WeightArena {
 public:
  // Tensors under a quarter of `chunk_bytes` share chunks; larger ones get their own mapping.
  explicit WeightArena(std::size_t chunk_bytes = std::size_t(32) << 20);
  ~WeightArena();
  WeightArena(const WeightArena&) = delete;
  WeightArena& operator=(const WeightArena&) = delete;

  // 64-byte aligned; throws std::bad_alloc when no memory is left.
  void* allocate(std::size_t bytes);
  std::size_t bytes_mapped() const;

 private:
  struct Chunk {
    void* base;
    std::size_t bytes;
  };
  std::size_t chunk_bytes_;
  mutable std::mutex mutex_;
  std::vector<Chunk> chunks_;  // every mapping, unmapped with the arena
  void* current_ = nullptr;    // the shared chunk being filled
  std::size_t used_ = 0;       // bytes of current_ handed out
};

// std::allocator's behaviour without an arena; with one, memory comes from it
// and lives until the arena (shared by every container it filled) goes away.
template <class T>
struct WeightAllocator {
  using value_type = T;
  using propagate_on_container_copy_assignment = std::true_type;
  using propagate_on_container_move_assignment = std::true_type;
  using propagate_on_container_swap = std::true_type;

  WeightAllocator() = default;
  explicit WeightAllocator(std::shared_ptr<WeightArena> a) : arena(std::move(a)) {}
  template <class U>
  WeightAllocator(const WeightAllocator<U>& other) : arena(other.arena) {}

  T* allocate(std::size_t n) {
    if (!arena) return std::allocator<T>().allocate(n);
    return static_cast<T*>(arena->allocate(n * sizeof(T)));
  }
  void deallocate(T* p, std::size_t n) {
    if (!arena) std::allocator<T>().deallocate(p, n);
  }
  template <class U>
  bool operator==(const WeightAllocator<U>& other) const {
    return arena == other.arena;
  }

  std::shared_ptr<WeightArena> arena;
};

using WeightVector = std::vector<float, WeightAllocator<float>>;
using WeightBytes = std::vector<unsigned char, WeightAllocator<unsigned char>>;

}  // namespace inferlab
