// Argument checks and grid sizes shared by the small kernels' launchers.
#pragma once

#include <algorithm>
#include <cstdint>

#include "bit_planes.h"
#include "kernel_types.h"

namespace inferlab::kernels::cuda {

inline bool valid_dtype(DType t) { return t == DType::F32 || t == DType::F16 || t == DType::BF16; }

// A page pool a KV kernel may follow: element pages, or bit-plane records of
// widths the codec supports.
inline bool valid_pages(const KvPages& kv) {
  return kv.chunk_base != nullptr && kv.pages_per_chunk > 0 && kv.page_size > 0 && kv.head_dim > 0 &&
         valid_dtype(kv.dtype) && (!kv.planes.active() || bit_planes_supported(kv.planes));
}
// One whose rows are elements of kv.dtype (the kernels that compute on stored
// values without decoding bit planes).
inline bool valid_element_pages(const KvPages& kv) { return valid_pages(kv) && !kv.planes.active(); }

// Threads of a block per KV row: a thread per channel, whole warps, at most 256.
inline int row_threads(int32_t head_dim) { return int(std::min<int64_t>(256, (head_dim + 31) / 32 * 32)); }

// Blocks of a grid-stride loop over n elements: enough to fill an H100
// (132 SMs x 16 blocks of 256 threads) without a block per element.
inline unsigned grid_stride_blocks(int64_t n, int threads) {
  return unsigned(std::clamp<int64_t>((n + threads - 1) / threads, 1, 132 * 16));
}

// Loop of element i over [0, n) for a grid of grid_stride_blocks.
#define INFERLAB_GRID_STRIDE(i, n) \
  for (int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x; i < (n); i += int64_t(gridDim.x) * blockDim.x)

// Largest grid dimension x accepted (blocks indexed by a row up to 2^31 - 1).
constexpr int64_t kMaxGridX = 2147483647;

}  // namespace inferlab::kernels::cuda

namespace inferlab::kernels::cuda {

// Widest copy unit (16, 4 or 2 bytes) that divides `bytes` and aligns every
// pointer: raw row and page copies move uint4 when they can.
inline int copy_unit_bytes(int64_t bytes, const void* a, const void* b) {
  const auto aligned = [&](int64_t unit) {
    return bytes % unit == 0 && reinterpret_cast<uintptr_t>(a) % unit == 0 && reinterpret_cast<uintptr_t>(b) % unit == 0;
  };
  return aligned(16) ? 16 : aligned(4) ? 4 : 2;
}

// Widest copy unit (16, 4, 2 or 1 bytes) dividing `bytes`: KV rows and pages
// start at multiples of their size from 16-byte aligned chunks, so it aligns
// them too (bit-plane records may be any number of bytes).
inline int copy_unit_dividing(int64_t bytes) {
  return bytes % 16 == 0 ? 16 : bytes % 4 == 0 ? 4 : bytes % 2 == 0 ? 2 : 1;
}

// Runs `body` with U = the unsigned type of a copy unit.
#define INFERLAB_DISPATCH_COPY_UNIT(unit_bytes, U, ...) \
  switch (unit_bytes) {                                 \
    case 16: {                                          \
      using U = uint4;                                  \
      __VA_ARGS__;                                      \
    } break;                                            \
    case 4: {                                           \
      using U = uint32_t;                               \
      __VA_ARGS__;                                      \
    } break;                                            \
    case 1: {                                           \
      using U = uint8_t;                                \
      __VA_ARGS__;                                      \
    } break;                                            \
    default: {                                          \
      using U = uint16_t;                               \
      __VA_ARGS__;                                      \
    } break;                                            \
  }

}  // namespace inferlab::kernels::cuda
