// Bit-plane KV rows (SpAtten's progressive quantization), shared by host and
// device code. A row of head_dim values is stored as one record:
//
//   [scale: float32][MSB plane: ceil(head_dim * msb / 8) bytes][LSB plane: ceil(head_dim * lsb / 8) bytes]
//
// Each value x is put on the row's symmetric integer grid of b = msb + lsb
// bits: q = round(x / scale) in [-(2^(b-1) - 1), 2^(b-1) - 1], scale =
// max|x| / (2^(b-1) - 1), stored unsigned as u = q + 2^(b-1). The MSB plane
// holds u >> lsb (msb bits per value), the LSB plane u's low lsb bits; value i
// of a plane of w bits occupies bits [i * w, (i + 1) * w) of the plane, least
// significant bit first. Reading the scale and the MSB plane alone gives each
// value at the middle of its MSB bucket; the LSB plane adds the rest.
#pragma once

#include <cstdint>
#include <cstring>

#include "kernel_types.h"

namespace inferlab::kernels {

// BitPlanes (the widths), bit_plane_bytes and bit_plane_row_bytes are in
// kernel_types.h, beside the KvPages descriptor that carries them.

// Widths the codec supports: planes of 1..8 bits (MSB) and 0..8 bits (LSB),
// at least 2 in all (a symmetric grid needs a sign and a magnitude).
inline bool bit_planes_supported(BitPlanes p) {
  return p.msb >= 1 && p.msb <= 8 && p.lsb >= 0 && p.lsb <= 8 && p.bits() >= 2;
}
inline constexpr const char* kBitPlaneWidths = "planes of 1..8 (MSB) and 0..8 (LSB) bits, at least 2 in all";

// Bytes of the part of a record an MSB-only read touches.
INFERLAB_HOST_DEVICE inline int64_t bit_plane_msb_read_bytes(int64_t head_dim, BitPlanes p) {
  return 4 + bit_plane_bytes(head_dim, p.msb);
}

// Value i of a plane of `bits` bits (1..8): it spans at most two bytes.
INFERLAB_HOST_DEVICE inline uint32_t bit_plane_get(const uint8_t* plane, int64_t i, int32_t bits) {
  const int64_t bit = i * bits;
  const int64_t byte = bit >> 3;
  const int32_t shift = int32_t(bit & 7);
  uint32_t word = plane[byte];
  if (shift + bits > 8) word |= uint32_t(plane[byte + 1]) << 8;
  return (word >> shift) & ((1u << bits) - 1u);
}

// Byte b of a record's planes (b from 0: the MSB plane's first byte, then the
// LSB plane's) from the row's grid values u (`levels`, head_dim of them):
// the byte the host encoder's per-value OR leaves, computed from the values
// whose bits it holds, so that device threads can write one byte each.
INFERLAB_HOST_DEVICE inline uint8_t bit_plane_pack_byte(const uint16_t* levels, int64_t head_dim, BitPlanes p,
                                                        int64_t b) {
  const int64_t msb_bytes = bit_plane_bytes(head_dim, p.msb);
  const bool high = b < msb_bytes;
  const int32_t w = high ? p.msb : p.lsb;
  const int64_t first_bit = 8 * (high ? b : b - msb_bytes);
  uint32_t byte = 0;
  for (int64_t i = first_bit / w; i < head_dim && i * w < first_bit + 8; ++i) {
    const uint32_t value = high ? uint32_t(levels[i]) >> p.lsb : uint32_t(levels[i]) & ((1u << p.lsb) - 1u);
    const int64_t shift = i * w - first_bit;  // negative: the value began in the byte before
    byte |= shift >= 0 ? value << shift : value >> -shift;
  }
  return uint8_t(byte);
}

// A row's scale (its first four bytes, little-endian float32; any alignment).
INFERLAB_HOST_DEVICE inline float bit_plane_scale(const uint8_t* row) {
  const uint32_t bits = uint32_t(row[0]) | uint32_t(row[1]) << 8 | uint32_t(row[2]) << 16 | uint32_t(row[3]) << 24;
#if defined(__CUDA_ARCH__)
  return __int_as_float(int(bits));
#else
  float scale;
  std::memcpy(&scale, &bits, 4);
  return scale;
#endif
}

// Value i of a row, from the MSB plane alone (full == false) or both planes.
INFERLAB_HOST_DEVICE inline float bit_plane_value(const uint8_t* row, int64_t head_dim, BitPlanes p, int64_t i,
                                                  bool full) {
  const float scale = bit_plane_scale(row);
  const uint8_t* msb = row + 4;
  const uint32_t hi = bit_plane_get(msb, i, p.msb);
  const float offset = float(1u << (p.bits() - 1));
  float u;
  if (full && p.lsb > 0)
    u = float((hi << p.lsb) | bit_plane_get(msb + bit_plane_bytes(head_dim, p.msb), i, p.lsb));
  else
    u = float(hi << p.lsb) + 0.5f * float((1u << p.lsb) - 1u);  // the middle of the MSB bucket
  return (u - offset) * scale;
}

}  // namespace inferlab::kernels
