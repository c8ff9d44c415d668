// Owning handles for CUDA memory used by the CUDA backend's host code.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <utility>

namespace inferlab {

// Device memory of `bytes`, freed on destruction; grows by reallocation (contents lost).
class DeviceMemory {
 public:
  DeviceMemory() = default;
  ~DeviceMemory() { cudaFree(ptr_); }
  DeviceMemory(const DeviceMemory&) = delete;
  DeviceMemory& operator=(const DeviceMemory&) = delete;
  DeviceMemory(DeviceMemory&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceMemory& operator=(DeviceMemory&& o) noexcept {
    std::swap(ptr_, o.ptr_);
    std::swap(bytes_, o.bytes_);
    return *this;
  }
  // Makes room for at least `bytes`; false when the device is out of memory.
  bool reserve(size_t bytes) {
    if (bytes <= bytes_) return true;
    cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
    if (cudaMalloc(&ptr_, bytes) != cudaSuccess) {
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

// Page-locked host memory, so asynchronous copies really are asynchronous.
class PinnedMemory {
 public:
  PinnedMemory() = default;
  ~PinnedMemory() { cudaFreeHost(ptr_); }
  PinnedMemory(const PinnedMemory&) = delete;
  PinnedMemory& operator=(const PinnedMemory&) = delete;
  bool reserve(size_t bytes) {
    if (bytes <= bytes_) return true;
    cudaFreeHost(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
    if (cudaMallocHost(&ptr_, bytes) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    bytes_ = bytes;
    return true;
  }
  template <typename T = void>
  T* as() const { return static_cast<T*>(ptr_); }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace inferlab
