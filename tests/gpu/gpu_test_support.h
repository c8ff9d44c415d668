// Helpers of the GPU tests: skipping without a GPU, device buffers, random
// inputs and the normalized error used to compare a kernel with its CPU twin.
#pragma once

#include <cuda_runtime.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <random>
#include <string>
#include <vector>

#include "cuda/device_info.cuh"

namespace inferlab::gpu_test {

// Skips the calling test when this machine has no GPU this build's kernels run
// on (none, or one older than the architectures they were built for).
#define INFERLAB_REQUIRE_GPU()                                                                   \
  do {                                                                                           \
    if (::inferlab::kernels::cuda::device_count() == 0) GTEST_SKIP() << "no GPU";                \
    if (const std::string why = ::inferlab::kernels::cuda::kernel_image_problem(0); !why.empty()) \
      GTEST_SKIP() << why;                                                                       \
  } while (0)

#define INFERLAB_CUDA_OK(expr) ASSERT_EQ((expr), cudaSuccess) << cudaGetErrorString(cudaGetLastError())

// A device buffer of n elements of T, freed on destruction.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  explicit DeviceBuffer(size_t n) : n_(n) {
    if (n > 0 && cudaMalloc(&ptr_, n * sizeof(T)) != cudaSuccess) ptr_ = nullptr;
  }
  explicit DeviceBuffer(const std::vector<T>& host) : DeviceBuffer(host.size()) { upload(host); }
  ~DeviceBuffer() { cudaFree(ptr_); }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(o.ptr_), n_(o.n_) { o.ptr_ = nullptr; o.n_ = 0; }
  // Empty buffers copy nothing (no call whose error a later launch check would report).
  void upload(const std::vector<T>& host) {
    if (!host.empty()) cudaMemcpy(ptr_, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice);
  }
  std::vector<T> download() const {
    std::vector<T> host(n_);
    if (n_ > 0) cudaMemcpy(host.data(), ptr_, n_ * sizeof(T), cudaMemcpyDeviceToHost);
    return host;
  }
  T* get() const { return static_cast<T*>(ptr_); }
  size_t size() const { return n_; }

 private:
  void* ptr_ = nullptr;
  size_t n_ = 0;
};

inline std::vector<float> random_floats(size_t n, uint64_t seed, float scale = 1.0f) {
  std::mt19937_64 rng(seed);
  std::normal_distribution<float> dist(0.0f, scale);
  std::vector<float> out(n);
  for (float& x : out) x = dist(rng);
  return out;
}

// ||a - b|| / max(||b||, tiny): the error measure of every kernel comparison.
inline double normalized_error(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0, ref = 0;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) {
    diff += double(a[i] - b[i]) * double(a[i] - b[i]);
    ref += double(b[i]) * double(b[i]);
  }
  return std::sqrt(diff) / std::max(std::sqrt(ref), 1e-20);
}

}  // namespace inferlab::gpu_test
