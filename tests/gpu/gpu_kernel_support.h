// Helpers of the GPU kernel tests that compare device memory with the CPU
// twins: dtype byte conversion, shuffled ids, test-case names, and a KV page
// pool mirrored on the host and the device.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <memory>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "cpu/cpu_ops.h"
#include "cpu/cpu_twins.h"
#include "gpu_test_support.h"
#include "kernel_types.h"

namespace inferlab::gpu_test {

using kernels::DType;
using kernels::KvPages;
namespace cpu = kernels::cpu;

// Bytes of n elements of dtype holding x, and the floats they hold.
inline std::vector<uint8_t> to_bytes(const std::vector<float>& x, DType dtype) {
  std::vector<uint8_t> out(x.size() * size_t(dtype_bytes(dtype)));
  cpu::convert_from_float(x.data(), int64_t(x.size()), out.data(), dtype);
  return out;
}

inline std::vector<float> to_floats(const std::vector<uint8_t>& bytes, DType dtype) {
  std::vector<float> out(bytes.size() / size_t(dtype_bytes(dtype)));
  cpu::convert_to_float(bytes.data(), dtype, int64_t(out.size()), out.data());
  return out;
}

// 0 .. n-1 in a random order.
inline std::vector<int32_t> shuffled_ids(int32_t n, uint32_t seed) {
  std::vector<int32_t> ids(static_cast<size_t>(n));
  std::iota(ids.begin(), ids.end(), 0);
  std::shuffle(ids.begin(), ids.end(), std::mt19937(seed));
  return ids;
}

template <typename Param>
std::string param_name(const testing::TestParamInfo<Param>& info) { return info.param.name(); }

// The same page pool on the host and the device, filled with random values of
// the dtype (or with bit planes, random rows' records); chunks of 5 pages.
class MirrorPool {
 public:
  MirrorPool(DType dtype, int32_t n_pages, int32_t page_size, int32_t head_dim, uint64_t seed) {
    host_kv_ = {nullptr, kPagesPerChunk, page_size, head_dim, dtype};
    const int64_t chunk_elems = kPagesPerChunk * host_kv_.page_elems();
    for (int32_t c = 0; c * kPagesPerChunk < n_pages; ++c)
      add_chunk(to_bytes(random_floats(size_t(chunk_elems), seed + uint64_t(c)), dtype));
    finish();
  }
  MirrorPool(kernels::BitPlanes planes, int32_t n_pages, int32_t page_size, int32_t head_dim, uint64_t seed) {
    host_kv_ = {nullptr, kPagesPerChunk, page_size, head_dim, DType::F16, planes};
    const int64_t rows = 2 * int64_t(kPagesPerChunk) * page_size, row_bytes = host_kv_.row_bytes();
    for (int32_t c = 0; c * kPagesPerChunk < n_pages; ++c) {
      const auto x = random_floats(size_t(rows * head_dim), seed + uint64_t(c));
      std::vector<uint8_t> chunk(size_t(rows * row_bytes));
      for (int64_t r = 0; r < rows; ++r)
        cpu::bit_plane_encode(&x[size_t(r * head_dim)], head_dim, planes, &chunk[size_t(r * row_bytes)]);
      add_chunk(std::move(chunk));
    }
    finish();
  }
  const KvPages& host() const { return host_kv_; }
  const KvPages& device() const { return device_kv_; }
  // Every chunk of the device pool equals the host's.
  void expect_bit_equal() const {
    for (size_t c = 0; c < host_.size(); ++c) EXPECT_EQ(device_[c].download(), host_[c]) << "chunk " << c;
  }
  // The K rows at (page[j], slot[j]) of the host pool, or of the device pool's download.
  std::vector<float> key_rows(bool device, const std::vector<int32_t>& page, const std::vector<int32_t>& slot) const {
    std::vector<std::vector<uint8_t>> chunks = host_;
    if (device)
      for (size_t c = 0; c < chunks.size(); ++c) chunks[c] = device_[c].download();
    std::vector<void*> bases;
    for (auto& chunk : chunks) bases.push_back(chunk.data());
    KvPages kv = host_kv_;
    kv.chunk_base = bases.data();
    std::vector<float> rows;
    for (size_t j = 0; j < page.size(); ++j)
      for (int32_t d = 0; d < kv.head_dim; ++d) rows.push_back(cpu::kv_load(kv, page[j], slot[j], false, d));
    return rows;
  }

 private:
  void add_chunk(std::vector<uint8_t> bytes) {
    host_.push_back(std::move(bytes));
    device_.emplace_back(host_.back());
  }
  void finish() {
    for (size_t c = 0; c < host_.size(); ++c) {
      host_bases_.push_back(host_[c].data());
      device_bases_.push_back(device_[c].get());
    }
    d_bases_ = std::make_unique<DeviceBuffer<void*>>(device_bases_);
    host_kv_.chunk_base = host_bases_.data();
    device_kv_ = host_kv_;
    device_kv_.chunk_base = d_bases_->get();
  }

  static constexpr int32_t kPagesPerChunk = 5;
  KvPages host_kv_, device_kv_;
  std::vector<std::vector<uint8_t>> host_;
  std::vector<DeviceBuffer<uint8_t>> device_;
  std::vector<void*> host_bases_, device_bases_;
  std::unique_ptr<DeviceBuffer<void*>> d_bases_;  // (n_chunks) device chunk pointers
};

}  // namespace inferlab::gpu_test
