// float <-> f16 / bf16 on the CPU, round to nearest even, bit-exact with the
// CUDA intrinsics __float2half_rn / __float2bfloat16_rn for every finite input
// (NaN payloads may differ), so CPU twins can reproduce GPU storage exactly.
// Header-only and free of CUDA types: host code and tests include it.
#pragma once

#include <cstdint>
#include <cstring>

namespace inferlab::kernels::cpu {

inline uint32_t float_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float bits_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

// Rounds `value` right by `shift` bits, ties to even.
inline uint32_t shift_round_even(uint32_t value, uint32_t shift) {
  const uint32_t half = 1u << (shift - 1), rem = value & ((1u << shift) - 1u);
  uint32_t q = value >> shift;
  if (rem > half || (rem == half && (q & 1u))) ++q;
  return q;
}

inline uint16_t float_to_f16(float f) {
  const uint32_t x = float_bits(f);
  const uint32_t sign = (x >> 16) & 0x8000u, ax = x & 0x7fffffffu;
  if (ax > 0x7f800000u) return uint16_t(sign | 0x7e00u);  // NaN
  if (ax >= 0x477ff000u) return uint16_t(sign | 0x7c00u); // >= 65520 rounds to inf
  if (ax >= 0x38800000u) {
    // Normal half: rebias the exponent (127 -> 15); a mantissa carry on
    // rounding correctly bumps the exponent.
    return uint16_t(sign | shift_round_even(ax - 0x38000000u, 13));
  }
  const uint32_t exp = ax >> 23;
  if (exp < 102) return uint16_t(sign);  // below half the smallest subnormal
  // Subnormal half: units of 2^-24; the value is mant * 2^(exp - 150).
  const uint32_t mant = (ax & 0x7fffffu) | 0x800000u;
  return uint16_t(sign | shift_round_even(mant, 126 - exp));
}

inline float f16_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16, exp = (h >> 10) & 0x1fu, mant = h & 0x3ffu;
  if (exp == 0) {  // zero or subnormal: exact in float
    const float v = float(mant) * 5.9604644775390625e-8f;  // 2^-24
    return sign ? -v : v;
  }
  if (exp == 31) return bits_float(sign | 0x7f800000u | (mant << 13));
  return bits_float(sign | ((exp + 112) << 23) | (mant << 13));
}

inline uint16_t float_to_bf16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) return uint16_t(((x >> 16) & 0x8000u) | 0x7fc0u);  // NaN
  return uint16_t((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
}

inline float bf16_to_float(uint16_t b) { return bits_float(uint32_t(b) << 16); }

}  // namespace inferlab::kernels::cpu
