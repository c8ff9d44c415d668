// Paged KV cache. Memory is a pool of fixed-size pages; a page holds the K and V
// rows of `page_size` tokens of one (layer, kv-head). Each sequence owns a page
// table per (layer, kv-head) — pages in token order, like a CSR row — so heads
// can later keep different tokens. Pages come from a free list and go back to it
// when a sequence releases them.
#pragma once

#include <algorithm>
#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "inferlab/plugin.h"
#include "inferlab/result.h"
#include "bit_planes.h"
#include "kernel_types.h"

namespace inferlab {

struct KvCacheShape {
  int32_t n_layers = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t page_size = 16;  // tokens per page
};

// Per-slot values kept beside the K/V rows of every page, one 4-byte element
// per stored token, moved (eviction), copied (clone) and dropped with its rows:
// where engine mechanisms keep per-token state (retention scores). A plane is
// indexed by physical slot, page * page_size + slot.
enum class SlotPlane : int32_t { Score = 0 };  // float: retention score
inline constexpr int32_t kSlotPlanes = 1;

// Per-sequence values by position (0 .. capacity - 1), 4 bytes each, in the
// storage's memory: engine mechanisms' state of a whole sequence (retention
// per sequence). Copied by clone; freed with the sequence.
enum class SequencePlane : int32_t {
  Score = 0,      // float: a token's retention score, summed over layers and heads
  DroppedAt = 1,  // int32: 1 + the layer that dropped the token, 0 while it is stored
};
inline constexpr int32_t kSequencePlanes = 2;

// Positions a sequence plane holds for a sequence whose positions end before
// `end`: the context length, or (streaming past it with cache positions) the
// next power of two, so a growing sequence reallocates rarely.
inline int32_t sequence_plane_capacity(int32_t max_context, int32_t end) {
  int32_t capacity = std::max(max_context, 1);
  while (capacity < end) capacity *= 2;
  return capacity;
}

// One K/V row move of eviction compaction: stored token at (src_page, src_slot)
// goes to (dst_page, dst_slot).
struct KvRowMove {
  int32_t src_page, src_slot, dst_page, dst_slot;
};

// Where a pool's pages live: host float32 (CPU backend) or device memory in
// f16/bf16 (CUDA backend). The pool does the bookkeeping; the storage owns the
// bytes and the row copies.
class KvPageStorage {
 public:
  virtual ~KvPageStorage() = default;
  virtual int32_t element_bytes() const = 0;
  // Bytes of one stored K (or V) row of head_dim values: head_dim elements,
  // or a bit-plane record.
  virtual int64_t row_bytes(int64_t head_dim) const { return head_dim * element_bytes(); }
  // The planes of bit-plane storage (inactive for element storage).
  virtual kernels::BitPlanes bit_planes() const { return {}; }
  // The pages' format (the attention kernels dispatch on it; a backend says
  // which it supports). Bytes of one stored token's K and V rows follow from it.
  virtual KvPageFormat format() const = 0;
  virtual bool host_accessible() const = 0;  // page_data() may be read and written by the host
  virtual void* allocate_chunk(int64_t bytes) = 0;  // nullptr when out of memory
  virtual void free_chunk(void* chunk) = 0;
  // The pool's chunk list changed: device storage keeps a device copy of it,
  // and every storage grows its slot planes to the pool's pages.
  virtual void chunks_changed(const class KvPagePool& pool) = 0;
  // Base of a slot plane: (pages_reserved * page_size) 4-byte values, in the
  // storage's memory (device memory for device storage).
  virtual void* plane(SlotPlane plane) const = 0;
  // Changes whenever a slot plane moves (captured device work holds its address).
  virtual uint64_t planes_generation() const { return 0; }
  // K and V rows and their slot-plane values; every source is read before any
  // destination is written.
  virtual void move_rows(class KvPagePool& pool, const std::vector<KvRowMove>& moves) = 0;
  // Whole pages (and their slot-plane values) from `src` (same shape and
  // storage kind) into `dst`.
  virtual void copy_pages(const class KvPagePool& src, const std::vector<int32_t>& src_pages,
                          class KvPagePool& dst, const std::vector<int32_t>& dst_pages) = 0;
  // Per-sequence value arrays (SequencePlane): `count` 4-byte values, zeroed
  // (nullptr when out of memory); freed; copied within this storage kind.
  virtual void* allocate_values(int64_t count) = 0;
  virtual void free_values(void* values) = 0;
  virtual void copy_values(void* dst, const void* src, int64_t count) = 0;
  // An empty storage of the same kind (for another pool of the same shape).
  virtual std::unique_ptr<KvPageStorage> sibling() const = 0;
};

// Pages in host memory: float32 (the reference) or f16/bf16 (half the bytes
// attention streams; rows rounded to nearest even as they are appended).
std::unique_ptr<KvPageStorage> make_host_page_storage(kernels::DType dtype = kernels::DType::F32);
// Pages in host memory as bit-plane records (kernels/bit_planes.h), rows
// quantized as they are appended (KvPageFormat::BitPlanes).
std::unique_ptr<KvPageStorage> make_host_bit_plane_storage(kernels::BitPlanes planes);

// The page format of an element type, and back (Any and F32 -> F32).
KvPageFormat kv_page_format(kernels::DType dtype);
kernels::DType kv_page_dtype(KvPageFormat format);

// Physical storage. Pages are allocated in chunks on demand; fully-free chunks at
// the end of the pool are returned to the system by `trim()`.
class KvPagePool {
 public:
  explicit KvPagePool(const KvCacheShape& shape, int32_t pages_per_chunk = 256,
                      std::unique_ptr<KvPageStorage> storage = nullptr);  // default: host float32
  ~KvPagePool();
  KvPagePool(const KvPagePool&) = delete;
  KvPagePool& operator=(const KvPagePool&) = delete;
  // A new empty pool with this pool's shape and storage kind.
  std::shared_ptr<KvPagePool> sibling() const;

