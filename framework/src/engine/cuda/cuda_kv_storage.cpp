#include "engine/cuda/cuda_kv_storage.h"

#include <fmt/format.h>

#include <algorithm>
#include <stdexcept>
#include <utility>
#include <vector>

#include "bit_planes.h"
#include "cuda/kv_cache_ops.cuh"
#include "engine/cuda/device_memory.h"

namespace inferlab {

namespace {

constexpr int32_t kMaxChunks = 1 << 16;  // the chunk table never moves: CUDA graphs keep its address

void check(cudaError_t err, const char* what) {
  if (err != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(err));
}

}  // namespace

// Rows of f16/bf16 elements, or (planes active) bit-plane records that the
// kernels quantize as they append and read through bit_plane_value; moves
// and copies are byte copies either way.
class CudaPageStorage final : public KvPageStorage {
 public:
  CudaPageStorage(kernels::DType dtype, kernels::BitPlanes planes, std::shared_ptr<CUstream_st> stream)
      : dtype_(dtype), planes_(planes), stream_owner_(std::move(stream)), stream_(stream_owner_.get()) {
    if (!chunk_table_.reserve(kMaxChunks * sizeof(void*)) || !host_table_.reserve(kMaxChunks * sizeof(void*)))
      throw std::bad_alloc();
  }
  int32_t element_bytes() const override { return planes_.active() ? 1 : kernels::dtype_bytes(dtype_); }
  int64_t row_bytes(int64_t head_dim) const override {
    return planes_.active() ? kernels::bit_plane_row_bytes(head_dim, planes_) : head_dim * element_bytes();
  }
  kernels::BitPlanes bit_planes() const override { return planes_; }
  KvPageFormat format() const override {
    if (planes_.active()) return KvPageFormat::BitPlanes;
    return dtype_ == kernels::DType::BF16 ? KvPageFormat::BF16 : KvPageFormat::F16;
  }
  bool host_accessible() const override { return false; }
  void* allocate_chunk(int64_t bytes) override {
    void* chunk = nullptr;
    if (cudaMalloc(&chunk, size_t(bytes)) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return chunk;
  }
  void free_chunk(void* chunk) override {
    cudaStreamSynchronize(stream_);  // kernels in flight may still read it
    cudaFree(chunk);
  }
  void chunks_changed(const KvPagePool& pool) override {
    const std::vector<void*>& chunks = pool.chunks();
    if (chunks.size() > size_t(kMaxChunks)) throw std::bad_alloc();
    // The pinned copy may still feed an earlier upload: wait for the stream first.
    check(cudaStreamSynchronize(stream_), "KV chunk table");
    void** host = host_table_.as<void*>();
    for (size_t i = 0; i < chunks.size(); ++i) host[i] = chunks[i];
    if (!chunks.empty())
      check(cudaMemcpyAsync(chunk_table_.as(), host, chunks.size() * sizeof(void*), cudaMemcpyHostToDevice,
                            stream_),
            "KV chunk table");
    // Slot planes grow with the pool, keeping their values (they never shrink).
    const size_t bytes = size_t(pool.pages_reserved()) * size_t(pool.shape().page_size) * 4;
    for (DeviceMemory& plane : slot_planes_) {
      if (bytes <= plane.bytes()) continue;
      DeviceMemory bigger;
      if (!bigger.reserve(bytes)) throw std::bad_alloc();
      check(cudaMemsetAsync(bigger.as(), 0, bytes, stream_), "KV slot plane");
      if (plane.bytes() > 0)
        check(cudaMemcpyAsync(bigger.as(), plane.as(), plane.bytes(), cudaMemcpyDeviceToDevice, stream_),
              "KV slot plane");
      check(cudaStreamSynchronize(stream_), "KV slot plane");
      plane = std::move(bigger);
      ++planes_generation_;
    }
  }
  uint64_t planes_generation() const override { return planes_generation_; }
  void* plane(SlotPlane p) const override { return slot_planes_[size_t(p)].as(); }
  void move_rows(KvPagePool& pool, const std::vector<KvRowMove>& moves) override {
    if (moves.empty()) return;
    const int32_t n = int32_t(moves.size());
    // (4, n): src_page, src_slot, dst_page, dst_slot
    staged_.assign(size_t(4 * n), 0);
    for (int32_t i = 0; i < n; ++i) {
      staged_[size_t(i)] = moves[size_t(i)].src_page;
      staged_[size_t(n + i)] = moves[size_t(i)].src_slot;
      staged_[size_t(2 * n + i)] = moves[size_t(i)].dst_page;
      staged_[size_t(3 * n + i)] = moves[size_t(i)].dst_slot;
    }
    const kernels::KvPages kv = cuda_kv_pages(pool);
    if (!scratch_.reserve(std::max(kernels::cuda::kv_move_scratch_bytes(kv, n), size_t(n) * 4)))
      throw std::bad_alloc();
    const int32_t* d = upload_staged("KV eviction");
    check(kernels::cuda::kv_move_rows(kv, d, d + n, d + 2 * n, d + 3 * n, n, scratch_.as(), stream_),
          "KV eviction");
    // Stream order: the planes' moves reuse the scratch after the rows' scatter.
    for (int32_t p = 0; p < kSlotPlanes; ++p)
      check(kernels::cuda::slot_plane_move(pool.plane<uint32_t>(SlotPlane(p)), pool.shape().page_size, d, d + n,
                                           d + 2 * n, d + 3 * n, n, scratch_.as<uint32_t>(), stream_),
            "KV eviction");
    check(cudaStreamSynchronize(stream_), "KV eviction");  // staged_ is pageable and reused
  }
  void copy_pages(const KvPagePool& src, const std::vector<int32_t>& src_pages, KvPagePool& dst,
                  const std::vector<int32_t>& dst_pages) override {
    const int32_t n = int32_t(src_pages.size());
    if (n == 0) return;
    const kernels::KvPages from = cuda_kv_pages(src), to = cuda_kv_pages(dst);
    // A host pool has no chunk table: the kernel would dereference null.
    if (to.chunk_base == nullptr) throw std::invalid_argument("KV copy: the destination pool is not on the GPU");
    staged_.assign(src_pages.begin(), src_pages.end());
    staged_.insert(staged_.end(), dst_pages.begin(), dst_pages.end());
    const int32_t* d = upload_staged("KV copy");
    check(kernels::cuda::kv_copy_pages(from, to, d, d + n, n, stream_), "KV copy");
    for (int32_t p = 0; p < kSlotPlanes; ++p)
      check(kernels::cuda::slot_plane_copy_pages(src.plane<uint32_t>(SlotPlane(p)), dst.plane<uint32_t>(SlotPlane(p)),
                                                 src.shape().page_size, d, d + n, n, stream_),
            "KV copy");
    check(cudaStreamSynchronize(stream_), "KV copy");  // staged_ is pageable and reused
  }
  void* allocate_values(int64_t count) override {
    void* values = nullptr;
    if (cudaMalloc(&values, size_t(count) * 4) != cudaSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    check(cudaMemsetAsync(values, 0, size_t(count) * 4, stream_), "sequence plane");
    check(cudaStreamSynchronize(stream_), "sequence plane");
    return values;
  }
  void free_values(void* values) override {
    cudaStreamSynchronize(stream_);  // kernels in flight may still read them
    cudaFree(values);
  }
  void copy_values(void* dst, const void* src, int64_t count) override {
    check(cudaMemcpyAsync(dst, src, size_t(count) * 4, cudaMemcpyDeviceToDevice, stream_), "sequence plane");
    check(cudaStreamSynchronize(stream_), "sequence plane");
  }
  std::unique_ptr<KvPageStorage> sibling() const override {
    return std::make_unique<CudaPageStorage>(dtype_, planes_, stream_owner_);
  }

  kernels::DType dtype() const { return dtype_; }
  void* const* chunk_table() const { return chunk_table_.as<void*>(); }

 private:
  // Queues the copy of staged_ into device memory; the caller syncs before reusing staged_.
  const int32_t* upload_staged(const char* what) {
    if (!indices_.reserve(staged_.size() * sizeof(int32_t))) throw std::bad_alloc();
    check(cudaMemcpyAsync(indices_.as(), staged_.data(), staged_.size() * sizeof(int32_t), cudaMemcpyHostToDevice,
                          stream_),
          what);
    return indices_.as<int32_t>();
  }

  kernels::DType dtype_;
  kernels::BitPlanes planes_;
  std::shared_ptr<CUstream_st> stream_owner_;
  cudaStream_t stream_;
  DeviceMemory chunk_table_;  // (kMaxChunks) device copy of the pool's chunk bases
  PinnedMemory host_table_;
  DeviceMemory indices_, scratch_;
  DeviceMemory slot_planes_[kSlotPlanes];  // (pages_reserved * page_size) 4-byte values each
  uint64_t planes_generation_ = 0;
  std::vector<int32_t> staged_;
};

std::unique_ptr<KvPageStorage> make_cuda_page_storage(kernels::DType dtype, std::shared_ptr<CUstream_st> stream) {
  return std::make_unique<CudaPageStorage>(dtype, kernels::BitPlanes{}, std::move(stream));
}

std::unique_ptr<KvPageStorage> make_cuda_bit_plane_storage(kernels::BitPlanes planes, kernels::DType dtype,
                                                           std::shared_ptr<CUstream_st> stream) {
  if (!kernels::bit_planes_supported(planes))
    throw std::invalid_argument(fmt::format("bit-plane KV pages of {}+{} bits: {}", planes.msb, planes.lsb,
                                            kernels::kBitPlaneWidths));
  return std::make_unique<CudaPageStorage>(dtype, planes, std::move(stream));
}

kernels::KvPages cuda_kv_pages(const KvPagePool& pool) {
  const auto* storage = dynamic_cast<const CudaPageStorage*>(&pool.storage());
  kernels::KvPages kv;
  if (storage == nullptr) return kv;
  kv.chunk_base = storage->chunk_table();
  kv.pages_per_chunk = pool.pages_per_chunk();
  kv.page_size = pool.shape().page_size;
  kv.head_dim = pool.shape().head_dim;
  kv.dtype = storage->dtype();
  kv.planes = storage->bit_planes();
  return kv;
}

}  // namespace inferlab
