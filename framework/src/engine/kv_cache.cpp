#include "engine/kv_cache.h"

#include <algorithm>
#include <atomic>
#include <new>
#include <stdexcept>
#include <cstring>

#include <fmt/format.h>

#include "cpu/cpu_ops.h"
#include "cpu/cpu_twins.h"
#include "model/host_memory.h"

namespace inferlab {

namespace {

// Rows of float32/f16/bf16 elements, or (planes active) bit-plane records,
// quantized as they are appended; chunks, slot planes, moves and copies are
// the same bytes either way.
class HostPageStorage final : public KvPageStorage {
 public:
  HostPageStorage(kernels::DType dtype, kernels::BitPlanes planes) : dtype_(dtype), bit_planes_(planes) {}
  int32_t element_bytes() const override { return bit_planes_.active() ? 1 : kernels::dtype_bytes(dtype_); }
  int64_t row_bytes(int64_t head_dim) const override {
    return bit_planes_.active() ? kernels::bit_plane_row_bytes(head_dim, bit_planes_) : head_dim * element_bytes();
  }
  kernels::BitPlanes bit_planes() const override { return bit_planes_; }
  KvPageFormat format() const override { return bit_planes_.active() ? KvPageFormat::BitPlanes : kv_page_format(dtype_); }
  bool host_accessible() const override { return true; }
  // A pool's chunks all have one size; from 2 MiB up they are huge-page mappings
  // (decode attention streams them), smaller ones come from the heap.
  void* allocate_chunk(int64_t bytes) override {
    chunk_bytes_ = size_t(bytes);
    if (chunk_bytes_ >= kHugePageBytes) return map_huge(chunk_bytes_);
    return new (std::nothrow) float[(chunk_bytes_ + sizeof(float) - 1) / sizeof(float)]();  // records: any size
  }
  void free_chunk(void* chunk) override {
    if (chunk_bytes_ >= kHugePageBytes) unmap_huge(chunk, chunk_bytes_);
    else delete[] static_cast<float*>(chunk);
  }
  void chunks_changed(const KvPagePool& pool) override {
    for (auto& p : planes_) p.resize(size_t(pool.pages_reserved()) * size_t(pool.shape().page_size), 0);
  }
  void* plane(SlotPlane p) const override { return const_cast<uint32_t*>(planes_[size_t(p)].data()); }
  void move_rows(KvPagePool& pool, const std::vector<KvRowMove>& moves) override {
    // Compaction moves rows to lower stored indices in order, so copying in
    // order never overwrites a row before it is read.
    const int64_t ps = pool.shape().page_size;
    const size_t row_bytes = size_t(pool.row_bytes());
    for (const KvRowMove& m : moves) {
      std::memcpy(pool.k_bytes(m.dst_page, m.dst_slot), pool.k_bytes(m.src_page, m.src_slot), row_bytes);
      std::memcpy(pool.v_bytes(m.dst_page, m.dst_slot), pool.v_bytes(m.src_page, m.src_slot), row_bytes);
      for (auto& p : planes_) p[size_t(m.dst_page * ps + m.dst_slot)] = p[size_t(m.src_page * ps + m.src_slot)];
    }
  }
  void copy_pages(const KvPagePool& src, const std::vector<int32_t>& src_pages, KvPagePool& dst,
                  const std::vector<int32_t>& dst_pages) override {
    const int32_t ps = src.shape().page_size;
    for (size_t i = 0; i < src_pages.size(); ++i) {
      std::memcpy(dst.page_data(dst_pages[i]), src.page_data(src_pages[i]), size_t(src.page_bytes()));
      for (int32_t p = 0; p < kSlotPlanes; ++p)
        std::memcpy(dst.plane<uint32_t>(SlotPlane(p)) + int64_t(dst_pages[i]) * ps,
                    src.plane<uint32_t>(SlotPlane(p)) + int64_t(src_pages[i]) * ps, size_t(ps) * 4);
    }
  }
  void* allocate_values(int64_t count) override { return new (std::nothrow) uint32_t[size_t(count)](); }
  void free_values(void* values) override { delete[] static_cast<uint32_t*>(values); }
  void copy_values(void* dst, const void* src, int64_t count) override { std::memcpy(dst, src, size_t(count) * 4); }
  std::unique_ptr<KvPageStorage> sibling() const override { return std::make_unique<HostPageStorage>(dtype_, bit_planes_); }