  int32_t allocate();            // a page id; grows the pool when the free list is empty
  void release(int32_t page);
  void trim();                   // frees trailing chunks whose pages are all free

  // Host float32 storage only: (page_size, head_dim) floats of K / V.
  float* k(int32_t page) { return static_cast<float*>(page_data(page)); }
  float* v(int32_t page) { return k(page) + int64_t(shape_.page_size) * shape_.head_dim; }
  const float* k(int32_t page) const { return const_cast<KvPagePool*>(this)->k(page); }
  const float* v(int32_t page) const { return const_cast<KvPagePool*>(this)->v(page); }
  // The K / V row of (page, slot) in the pages' element type (any storage,
  // dereferenced on the host only for host storage).
  void* k_bytes(int32_t page, int32_t slot) const {
    return static_cast<char*>(page_data(page)) + int64_t(slot) * row_bytes_;
  }
  void* v_bytes(int32_t page, int32_t slot) const {
    return static_cast<char*>(page_data(page)) + (int64_t(shape_.page_size) + slot) * row_bytes_;
  }
  // A slot plane's values (host storage only when dereferenced on the host).
  template <typename T = float>
  T* plane(SlotPlane p) const { return static_cast<T*>(storage_->plane(p)); }
  // Base of a page in the storage's memory (device memory for device storage).
  void* page_data(int32_t page) const {
    return static_cast<char*>(chunks_[size_t(page / pages_per_chunk_)]) +
           int64_t(page % pages_per_chunk_) * page_bytes();
  }

