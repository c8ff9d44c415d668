// Radix selection of the k largest floats by one thread block (CUB block
// scans): shared by the selection of pages by key bound (page_bounds.cu) and
// engine-side retention (retention.cu).
#pragma once

#include <cub/cub.cuh>

#include <cstdint>

namespace inferlab::kernels::cuda {

constexpr int kSelectThreads = 512;  // threads of a selection block
static_assert(kSelectThreads < (1 << 15), "a chunk's counts are packed in 16 bits");

// Unsigned key ordered like the float, with -0.0 and +0.0 equal (the twin
// compares floats).
inline __device__ uint32_t order_key(float x) {
  uint32_t bits = __float_as_uint(x);
  if ((bits & 0x7fffffffu) == 0) bits = 0;
  return (bits & 0x80000000u) ? ~bits : bits | 0x80000000u;
}

struct SelectShared {
  int32_t histogram[256];
  uint32_t digit;
  int32_t above;  // keys under the prefix with a larger digit
  cub::BlockScan<int32_t, kSelectThreads>::TempStorage scan;
};

// The k-th largest key of score[0, n) (1 <= k <= n), eight bits a pass from the
// top; *need: how many keys equal to it the k largest take (the others are
// greater). Called by the whole block.
inline __device__ void radix_select(const float* score, int32_t n, int32_t k, SelectShared& sm, uint32_t* threshold,
                             int32_t* need) {
  uint32_t prefix = 0, prefix_mask = 0;
  int32_t remaining = k;  // still to take among keys under the prefix; <= their count
  for (int shift = 24; shift >= 0; shift -= 8) {
    for (int b = threadIdx.x; b < 256; b += blockDim.x) sm.histogram[b] = 0;
    __syncthreads();
    for (int32_t p = threadIdx.x; p < n; p += blockDim.x) {
      const uint32_t key = order_key(score[p]);
      if ((key & prefix_mask) == prefix) atomicAdd(&sm.histogram[(key >> shift) & 255u], 1);
    }
    __syncthreads();
    if (threadIdx.x < 32) {
      // Lane l counts digits 255 - 8l down to 248 - 8l; a scan over lanes gives
      // the keys above each lane's digits, and one lane holds the k-th key.
      const int lane = threadIdx.x;
      int32_t count[8], total = 0;
      for (int j = 0; j < 8; ++j) total += count[j] = sm.histogram[255 - 8 * lane - j];
      int32_t through = total;
      for (int offset = 1; offset < 32; offset <<= 1) {
        const int32_t v = __shfl_up_sync(0xffffffffu, through, offset);
        if (lane >= offset) through += v;
      }
      int32_t above = through - total;
      if (above < remaining && remaining <= through)
        for (int j = 0; j < 8; ++j) {
          if (above + count[j] >= remaining) {
            sm.digit = uint32_t(255 - 8 * lane - j);
            sm.above = above;
            break;
          }
          above += count[j];
        }
    }
    __syncthreads();
    prefix |= sm.digit << shift;
    prefix_mask |= 255u << shift;
    remaining -= sm.above;
  }
  *threshold = prefix;
  *need = remaining;
}


}  // namespace inferlab::kernels::cuda