 private:
  kernels::DType dtype_;
  kernels::BitPlanes bit_planes_;
  std::vector<uint32_t> planes_[kSlotPlanes];  // (pages_reserved * page_size) each
  size_t chunk_bytes_ = 0;
};

std::atomic<uint64_t> next_sequence_id{1};

}  // namespace

std::unique_ptr<KvPageStorage> make_host_page_storage(kernels::DType dtype) {
  return std::make_unique<HostPageStorage>(dtype, kernels::BitPlanes{});
}

std::unique_ptr<KvPageStorage> make_host_bit_plane_storage(kernels::BitPlanes planes) {
  if (!kernels::bit_planes_supported(planes))
    throw std::invalid_argument(fmt::format("bit-plane KV pages of {}+{} bits: {}",
                                            planes.msb, planes.lsb, kernels::kBitPlaneWidths));
  return std::make_unique<HostPageStorage>(kernels::DType::F32, planes);
}

KvPageFormat kv_page_format(kernels::DType dtype) {
  switch (dtype) {
    case kernels::DType::F16: return KvPageFormat::F16;
    case kernels::DType::BF16: return KvPageFormat::BF16;
    default: return KvPageFormat::F32;
  }
}

kernels::DType kv_page_dtype(KvPageFormat format) {
  switch (format) {
    case KvPageFormat::F16: return kernels::DType::F16;
    case KvPageFormat::BF16: return kernels::DType::BF16;
    default: return kernels::DType::F32;
  }
}

KvPagePool::KvPagePool(const KvCacheShape& shape, int32_t pages_per_chunk, std::unique_ptr<KvPageStorage> storage)
    : shape_(shape),
      pages_per_chunk_(pages_per_chunk),
      storage_(storage ? std::move(storage) : make_host_page_storage()) {
  row_bytes_ = storage_->row_bytes(shape.head_dim);
}

KvPagePool::~KvPagePool() {
  for (void* chunk : chunks_) storage_->free_chunk(chunk);
}

std::shared_ptr<KvPagePool> KvPagePool::sibling() const {
  return std::make_shared<KvPagePool>(shape_, pages_per_chunk_, storage_->sibling());
}

int32_t KvPagePool::allocate() {
  if (free_pages_.empty()) {
    const int32_t first = int32_t(chunks_.size()) * pages_per_chunk_;
    void* chunk = storage_->allocate_chunk(page_bytes() * pages_per_chunk_);
    if (chunk == nullptr)
      throw std::bad_alloc();  // out of (device) memory: nothing sensible can continue this step
    chunks_.push_back(chunk);
    try {
      storage_->chunks_changed(*this);
    } catch (...) {  // keep chunks_ and page_used_ in step, or later page ids overrun page_used_
      chunks_.pop_back();
      storage_->free_chunk(chunk);
      throw;
    }
    page_used_.resize(page_used_.size() + size_t(pages_per_chunk_), 0);
    // Push in reverse so the lowest id is handed out first.
    for (int32_t p = first + pages_per_chunk_ - 1; p >= first; --p) free_pages_.push_back(p);
  }
  const int32_t page = free_pages_.back();
  free_pages_.pop_back();
  page_used_[size_t(page)] = 1;
  ++pages_in_use_;
  peak_pages_in_use_ = std::max(peak_pages_in_use_, pages_in_use_);
  return page;
}

void KvPagePool::release(int32_t page) {
  if (page < 0 || size_t(page) >= page_used_.size() || page_used_[size_t(page)] == 0) return;
  page_used_[size_t(page)] = 0;
  free_pages_.push_back(page);
  --pages_in_use_;
}

void KvPagePool::trim() {
  bool trimmed = false;
  while (!chunks_.empty()) {
    const size_t first = (chunks_.size() - 1) * size_t(pages_per_chunk_);
    if (std::any_of(page_used_.begin() + long(first), page_used_.end(), [](uint8_t u) { return u != 0; })) break;
    storage_->free_chunk(chunks_.back());
    chunks_.pop_back();
    page_used_.resize(first);
    trimmed = true;
  }
  if (trimmed) {
    const int32_t limit = int32_t(page_used_.size());
    std::erase_if(free_pages_, [limit](int32_t p) { return p >= limit; });
    storage_->chunks_changed(*this);
  }
}

KvSequence::KvSequence(std::shared_ptr<KvPagePool> pool) : pool_(std::move(pool)), id_(next_sequence_id++) {
  tables_.resize(size_t(pool_->shape().n_layers) * size_t(pool_->shape().n_kv_heads));
}

KvSequence::~KvSequence() {
  clear();
  for (void* plane : planes_)
    if (plane != nullptr) pool_->storage().free_values(plane);
}

SequenceState* KvSequence::method_state(uint64_t instance,
                                        const std::function<std::unique_ptr<SequenceState>()>& make) {
  for (auto& [owner, state] : method_states_)
    if (owner == instance) return state.get();
  method_states_.emplace_back(instance, make());
  return method_states_.back().second.get();
}

void* KvSequence::sequence_plane(SequencePlane p, int32_t capacity) {
  if (capacity > plane_capacity_) {  // every plane grows together, keeping its values
    for (void*& plane : planes_) {
      void* bigger = pool_->storage().allocate_values(capacity);
      if (bigger == nullptr) throw std::bad_alloc();
      if (plane != nullptr) {
        pool_->storage().copy_values(bigger, plane, plane_capacity_);
        pool_->storage().free_values(plane);
      }
      plane = bigger;
    }
    plane_capacity_ = capacity;
  }
  return planes_[size_t(p)];
}

void KvSequence::append(int32_t layer, int32_t kv_head, const float* k, const float* v, int32_t position,
                        int32_t rotary) {
  HeadPageTable& t = table(layer, kv_head);
  const int32_t page_size = pool_->shape().page_size;
  const int32_t slot = t.n_tokens() % page_size;
  if (slot == 0) t.pages.push_back(pool_->allocate());
  const int32_t page = t.pages.back();
  const int64_t hd = pool_->shape().head_dim;
  const kernels::DType dtype = pool_->dtype();
  if (const kernels::BitPlanes planes = pool_->bit_planes(); planes.active()) {
    kernels::cpu::bit_plane_encode(k, hd, planes, pool_->k_bytes(page, slot));
    kernels::cpu::bit_plane_encode(v, hd, planes, pool_->v_bytes(page, slot));
  } else if (dtype == kernels::DType::F32) {
    std::memcpy(pool_->k_bytes(page, slot), k, size_t(hd) * sizeof(float));
    std::memcpy(pool_->v_bytes(page, slot), v, size_t(hd) * sizeof(float));
  } else {
    kernels::cpu::convert_from_float(k, hd, pool_->k_bytes(page, slot), dtype);
    kernels::cpu::convert_from_float(v, hd, pool_->v_bytes(page, slot), dtype);
  }
  t.positions.push_back(position);
  t.rotary.push_back(rotary < 0 ? position : rotary);
  if (!t.origin.empty()) {
    t.origin.push_back(-1);
    t.origin_pages.resize(t.pages.size(), -1);
  }
}

int32_t KvSequence::reserve(int32_t layer, int32_t kv_head, int32_t n, const int32_t* positions,
                            const int32_t* rotary) {
  HeadPageTable& t = table(layer, kv_head);
  const int32_t page_size = pool_->shape().page_size, first = t.n_tokens();
  for (int32_t i = 0; i < n; ++i) {
    if ((first + i) % page_size == 0) t.pages.push_back(pool_->allocate());
    t.positions.push_back(positions[i]);
    t.rotary.push_back(rotary != nullptr ? rotary[i] : positions[i]);
  }
  if (!t.origin.empty()) {
    t.origin.resize(t.positions.size(), -1);
    t.origin_pages.resize(t.pages.size(), -1);
  }
  return first;
}

int32_t KvSequence::origin_page(int32_t layer, int32_t kv_head, int32_t p) {
  HeadPageTable& t = table(layer, kv_head);
  if (t.origin.empty()) {
    t.origin.assign(t.positions.size(), -1);
    t.origin_pages.assign(t.pages.size(), -1);
  }
  int32_t& page = t.origin_pages[size_t(p)];
  if (page < 0) page = pool_->allocate();
  return page;
}

std::vector<int32_t> KvSequence::rerotation_moves(int32_t layer, int32_t kv_head) {
  HeadPageTable& t = table(layer, kv_head);
  const int32_t ps = pool_->shape().page_size;
  std::vector<int32_t> moved;
  for (int32_t i = 0; i < t.n_tokens(); ++i)
    if (t.rotary[size_t(i)] != i) moved.push_back(i);
  const auto n = int32_t(moved.size());
  for (int32_t i : moved) origin_page(layer, kv_head, i / ps);  // before any bookkeeping changes
  moved.resize(size_t(5 * n));
  for (int32_t j = 0; j < n; ++j) {
    const int32_t i = moved[size_t(j)];
    int32_t& origin = t.origin[size_t(i)];
    moved[size_t(4 * n + j)] = origin < 0;
    if (origin < 0) origin = t.rotary[size_t(i)];
    moved[size_t(j)] = t.pages[size_t(i / ps)];
    moved[size_t(n + j)] = i % ps;
    moved[size_t(2 * n + j)] = t.origin_pages[size_t(i / ps)];
    moved[size_t(3 * n + j)] = i - origin;
    t.rotary[size_t(i)] = i;
  }
  return moved;
}

std::unique_ptr<KvSequence> KvSequence::clone(std::shared_ptr<KvPagePool> pool) const {
  if (!pool) pool = pool_;
  const KvCacheShape &a = pool_->shape(), &b = pool->shape();
  if (a.n_layers != b.n_layers || a.n_kv_heads != b.n_kv_heads || a.head_dim != b.head_dim ||
      a.page_size != b.page_size)
    throw std::invalid_argument("KvSequence::clone: the target pool has another shape");
  const bool host = pool->storage().host_accessible() && pool_->storage().host_accessible();
  const bool same_format = pool->format() == pool_->format() && pool->page_bytes() == pool_->page_bytes() &&
                           pool->bit_planes() == pool_->bit_planes();  // 3+5 and 4+4 rows have one size
  // The source storage copies the pages: both pools must lay them out alike,
  // or (host pools) each row is converted.
  if (!same_format && !host)
    throw std::invalid_argument("KvSequence::clone: the target pool has another storage kind");
  auto copy = std::make_unique<KvSequence>(pool);
  if (!same_format) {
    copy_converted(*copy);
    return copy;
  }
  std::vector<int32_t> src_pages, dst_pages;
  for (size_t i = 0; i < tables_.size(); ++i) {
    HeadPageTable& dst = copy->tables_[i];
    dst.positions = tables_[i].positions;
    dst.rotary = tables_[i].rotary;
    dst.origin = tables_[i].origin;
    for (int32_t page : tables_[i].pages) {
      const int32_t fresh = pool->allocate();
      src_pages.push_back(page);
      dst_pages.push_back(fresh);
      dst.pages.push_back(fresh);
    }
    for (int32_t page : tables_[i].origin_pages) {
      dst.origin_pages.push_back(page < 0 ? -1 : pool->allocate());
      if (page < 0) continue;
      src_pages.push_back(page);
      dst_pages.push_back(dst.origin_pages.back());
    }
  }
  pool_->storage().copy_pages(*pool_, src_pages, *pool, dst_pages);
  if (plane_capacity_ > 0)
    for (int32_t p = 0; p < kSequencePlanes; ++p)
      pool->storage().copy_values(copy->sequence_plane(SequencePlane(p), plane_capacity_), planes_[size_t(p)],
                                  plane_capacity_);
  for (const auto& [owner, state] : method_states_)
    copy->method_states_.emplace_back(owner, state ? state->clone() : nullptr);
  copy->n_past_ = n_past_;
  copy->forward_calls_ = forward_calls_;
  return copy;
}

void KvSequence::copy_converted(KvSequence& copy) const {
  const int64_t hd = pool_->shape().head_dim;
  const int32_t ps = pool_->shape().page_size;
  std::vector<float> k(static_cast<size_t>(hd)), v(static_cast<size_t>(hd));
  for (size_t i = 0; i < tables_.size(); ++i) {
    const HeadPageTable& t = tables_[i];
    const auto layer = int32_t(i / size_t(pool_->shape().n_kv_heads));
    const auto kv_head = int32_t(i % size_t(pool_->shape().n_kv_heads));
    for (int32_t j = 0; j < t.n_tokens(); ++j) {
      const int32_t page = t.pages[size_t(j / ps)], slot = j % ps;
      // The row as stored (a bit-plane row at full precision), as one-row page references read it.
      const kernels::cpu::KvPageRef ref{pool_->k_bytes(page, slot), pool_->v_bytes(page, slot), 1, pool_->dtype(),
                                        pool_->bit_planes()};
      const float* kr = kernels::cpu::kv_row_f32(ref, false, 0, hd, k.data());
      const float* vr = kernels::cpu::kv_row_f32(ref, true, 0, hd, v.data());
      copy.append(layer, kv_head, kr, vr, t.positions[size_t(j)], t.rotary[size_t(j)]);
      const int32_t at = copy.table(layer, kv_head).pages.back();
      copy.pool_->plane(SlotPlane::Score)[int64_t(at) * ps + slot] = pool_->plane(SlotPlane::Score)[int64_t(page) * ps + slot];
    }
  }
  if (plane_capacity_ > 0)
    for (int32_t p = 0; p < kSequencePlanes; ++p)
      copy.pool_->storage().copy_values(copy.sequence_plane(SequencePlane(p), plane_capacity_), planes_[size_t(p)],
                                        plane_capacity_);
  for (const auto& [owner, state] : method_states_)
    copy.method_states_.emplace_back(owner, state ? state->clone() : nullptr);
  copy.n_past_ = n_past_;
  copy.forward_calls_ = forward_calls_;
}

const float* KvSequence::k_row(int32_t layer, int32_t kv_head, int32_t i) const {
  return static_cast<const float*>(k_bytes(layer, kv_head, i));
}

const float* KvSequence::v_row(int32_t layer, int32_t kv_head, int32_t i) const {
  return static_cast<const float*>(v_bytes(layer, kv_head, i));
}

const void* KvSequence::k_bytes(int32_t layer, int32_t kv_head, int32_t i) const {
  const HeadPageTable& t = table(layer, kv_head);
  const int32_t ps = pool_->shape().page_size;
  return pool_->k_bytes(t.pages[size_t(i / ps)], i % ps);
}

const void* KvSequence::v_bytes(int32_t layer, int32_t kv_head, int32_t i) const {
  const HeadPageTable& t = table(layer, kv_head);
  const int32_t ps = pool_->shape().page_size;
  return pool_->v_bytes(t.pages[size_t(i / ps)], i % ps);
}

Result<int32_t> KvSequence::evict(int32_t layer, int32_t kv_head, std::vector<int32_t> drop) {
  HeadPageTable& t = table(layer, kv_head);
  const int32_t n = t.n_tokens();
  std::sort(drop.begin(), drop.end());
  drop.erase(std::unique(drop.begin(), drop.end()), drop.end());
  if (drop.empty()) return 0;
  if (drop.front() < 0 || drop.back() >= n)
    return Error{fmt::format("eviction of token {} in (layer {}, kv head {}), which holds tokens 0..{}",
                             drop.front() < 0 ? drop.front() : drop.back(), layer, kv_head, n - 1)};
  // Compact in place: every kept token moves to the next free slot, in order.
  const int32_t ps = pool_->shape().page_size;
  std::vector<int32_t> kept;  // tokens from the first dropped one on that stay
  for (int32_t read = drop.front(), next = 0; read < n; ++read)
    if (size_t(next) < drop.size() && drop[size_t(next)] == read) ++next;
    else kept.push_back(read);
  const bool originals = !t.origin.empty();
  if (originals)  // saved originals move with their tokens: their new pages need origin pages first
    for (size_t j = 0; j < kept.size(); ++j) {
      const int32_t write = drop.front() + int32_t(j);
      if (t.origin[size_t(kept[j])] >= 0 && t.origin_pages[size_t(write / ps)] < 0)
        t.origin_pages[size_t(write / ps)] = pool_->allocate();
    }
  std::vector<KvRowMove> moves;
  int32_t write = drop.front();
  for (int32_t read : kept) {
    moves.push_back({t.pages[size_t(read / ps)], read % ps, t.pages[size_t(write / ps)], write % ps});
    if (originals && t.origin[size_t(read)] >= 0)
      moves.push_back({t.origin_pages[size_t(read / ps)], read % ps, t.origin_pages[size_t(write / ps)], write % ps});
    t.positions[size_t(write)] = t.positions[size_t(read)];
    t.rotary[size_t(write)] = t.rotary[size_t(read)];
    if (originals) t.origin[size_t(write)] = t.origin[size_t(read)];
    ++write;
  }
  pool_->storage().move_rows(*pool_, moves);
  t.positions.resize(size_t(write));
  t.rotary.resize(size_t(write));
  ++t.rewrites;
  const size_t pages_needed = size_t((write + ps - 1) / ps);
  release_tail(t, pages_needed);
  return int32_t(drop.size());
}

void KvSequence::release_tail(HeadPageTable& t, size_t pages) {
  for (size_t p = pages; p < t.pages.size(); ++p) pool_->release(t.pages[p]);
  for (size_t p = pages; p < t.origin_pages.size(); ++p)
    if (t.origin_pages[p] >= 0) pool_->release(t.origin_pages[p]);
  t.pages.resize(std::min(t.pages.size(), pages));
  t.origin_pages.resize(std::min(t.origin_pages.size(), pages));
  t.origin.resize(t.origin.empty() ? 0 : t.positions.size());
}

void KvSequence::truncate(int32_t n) {
  const int32_t ps = pool_->shape().page_size;
  for (auto& t : tables_) {
    const auto keep = int32_t(std::lower_bound(t.positions.begin(), t.positions.end(), n) - t.positions.begin());
    if (keep == t.n_tokens()) continue;
    t.positions.resize(size_t(keep));
    t.rotary.resize(size_t(keep));
    release_tail(t, size_t((keep + ps - 1) / ps));
    ++t.rewrites;  // what was derived from the last page (key bounds) no longer holds
  }
  n_past_ = std::min(n_past_, n);
}

void KvSequence::clear() {
  for (auto& t : tables_) {
    t.positions.clear();
    t.rotary.clear();
    release_tail(t, 0);
    ++t.rewrites;
  }
  method_states_.clear();
  n_past_ = 0;
  forward_calls_ = 0;
}

int64_t KvSequence::pages_held() const {
  int64_t n = 0;
  for (const auto& t : tables_) {
    n += int64_t(t.pages.size());
    n += std::count_if(t.origin_pages.begin(), t.origin_pages.end(), [](int32_t p) { return p >= 0; });
  }
  return n;
}

}  // namespace inferlab
