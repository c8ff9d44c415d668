// Owning handles for CUDA memory used by the CUDA backend's host code.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

namespace inferlab {

// `bytes` of memory from Allocator (allocate/release), freed on destruction;
// grows by reallocation (contents lost).
template <typename Allocator>
class CudaBuffer {
 public:
  CudaBuffer() = default;
  ~CudaBuffer() { Allocator::release(ptr_); }
  CudaBuffer(const CudaBuffer&) = delete;
  CudaBuffer& operator=(const CudaBuffer&) = delete;
  CudaBuffer(CudaBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  CudaBuffer& operator=(CudaBuffer&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  // Makes room for at least `bytes`; false when out of memory.
  bool reserve(size_t bytes) {
    if (bytes <= bytes_) return true;
    Allocator::release(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
    if (Allocator::allocate(&ptr_, bytes) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    bytes_ = bytes;
    return true;
  }
  template <typename T = void>
  T* as() const { return static_cast<T*>(ptr_); }
  size_t bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

struct DeviceAllocator {
  static cudaError_t allocate(void** ptr, size_t bytes) { return cudaMalloc(ptr, bytes); }
  static void release(void* ptr) { cudaFree(ptr); }
};

struct PinnedAllocator {
  static cudaError_t allocate(void** ptr, size_t bytes) { return cudaMallocHost(ptr, bytes); }
  static void release(void* ptr) { cudaFreeHost(ptr); }
};

using DeviceMemory = CudaBuffer<DeviceAllocator>;
// Page-locked host memory, so asynchronous copies really are asynchronous.
using PinnedMemory = CudaBuffer<PinnedAllocator>;

}  // namespace inferlab
