// Counter-based standard normal numbers shared by the CUDA init kernels and
// their CPU twins: element i's value is a pure function of (seed, i), and is
// bit-identical on host and device.
//
// Bit-identity is why this avoids libm and the CUDA math library (the CUDA
// library is built with --use_fast_math): only correctly rounded IEEE
// operations are used (+, *, fma, /, sqrt), through helpers that forbid
// contraction on the device (__f*_rn intrinsics). On the host the code is
// written so no multiply feeds an add (every multiply-add is an explicit fma),
// so -ffp-contract=fast has nothing to fuse. No intermediate is subnormal, so
// flush-to-zero does not matter either.
#pragma once

#include <cmath>
#include <cstdint>

#ifndef INFERLAB_HOST_DEVICE  // kernel_types.h may define it too
#if defined(__CUDACC__)
#define INFERLAB_HOST_DEVICE __host__ __device__
#else
#define INFERLAB_HOST_DEVICE
#endif
#endif

namespace inferlab::kernels {

namespace counter_rng_detail {

INFERLAB_HOST_DEVICE inline float rn_mul(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

INFERLAB_HOST_DEVICE inline float rn_fma(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

INFERLAB_HOST_DEVICE inline float rn_div(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

INFERLAB_HOST_DEVICE inline float rn_sqrt(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

INFERLAB_HOST_DEVICE inline float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  __builtin_memcpy(&f, &u, sizeof f);
  return f;
#endif
}

INFERLAB_HOST_DEVICE inline uint32_t float_to_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  __builtin_memcpy(&u, &f, sizeof u);
  return u;
#endif
}

// splitmix64 of the counter state seed + (i + 1) * golden gamma.
INFERLAB_HOST_DEVICE inline uint64_t hash(uint64_t seed, uint64_t i) {
  uint64_t z = seed + (i + 1) * 0x9E3779B97F4A7C15ull;
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

// Coefficients are float literals (not constant divisions) so that host and
// device compilers cannot fold them differently.
//
// ln(u) for u in [2^-24, 1]: u = m * 2^e with m in [sqrt(1/2), sqrt(2)),
// ln(m) = 2 atanh(s), s = (m - 1) / (m + 1), |s| <= 0.1716 (odd series to s^13).
INFERLAB_HOST_DEVICE inline float log_unit(float u) {
  uint32_t bits = float_to_bits(u);
  int32_t e = int32_t(bits >> 23) - 127;
  bits = (bits & 0x7fffffu) | 0x3f800000u;  // m in [1, 2)
  if (bits > 0x3fb504f3u) {                 // m > sqrt(2): halve it
    bits -= 0x00800000u;
    e += 1;
  }
  const float m = bits_to_float(bits);
  const float s = rn_div(m - 1.0f, m + 1.0f), s2 = rn_mul(s, s);
  float p = 0.15384616f;
  p = rn_fma(p, s2, 0.181818187f);
  p = rn_fma(p, s2, 0.222222224f);
  p = rn_fma(p, s2, 0.285714298f);
  p = rn_fma(p, s2, 0.400000006f);
  p = rn_fma(p, s2, 0.666666687f);
  p = rn_fma(p, s2, 2.0f);
  const float ln_m = rn_mul(p, s);
  return rn_fma(float(e), 0.693147182f, ln_m);
}

// cos(2 pi q / 2^24) for a 24-bit q: the top two bits pick the quadrant,
// the remaining 22 a point x in [0, pi/2) where Taylor series to x^14/x^15 converge.
INFERLAB_HOST_DEVICE inline float cos_turn24(uint32_t q) {
  const uint32_t quadrant = q >> 22;
  const float x = rn_mul(float(q & 0x3fffffu), 3.74507039e-07f);  // (pi/2) / 2^22
  const float x2 = rn_mul(x, x);
  float c = 1.14707454e-11f;  // 1/14!
  c = rn_fma(c, x2, -2.08767559e-09f);
  c = rn_fma(c, x2, 2.755732e-07f);
  c = rn_fma(c, x2, -2.48015876e-05f);
  c = rn_fma(c, x2, 0.00138888892f);
  c = rn_fma(c, x2, -0.0416666679f);
  c = rn_fma(c, x2, 0.5f);
  c = rn_fma(-c, x2, 1.0f);
  float s = -7.64716361e-13f;  // -1/15!
  s = rn_fma(s, x2, 1.60590444e-10f);
  s = rn_fma(s, x2, -2.50521079e-08f);
  s = rn_fma(s, x2, 2.75573188e-06f);
  s = rn_fma(s, x2, -0.000198412701f);
  s = rn_fma(s, x2, 0.00833333377f);
  s = rn_fma(s, x2, -0.166666672f);
  s = rn_fma(rn_mul(s, x2), x, x);
  // cos(x + k pi/2) for k = 0..3.
  return quadrant == 0 ? c : quadrant == 1 ? -s : quadrant == 2 ? -c : s;
}

}  // namespace counter_rng_detail

// splitmix64's output function applied to z + the golden gamma: a 64-bit
// hash of one counter (the fine-tuning graph's adapter init and dropout masks).
INFERLAB_HOST_DEVICE inline uint64_t splitmix64(uint64_t z) { return counter_rng_detail::hash(z, 0); }

// A uniform float in [0, 1) from the top 24 bits of r (exact on host and device).
INFERLAB_HOST_DEVICE inline float unit_float24(uint64_t r) { return float(uint32_t(r >> 40)) * 5.9604644775390625e-08f; }

// PEFT dropout's factor for element e of a mask keyed by `key`: keep_scale
// (1 / (1 - p)) when the element's uniform draw is at least p, else 0. The CPU
// and CUDA fine-tuning graphs drop the same elements.
INFERLAB_HOST_DEVICE inline float dropout_factor(uint64_t key, int64_t e, float p, float keep_scale) {
  return unit_float24(splitmix64(key + uint64_t(e))) >= p ? keep_scale : 0.0f;
}

// A standard normal number, a pure function of (seed, i): Box-Muller on two
// 24-bit uniforms taken from one 64-bit hash, u1 in (0, 1] and a turn in [0, 1).
INFERLAB_HOST_DEVICE inline float random_normal_value(uint64_t seed, int64_t i) {
  namespace d = counter_rng_detail;
  const uint64_t h = d::hash(seed, uint64_t(i));
  const float u1 = d::rn_mul(float(uint32_t(h >> 40) + 1u), 5.9604644775390625e-08f);  // 2^-24
  const float r = d::rn_sqrt(d::rn_mul(-2.0f, d::log_unit(u1)));
  return d::rn_mul(r, d::cos_turn24(uint32_t(h) & 0xffffffu));
}

}  // namespace inferlab::kernels
