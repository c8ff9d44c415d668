// IEEE half (fp16) and bfloat16 <-> float conversion by bit manipulation, so it
// needs no F16C instructions or compiler extensions. Float -> half/bf16 rounds to
// nearest even; infinities and NaNs survive both ways; fp16 subnormals are exact.
#pragma once

#include <bit>
#include <cstdint>

namespace inferlab {

inline float fp16_to_fp32(uint16_t h) {
  const uint32_t sign = static_cast<uint32_t>(h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  if (exponent == 0x1f) {  // inf or NaN: keep the payload
    return std::bit_cast<float>(sign | 0x7f800000u | (mantissa << 13));
  }
  if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24 is exact in float
    const float magnitude = static_cast<float>(mantissa) * 0x1p-24f;
    return std::bit_cast<float>(sign | std::bit_cast<uint32_t>(magnitude));
  }
  // Normal: rebias the exponent from 15 to 127.
  return std::bit_cast<float>(sign | ((exponent + 112) << 23) | (mantissa << 13));
}

inline uint16_t fp32_to_fp16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  const uint16_t sign = static_cast<uint16_t>((bits >> 16) & 0x8000u);
  const uint32_t magnitude = bits & 0x7fffffffu;
  if (magnitude >= 0x7f800000u) {  // inf, or NaN forced quiet so it stays a NaN
    const uint32_t nan_bits = magnitude > 0x7f800000u ? 0x0200u | ((magnitude >> 13) & 0x3ffu) : 0;
    return static_cast<uint16_t>(sign | 0x7c00u | nan_bits);
  }
  const int exponent = static_cast<int>(magnitude >> 23) - 127;
  if (exponent > 15) return static_cast<uint16_t>(sign | 0x7c00u);  // >= 2^16 overflows to inf
  if (exponent < -25) return sign;  // below half the smallest subnormal
  if (exponent >= -14) {            // normal half: drop 13 mantissa bits
    uint32_t significand =
        (static_cast<uint32_t>(exponent + 15) << 10) | ((magnitude >> 13) & 0x3ffu);
    const uint32_t rest = magnitude & 0x1fffu;
    // A carry out of the mantissa bumps the exponent, which is the right answer
    // (up to 0x7c00 = inf for values that round past 65504).
    if (rest > 0x1000u || (rest == 0x1000u && (significand & 1u))) ++significand;
    return static_cast<uint16_t>(sign | significand);
  }
  // Subnormal half: value / 2^-24 = full_significand * 2^(exponent + 1).
  const uint32_t full = (magnitude & 0x7fffffu) | 0x800000u;
  const int shift = -(exponent + 1);  // 14..24
  uint32_t significand = full >> shift;
  const uint32_t rest = full & ((1u << shift) - 1);
  const uint32_t half = 1u << (shift - 1);
  if (rest > half || (rest == half && (significand & 1u))) ++significand;
  return static_cast<uint16_t>(sign | significand);
}

inline float bf16_to_fp32(uint16_t h) {
  return std::bit_cast<float>(static_cast<uint32_t>(h) << 16);
}

inline uint16_t fp32_to_bf16(float f) {
  const uint32_t bits = std::bit_cast<uint32_t>(f);
  if ((bits & 0x7fffffffu) > 0x7f800000u) {  // NaN: truncate, but keep it a NaN
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  const uint32_t rounding = 0x7fffu + ((bits >> 16) & 1u);
  return static_cast<uint16_t>((bits + rounding) >> 16);
}

}  // namespace inferlab
