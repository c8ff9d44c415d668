// Paged KV cache. Memory is a pool of fixed-size pages; a page holds the K and V
// rows of `page_size` tokens of one (layer, kv-head). Each sequence owns a page
// table per (layer, kv-head) — pages in token order, like a CSR row — so heads
// can later keep different tokens. Pages come from a free list and go back to it
// when a sequence releases them.
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "inferlab/result.h"

namespace inferlab {

struct KvCacheShape {
  int32_t n_layers = 0;
  int32_t n_kv_heads = 0;
  int32_t head_dim = 0;
  int32_t page_size = 16;  // tokens per page
};

// Physical storage. Pages are allocated in chunks on demand; fully-free chunks at
// the end of the pool are returned to the system by `trim()`.
class KvPagePool {
 public:
  explicit KvPagePool(const KvCacheShape& shape, int32_t pages_per_chunk = 256);

  int32_t allocate();            // a page id; grows the pool when the free list is empty
  void release(int32_t page);
  void trim();                   // frees trailing chunks whose pages are all free

  float* k(int32_t page) { return page_base(page); }                          // (page_size, head_dim)
  float* v(int32_t page) { return page_base(page) + page_floats_ / 2; }       // (page_size, head_dim)
  const float* k(int32_t page) const { return const_cast<KvPagePool*>(this)->k(page); }
  const float* v(int32_t page) const { return const_cast<KvPagePool*>(this)->v(page); }

  const KvCacheShape& shape() const { return shape_; }
  int64_t page_bytes() const { return page_floats_ * int64_t(sizeof(float)); }
  int64_t pages_in_use() const { return pages_in_use_; }
  int64_t pages_reserved() const { return int64_t(chunks_.size()) * pages_per_chunk_; }
  int64_t bytes_in_use() const { return pages_in_use_ * page_bytes(); }
  int64_t bytes_reserved() const { return pages_reserved() * page_bytes(); }
  int64_t peak_bytes_in_use() const { return peak_pages_in_use_ * page_bytes(); }
  void reset_peak() { peak_pages_in_use_ = pages_in_use_; }

 private:
  float* page_base(int32_t page) {
    return chunks_[size_t(page / pages_per_chunk_)].get() + int64_t(page % pages_per_chunk_) * page_floats_;
  }
  KvCacheShape shape_;
  int32_t pages_per_chunk_;
  int64_t page_floats_;  // K and V of one page
  std::vector<std::unique_ptr<float[]>> chunks_;
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

  // Appends one token's K and V rows (head_dim each) to (layer, kv_head); its key
  // was rotated with `rotary` (default: its position).
  void append(int32_t layer, int32_t kv_head, const float* k, const float* v, int32_t position,
              int32_t rotary = -1);
  // A deep copy with its own pages from `pool` (default: this sequence's pool,
  // which must have the same shape): a saved prefill to start from.
  std::unique_ptr<KvSequence> clone(std::shared_ptr<KvPagePool> pool = nullptr) const;
  float* k_row_mutable(int32_t layer, int32_t kv_head, int32_t i) {
    return const_cast<float*>(k_row(layer, kv_head, i));
  }
  // Pointer to the K / V row of stored token `i` of (layer, kv_head).
  const float* k_row(int32_t layer, int32_t kv_head, int32_t i) const;
  const float* v_row(int32_t layer, int32_t kv_head, int32_t i) const;

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
  KvPagePool& pool() { return *pool_; }
  const KvPagePool& pool() const { return *pool_; }

 private:
  size_t index(int32_t layer, int32_t kv_head) const {
    return size_t(layer) * size_t(pool_->shape().n_kv_heads) + size_t(kv_head);
  }
  std::shared_ptr<KvPagePool> pool_;
  std::vector<HeadPageTable> tables_;
  int32_t n_past_ = 0;
  int64_t forward_calls_ = 0;
};

}  // namespace inferlab
