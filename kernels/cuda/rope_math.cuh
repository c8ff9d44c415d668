// RoPE angles shared by rope (activations) and kv_rope_shift (stored keys).
//
// Bit-for-bit the same angles as cpu::rope_strided / cpu::rope_shift: the
// inverse frequencies are computed on the host with the same std::pow, and the
// angle is one float multiply. Its sine and cosine are taken in double: the
// library is built with --use_fast_math, whose sinf/cosf lose all accuracy at
// the angles of long contexts (positions reach 128K radians).
#pragma once

#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

constexpr int64_t kMaxRopeHalf = 256;  // rope_dim <= 512

// Kernel argument (by value, 1 KiB): theta^(-2i/rope_dim) for i < half, scaled (rope_inv_freq).
struct RopeFreqs {
  float inv_freq[kMaxRopeHalf];
  int32_t half = 0;
  bool neox = false;
};

// False when rope_dim is odd, zero or too large.
inline bool make_rope_freqs(int64_t rope_dim, float theta, bool neox, RopeFreqs* freqs,
                            const RopeScaling& scaling = {}) {
  if (rope_dim <= 0 || rope_dim % 2 != 0 || rope_dim / 2 > kMaxRopeHalf) return false;
  freqs->half = int32_t(rope_dim / 2);
  freqs->neox = neox;
  for (int64_t i = 0; i < freqs->half; ++i) freqs->inv_freq[i] = rope_inv_freq(i, rope_dim, theta, scaling);
  return true;
}

// Rotates pair i of one head by the angle (cos_a, sin_a); load(d)/store(d, v)
// access the head's dim d in whatever storage it has.
template <typename Load, typename Store>
__device__ __forceinline__ void rope_rotate_pair(const RopeFreqs& f, int32_t i, float cos_a, float sin_a,
                                                 Load load, Store store) {
  const int32_t a = f.neox ? i : 2 * i, b = f.neox ? i + f.half : 2 * i + 1;
  const float x0 = load(a), x1 = load(b);
  store(a, x0 * cos_a - x1 * sin_a);
  store(b, x0 * sin_a + x1 * cos_a);
}

// The angle of pair i at `position` (exact in float: |position| < 2^24).
__device__ __forceinline__ void rope_cos_sin(const RopeFreqs& f, int32_t i, int32_t position, float* cos_a,
                                             float* sin_a) {
  const float angle = __fmul_rn(float(position), f.inv_freq[i]);  // never fused: same bits as the CPU
  double s, c;
  sincos(double(angle), &s, &c);
  *cos_a = float(c);
  *sin_a = float(s);
}

}  // namespace inferlab::kernels::cuda