  const KvCacheShape& shape() const { return shape_; }
  KvPageStorage& storage() const { return *storage_; }
  const std::vector<void*>& chunks() const { return chunks_; }
  int32_t pages_per_chunk() const { return pages_per_chunk_; }
  int64_t page_bytes() const { return 2 * int64_t(shape_.page_size) * row_bytes_; }
  KvPageFormat format() const { return storage_->format(); }
  // The element type of element storage (F32 for bit planes, whose rows are
  // records: see bit_planes()).
  kernels::DType dtype() const { return kv_page_dtype(storage_->format()); }
  kernels::BitPlanes bit_planes() const { return storage_->bit_planes(); }
  // K and V bytes of one stored token of one (layer, kv head).
  int64_t token_bytes() const { return 2 * row_bytes_; }
  // Bytes of one K (or V) row.
  int64_t row_bytes() const { return row_bytes_; }
  int64_t pages_in_use() const { return pages_in_use_; }
  int64_t pages_reserved() const { return int64_t(chunks_.size()) * pages_per_chunk_; }
  int64_t bytes_in_use() const { return pages_in_use_ * page_bytes(); }
  int64_t bytes_reserved() const { return pages_reserved() * page_bytes(); }
  int64_t peak_bytes_in_use() const { return peak_pages_in_use_ * page_bytes(); }
  void reset_peak() { peak_pages_in_use_ = pages_in_use_; }

 private:
  KvCacheShape shape_;
  int32_t pages_per_chunk_;
  int64_t row_bytes_;  // one K or V row
  std::unique_ptr<KvPageStorage> storage_;
  std::vector<void*> chunks_;
  std::vector<int32_t> free_pages_;  // LIFO
  std::vector<uint8_t> page_used_;
  int64_t pages_in_use_ = 0;
  int64_t peak_pages_in_use_ = 0;
};

// Tokens of one (layer, kv-head) of one sequence, in order.
struct HeadPageTable {
  std::vector<int32_t> pages;
  std::vector<int32_t> positions;  // original position of each stored token
  std::vector<int32_t> rotary;     // the RoPE position its key was rotated with
  // Keys as first written, for re-rotation of f16/bf16 pages (cache
  // positions): a moved key is turned from its original so it is rounded once,
  // not at every eviction. Token i's original, rotated at origin[i] (-1: none
  // saved), is the K row of its slot in pool page origin_pages[i / page_size]
  // (-1: none). Both empty until KvSequence::origin_page starts them.
  std::vector<int32_t> origin;
  std::vector<int32_t> origin_pages;
  // Bumped whenever `pages` changes other than by appending (eviction, clear),
  // so a device copy of the table knows to re-read it whole.
  uint32_t rewrites = 0;
  int32_t n_tokens() const { return int32_t(positions.size()); }
};

class KvSequence {
 public:
  KvSequence(std::shared_ptr<KvPagePool> pool);
  ~KvSequence();
  KvSequence(const KvSequence&) = delete;
  KvSequence& operator=(const KvSequence&) = delete;

  HeadPageTable& table(int32_t layer, int32_t kv_head) { return tables_[index(layer, kv_head)]; }
  const HeadPageTable& table(int32_t layer, int32_t kv_head) const { return tables_[index(layer, kv_head)]; }

  // Appends one token's K and V rows (head_dim floats each, rounded to the
  // pages' type) to (layer, kv_head); its key was rotated with `rotary`
  // (default: its position). Host storage only.
  void append(int32_t layer, int32_t kv_head, const float* k, const float* v, int32_t position,
              int32_t rotary = -1);
  // Appends the bookkeeping of `n` tokens (pages allocated, positions, rotary)
  // without writing their rows: a device kernel writes them. Returns the stored
  // index of the first.
  int32_t reserve(int32_t layer, int32_t kv_head, int32_t n, const int32_t* positions, const int32_t* rotary);
  // A deep copy with its own pages from `pool` (default: this sequence's pool):
  // a saved prefill to start from. The pool must have the same shape (else
  // std::invalid_argument); a host pool of another format gets each row
  // converted (widened, then rounded or quantized to its format; saved
  // originals of moved keys are not carried), a device pool must have the
  // same format.
  std::unique_ptr<KvSequence> clone(std::shared_ptr<KvPagePool> pool = nullptr) const;
  float* k_row_mutable(int32_t layer, int32_t kv_head, int32_t i) {
    return const_cast<float*>(k_row(layer, kv_head, i));
  }
  // Pointer to the K / V row of stored token `i` of (layer, kv_head); host float32 storage only.
  const float* k_row(int32_t layer, int32_t kv_head, int32_t i) const;
  const float* v_row(int32_t layer, int32_t kv_head, int32_t i) const;
  // The same row in the pages' element type (KvPagePool::dtype()).
  const void* k_bytes(int32_t layer, int32_t kv_head, int32_t i) const;
  const void* v_bytes(int32_t layer, int32_t kv_head, int32_t i) const;

  // A per-sequence plane with room for `capacity` positions, allocated (zeroed)
  // on first use in the pool's storage (std::bad_alloc when out of memory).
  // Its values are the engine's to keep; a larger capacity later keeps them.
  void* sequence_plane(SequencePlane plane, int32_t capacity);

  // The pool page holding the saved original keys (HeadPageTable::origin) of
  // logical page `p` of (layer, kv_head), allocated on first use
  // (std::bad_alloc when out of memory). Origin pages move with their tokens,
  // are copied by clone and freed with the tokens; pages_held counts them.
  int32_t origin_page(int32_t layer, int32_t kv_head, int32_t p);

  // Re-rotation from originals (f16/bf16 keys at cache positions): the keys
  // of (layer, kv_head) whose rotary position is not their index, as (5, n)
  // int32: page, slot, origin page, turn (index - original rotary position),
  // save (1: the key is its own original, to be copied to its origin page
  // first). Origin pages are allocated before anything changes
  // (std::bad_alloc); then rotary and origin are updated as if the keys were
  // turned, which the caller does (kv_rope_from_originals or its CPU twin).
  std::vector<int32_t> rerotation_moves(int32_t layer, int32_t kv_head);

  // The state method `instance` (Method::engine_instance) keeps with this
  // sequence; `make` creates it the first time (it may return nullptr: none).
  SequenceState* method_state(uint64_t instance, const std::function<std::unique_ptr<SequenceState>()>& make);

  // Back to the first n tokens: every stored token whose position is >= n
  // leaves (a suffix of each table, positions being ascending), pages left
  // empty return to the pool, and n_past becomes n (n <= n_past()).
  void truncate(int32_t n);

  // Drops stored tokens `drop` (indices into the table, any order, duplicates
  // ignored) of (layer, kv_head): later tokens move down to keep the table
  // dense, and pages left empty go back to the pool. Returns how many were dropped.
  Result<int32_t> evict(int32_t layer, int32_t kv_head, std::vector<int32_t> drop);

  void clear();  // returns every page to the pool
  // Logical length: tokens processed so far (the next token's position).
  int32_t n_past() const { return n_past_; }
  void set_n_past(int32_t n) { n_past_ = n; }
  // Forward calls made on this sequence since it was created or cleared.
  int64_t forward_calls() const { return forward_calls_; }
  void count_forward_call() { ++forward_calls_; }
  int64_t pages_held() const;
  // Unique among the sequences of this process (device page-table caches key on it).
  uint64_t id() const { return id_; }
  KvPagePool& pool() { return *pool_; }
  const KvPagePool& pool() const { return *pool_; }

 private:
  // clone into a host pool of another format: row by row.
  void copy_converted(KvSequence& copy) const;
  // Frees the pages (and origin pages) of `t` from logical page `pages` on;
  // its origins follow its positions, which the caller has cut already.
  void release_tail(HeadPageTable& t, size_t pages);
  size_t index(int32_t layer, int32_t kv_head) const {
    return size_t(layer) * size_t(pool_->shape().n_kv_heads) + size_t(kv_head);
  }
  std::shared_ptr<KvPagePool> pool_;
  std::vector<HeadPageTable> tables_;
  void* planes_[kSequencePlanes] = {};
  std::vector<std::pair<uint64_t, std::unique_ptr<SequenceState>>> method_states_;  // by method instance
  int32_t plane_capacity_ = 0;
  int32_t n_past_ = 0;
  int64_t forward_calls_ = 0;
  uint64_t id_ = 0;
};

}  // namespace inferlab
