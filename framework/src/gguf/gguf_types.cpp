// Tensor type table, dequantization and reference quantization. Block layouts are
// ggml's (ggml-common.h); every multi-byte field is little-endian and unaligned.
#include <fmt/format.h>

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstring>
#include <utility>

#include "gguf/gguf.h"
#include "gguf/half.h"

namespace inferlab::gguf {

static_assert(std::endian::native == std::endian::little, "GGUF data is read in place");

namespace {

struct TypeRow {
  uint32_t id;
  TypeTraits traits;
};

// Q8_1 and Q8_K are ggml's intermediate types for dot products; model files do
// not store them, so we know their sizes but do not dequantize them.
constexpr TypeRow kTypes[] = {
    {0, {"F32", 1, 4, true}},       {1, {"F16", 1, 2, true}},        {2, {"Q4_0", 32, 18, true}},
    {3, {"Q4_1", 32, 20, true}},    {6, {"Q5_0", 32, 22, true}},     {7, {"Q5_1", 32, 24, true}},
    {8, {"Q8_0", 32, 34, true}},    {9, {"Q8_1", 32, 36, false}},    {10, {"Q2_K", 256, 84, true}},
    {11, {"Q3_K", 256, 110, true}}, {12, {"Q4_K", 256, 144, true}},  {13, {"Q5_K", 256, 176, true}},
    {14, {"Q6_K", 256, 210, true}}, {15, {"Q8_K", 256, 292, false}}, {30, {"BF16", 1, 2, true}},
};

// Below this many elements the OpenMP fork/join costs more than it saves.
[[maybe_unused]] constexpr int64_t kParallelMinElems = 1 << 16;

uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

uint32_t load_u32(const uint8_t* p) {
  uint32_t v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

float load_fp16(const uint8_t* p) { return fp16_to_fp32(load_u16(p)); }

void store_u16(uint8_t* p, uint16_t v) { std::memcpy(p, &v, sizeof v); }

// ---- one block of each type -> floats ----------------------------------------

// Q4_0: fp16 d, 16 bytes; low nibbles are elements 0..15, high nibbles 16..31.
void dequant_block_q4_0(const uint8_t* b, float* y) {
  const float d = load_fp16(b);
  const uint8_t* qs = b + 2;
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>((qs[j] & 0x0f) - 8) * d;
    y[j + 16] = static_cast<float>((qs[j] >> 4) - 8) * d;
  }
}

// Q4_1: fp16 d, fp16 m, 16 bytes of nibbles; value q*d + m.
void dequant_block_q4_1(const uint8_t* b, float* y) {
  const float d = load_fp16(b);
  const float m = load_fp16(b + 2);
  const uint8_t* qs = b + 4;
  for (int j = 0; j < 16; ++j) {
    y[j] = static_cast<float>(qs[j] & 0x0f) * d + m;
    y[j + 16] = static_cast<float>(qs[j] >> 4) * d + m;
  }
}

// Q5_0: fp16 d, 32 high bits (bit j for element j), 16 bytes of low nibbles.
void dequant_block_q5_0(const uint8_t* b, float* y) {
  const float d = load_fp16(b);
  const uint32_t qh = load_u32(b + 2);
  const uint8_t* qs = b + 6;
  for (int j = 0; j < 16; ++j) {
    const int hi0 = static_cast<int>((qh >> j) & 1u) << 4;
    const int hi1 = static_cast<int>((qh >> (j + 16)) & 1u) << 4;
    y[j] = static_cast<float>(((qs[j] & 0x0f) | hi0) - 16) * d;
    y[j + 16] = static_cast<float>(((qs[j] >> 4) | hi1) - 16) * d;
  }
}

// Q5_1: fp16 d, fp16 m, 32 high bits, 16 bytes of low nibbles; value q*d + m.
void dequant_block_q5_1(const uint8_t* b, float* y) {
  const float d = load_fp16(b);
  const float m = load_fp16(b + 2);
  const uint32_t qh = load_u32(b + 4);
  const uint8_t* qs = b + 8;
  for (int j = 0; j < 16; ++j) {
    const int hi0 = static_cast<int>((qh >> j) & 1u) << 4;
    const int hi1 = static_cast<int>((qh >> (j + 16)) & 1u) << 4;
    y[j] = static_cast<float>((qs[j] & 0x0f) | hi0) * d + m;
    y[j + 16] = static_cast<float>((qs[j] >> 4) | hi1) * d + m;
  }
}

// Q8_0: fp16 d, 32 int8.
void dequant_block_q8_0(const uint8_t* b, float* y) {
  const float d = load_fp16(b);
  const int8_t* qs = reinterpret_cast<const int8_t*>(b + 2);
  for (int j = 0; j < 32; ++j) y[j] = static_cast<float>(qs[j]) * d;
}

// Q2_K: 16 bytes of (4-bit scale | 4-bit min << 4), 64 bytes of 2-bit quants,
// fp16 d, fp16 dmin. Each 128 elements use 32 quant bytes at 4 shifts; each
// 16-element group has its own scale/min.
void dequant_block_q2_k(const uint8_t* b, float* y) {
  const uint8_t* scales = b;
  const uint8_t* q = b + 16;
  const float d = load_fp16(b + 80);
  const float dmin = load_fp16(b + 82);
  int is = 0;
  for (int half = 0; half < 2; ++half, q += 32) {
    for (int shift = 0; shift < 8; shift += 2) {
      for (int part = 0; part < 2; ++part) {
        const uint8_t sc = scales[is++];
        const float dl = d * static_cast<float>(sc & 0x0f);
        const float ml = dmin * static_cast<float>(sc >> 4);
        const uint8_t* qp = q + 16 * part;
        for (int l = 0; l < 16; ++l) *y++ = dl * static_cast<float>((qp[l] >> shift) & 3) - ml;
      }
    }
  }
}

// Q3_K: 32 bytes of high-bit masks, 64 bytes of 2-bit quants, 12 bytes holding
// sixteen 6-bit scales, fp16 d. Value (scale - 32) * (q2 - (high bit ? 0 : 4)) * d.
void dequant_block_q3_k(const uint8_t* b, float* y) {
  const uint8_t* hmask = b;
  const uint8_t* q = b + 32;
  const uint8_t* packed = b + 96;
  const float d = load_fp16(b + 108);
  // Scale i: low 4 bits from nibble (i % 8) of bytes 0..7 (low nibbles first),
  // high 2 bits from bytes 8..11, two bits per scale.
  int scales[16];
  for (int i = 0; i < 16; ++i) {
    const int low = i < 8 ? packed[i] & 0x0f : packed[i - 8] >> 4;
    const int high = (packed[8 + i % 4] >> (2 * (i / 4))) & 3;
    scales[i] = (low | (high << 4)) - 32;
  }
  int is = 0;
  uint8_t m = 1;
  for (int half = 0; half < 2; ++half, q += 32) {
    for (int shift = 0; shift < 8; shift += 2, m = static_cast<uint8_t>(m << 1)) {
      for (int part = 0; part < 2; ++part) {
        const float dl = d * static_cast<float>(scales[is++]);
        const uint8_t* qp = q + 16 * part;
        const uint8_t* hp = hmask + 16 * part;
        for (int l = 0; l < 16; ++l) {
          const int v = ((qp[l] >> shift) & 3) - ((hp[l] & m) ? 0 : 4);
          *y++ = dl * static_cast<float>(v);
        }
      }
    }
  }
}

// The 12-byte scale/min table of Q4_K and Q5_K: eight 6-bit scales and eight
// 6-bit mins. Entries 0..3 sit in the low 6 bits of bytes 0..3 (scales) and
// 4..7 (mins); entries 4..7 take their low 4 bits from bytes 8..11 and their top
// 2 bits from the spare top bits of bytes 0..7.
// Returns sub-block j's (scale * d, min * dmin).
std::pair<float, float> k_scale_min(int j, const uint8_t* s, float d, float dmin) {
  int scale, min;
  if (j < 4) {
    scale = s[j] & 63;
    min = s[j + 4] & 63;
  } else {
    scale = (s[j + 4] & 0x0f) | ((s[j - 4] >> 6) << 4);
    min = (s[j + 4] >> 4) | ((s[j] >> 6) << 4);
  }
  return {d * static_cast<float>(scale), dmin * static_cast<float>(min)};
}

// Q4_K: fp16 d, fp16 dmin, 12 bytes of scales/mins, 128 bytes of nibbles. Each
// 64 elements use 32 bytes: low nibbles first (sub-block 2i), then high (2i+1).
void dequant_block_q4_k(const uint8_t* b, float* y) {
  const float d = load_fp16(b);
  const float dmin = load_fp16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* q = b + 16;
  for (int sub = 0; sub < 8; sub += 2, q += 32) {
    const auto [d1, m1] = k_scale_min(sub, scales, d, dmin);
    const auto [d2, m2] = k_scale_min(sub + 1, scales, d, dmin);
    for (int l = 0; l < 32; ++l) y[l] = d1 * static_cast<float>(q[l] & 0x0f) - m1;
    for (int l = 0; l < 32; ++l) y[l + 32] = d2 * static_cast<float>(q[l] >> 4) - m2;
    y += 64;
  }
}

// Q5_K: as Q4_K plus 32 bytes of high bits; sub-block s takes bit s of qh[l].
void dequant_block_q5_k(const uint8_t* b, float* y) {
  const float d = load_fp16(b);
  const float dmin = load_fp16(b + 2);
  const uint8_t* scales = b + 4;
  const uint8_t* qh = b + 16;
  const uint8_t* q = b + 48;
  for (int sub = 0; sub < 8; sub += 2, q += 32) {
    const auto [d1, m1] = k_scale_min(sub, scales, d, dmin);
    const auto [d2, m2] = k_scale_min(sub + 1, scales, d, dmin);
    for (int l = 0; l < 32; ++l) {
      const int hi = ((qh[l] >> sub) & 1) << 4;
      y[l] = d1 * static_cast<float>((q[l] & 0x0f) | hi) - m1;
    }
    for (int l = 0; l < 32; ++l) {
      const int hi = ((qh[l] >> (sub + 1)) & 1) << 4;
      y[l + 32] = d2 * static_cast<float>((q[l] >> 4) | hi) - m2;
    }
    y += 64;
  }
}

// Q6_K: 128 bytes of low nibbles, 64 bytes of 2-bit highs, 16 int8 scales, fp16 d.
// Each 128 elements use 64 low bytes and 32 high bytes; value (q - 32)*scale*d.
void dequant_block_q6_k(const uint8_t* b, float* y) {
  const uint8_t* ql = b;
  const uint8_t* qh = b + 128;
  const int8_t* sc = reinterpret_cast<const int8_t*>(b + 192);
  const float d = load_fp16(b + 208);
  for (int half = 0; half < 2; ++half, ql += 64, qh += 32, sc += 8, y += 128) {
    for (int l = 0; l < 32; ++l) {
      const int is = l / 16;
      const int q1 = ((ql[l] & 0x0f) | (((qh[l] >> 0) & 3) << 4)) - 32;
      const int q2 = ((ql[l + 32] & 0x0f) | (((qh[l] >> 2) & 3) << 4)) - 32;
      const int q3 = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
      const int q4 = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
      y[l] = d * static_cast<float>(sc[is] * q1);
      y[l + 32] = d * static_cast<float>(sc[is + 2] * q2);
      y[l + 64] = d * static_cast<float>(sc[is + 4] * q3);
      y[l + 96] = d * static_cast<float>(sc[is + 6] * q4);
    }
  }
}

template <void (*kBlock)(const uint8_t*, float*), int64_t kElems, int64_t kBytes>
void dequant_blocks(const uint8_t* src, float* dst, int64_t n_elems) {
  const int64_t n_blocks = n_elems / kElems;
#pragma omp parallel for schedule(static) if (n_elems >= kParallelMinElems)
  for (int64_t i = 0; i < n_blocks; ++i) kBlock(src + i * kBytes, dst + i * kElems);
}

template <float (*kConvert)(uint16_t)>
void dequant_16bit(const uint8_t* src, float* dst, int64_t n_elems) {
#pragma omp parallel for schedule(static) if (n_elems >= kParallelMinElems)
  for (int64_t i = 0; i < n_elems; ++i) dst[i] = kConvert(load_u16(src + 2 * i));
}

// ---- reference quantizers (round to nearest, as ggml's quantize_row_*_ref) ----

void quant_block_q8_0(const float* x, uint8_t* b) {
  float amax = 0.0f;
  for (int j = 0; j < 32; ++j) amax = std::max(amax, std::fabs(x[j]));
  const float d = amax / 127.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_u16(b, fp32_to_fp16(d));
  for (int j = 0; j < 32; ++j) {
    b[2 + j] = static_cast<uint8_t>(static_cast<int8_t>(std::lround(x[j] * id)));
  }
}

// Q4_0 maps the element of largest magnitude to -8, so its sign decides d's sign.
void quant_block_q4_0(const float* x, uint8_t* b) {
  float amax = 0.0f, extreme = 0.0f;
  for (int j = 0; j < 32; ++j) {
    if (std::fabs(x[j]) > amax) {
      amax = std::fabs(x[j]);
      extreme = x[j];
    }
  }
  const float d = extreme / -8.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_u16(b, fp32_to_fp16(d));
  for (int j = 0; j < 16; ++j) {
    const int q0 = std::min(15, static_cast<int>(x[j] * id + 8.5f));
    const int q1 = std::min(15, static_cast<int>(x[j + 16] * id + 8.5f));
    b[2 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

void quant_block_q4_1(const float* x, uint8_t* b) {
  float lo = x[0], hi = x[0];
  for (int j = 1; j < 32; ++j) {
    lo = std::min(lo, x[j]);
    hi = std::max(hi, x[j]);
  }
  const float d = (hi - lo) / 15.0f;
  const float id = d != 0.0f ? 1.0f / d : 0.0f;
  store_u16(b, fp32_to_fp16(d));
  store_u16(b + 2, fp32_to_fp16(lo));
  for (int j = 0; j < 16; ++j) {
    const int q0 = std::min(15, static_cast<int>((x[j] - lo) * id + 0.5f));
    const int q1 = std::min(15, static_cast<int>((x[j + 16] - lo) * id + 0.5f));
    b[4 + j] = static_cast<uint8_t>(q0 | (q1 << 4));
  }
}

}  // namespace

std::optional<TypeTraits> type_traits(uint32_t type_id) {
  for (const TypeRow& row : kTypes) {
    if (row.id == type_id) return row.traits;
  }
  return std::nullopt;
}

std::string_view type_name(TensorType type) {
  const auto traits = type_traits(static_cast<uint32_t>(type));
  return traits ? traits->name : std::string_view("unknown");
}

uint64_t type_bytes(TensorType type, int64_t n_elems) {
  const auto traits = type_traits(static_cast<uint32_t>(type));
  if (!traits || n_elems < 0) return 0;
  return static_cast<uint64_t>(n_elems / traits->block_elems) *
         static_cast<uint64_t>(traits->block_bytes);
}

Status dequantize(TensorType type, const void* src, float* dst, int64_t n_elems) {
  const auto traits = type_traits(static_cast<uint32_t>(type));
  if (!traits) {
    return Error{fmt::format("dequantize: unknown tensor type id {}", static_cast<uint32_t>(type))};
  }
  if (!traits->supported) {
    return Error{fmt::format("unsupported tensor type {}", traits->name)};
  }
  if (n_elems < 0 || n_elems % traits->block_elems != 0) {
    return Error{fmt::format("dequantize: {} elements is not a whole number of {} blocks ({} each)",
                             n_elems, traits->name, traits->block_elems)};
  }
  const auto* in = static_cast<const uint8_t*>(src);
  switch (type) {
    case TensorType::F32:
      if (n_elems > 0) std::memcpy(dst, in, static_cast<size_t>(n_elems) * sizeof(float));
      break;
    case TensorType::F16:
      dequant_16bit<fp16_to_fp32>(in, dst, n_elems);
      break;
    case TensorType::BF16:
      dequant_16bit<bf16_to_fp32>(in, dst, n_elems);
      break;
    case TensorType::Q4_0:
      dequant_blocks<dequant_block_q4_0, 32, 18>(in, dst, n_elems);
      break;
    case TensorType::Q4_1:
      dequant_blocks<dequant_block_q4_1, 32, 20>(in, dst, n_elems);
      break;
    case TensorType::Q5_0:
      dequant_blocks<dequant_block_q5_0, 32, 22>(in, dst, n_elems);
      break;
    case TensorType::Q5_1:
      dequant_blocks<dequant_block_q5_1, 32, 24>(in, dst, n_elems);
      break;
    case TensorType::Q8_0:
      dequant_blocks<dequant_block_q8_0, 32, 34>(in, dst, n_elems);
      break;
    case TensorType::Q2_K:
      dequant_blocks<dequant_block_q2_k, 256, 84>(in, dst, n_elems);
      break;
    case TensorType::Q3_K:
      dequant_blocks<dequant_block_q3_k, 256, 110>(in, dst, n_elems);
      break;
    case TensorType::Q4_K:
      dequant_blocks<dequant_block_q4_k, 256, 144>(in, dst, n_elems);
      break;
    case TensorType::Q5_K:
      dequant_blocks<dequant_block_q5_k, 256, 176>(in, dst, n_elems);
      break;
    case TensorType::Q6_K:
      dequant_blocks<dequant_block_q6_k, 256, 210>(in, dst, n_elems);
      break;
    default:
      return Error{fmt::format("unsupported tensor type {}", traits->name)};
  }
  return ok_status();
}

Result<std::vector<float>> dequantize(const TensorInfo& tensor) {
  const int64_t n = tensor.n_elems();
  if (tensor.data == nullptr) {
    return Error{fmt::format("tensor '{}' has no data (not read from a file)", tensor.name)};
  }
  if (type_bytes(tensor.type, n) != tensor.n_bytes) {
    return Error{fmt::format("tensor '{}': {} bytes do not hold {} elements of {}", tensor.name,
                             tensor.n_bytes, n, type_name(tensor.type))};
  }
  std::vector<float> out(static_cast<size_t>(n));
  Status status = dequantize(tensor.type, tensor.data, out.data(), n);
  if (!status) return Error{fmt::format("tensor '{}': {}", tensor.name, status.message())};
  return out;
}

Result<std::vector<uint8_t>> quantize(TensorType type, const float* src, int64_t n_elems) {
  const auto traits = type_traits(static_cast<uint32_t>(type));
  const bool can_quantize = type == TensorType::F32 || type == TensorType::F16 ||
                            type == TensorType::BF16 || type == TensorType::Q8_0 ||
                            type == TensorType::Q4_0 || type == TensorType::Q4_1;
  if (!traits || !can_quantize) {
    return Error{fmt::format(
        "quantize: cannot encode to {} (supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1)",
        traits ? traits->name : fmt::format("type id {}", static_cast<uint32_t>(type)))};
  }
  if (n_elems < 0 || n_elems % traits->block_elems != 0) {
    return Error{fmt::format("quantize: {} elements is not a whole number of {} blocks ({} each)",
                             n_elems, traits->name, traits->block_elems)};
  }
  if (traits->block_elems > 1) {
    // A NaN or inf would poison the whole block's scale.
    for (int64_t i = 0; i < n_elems; ++i) {
      if (!std::isfinite(src[i])) {
        return Error{fmt::format("quantize: element {} is {}; {} needs finite values", i, src[i],
                                 traits->name)};
      }
    }
  }
  std::vector<uint8_t> out(type_bytes(type, n_elems));
  uint8_t* dst = out.data();
  const int64_t n_blocks = n_elems / traits->block_elems;
  switch (type) {
    case TensorType::F32:
      if (n_elems > 0) std::memcpy(dst, src, out.size());
      break;
    case TensorType::F16:
      for (int64_t i = 0; i < n_elems; ++i) store_u16(dst + 2 * i, fp32_to_fp16(src[i]));
      break;
    case TensorType::BF16:
      for (int64_t i = 0; i < n_elems; ++i) store_u16(dst + 2 * i, fp32_to_bf16(src[i]));
      break;
    case TensorType::Q8_0:
      for (int64_t i = 0; i < n_blocks; ++i) quant_block_q8_0(src + 32 * i, dst + 34 * i);
      break;
    case TensorType::Q4_0:
      for (int64_t i = 0; i < n_blocks; ++i) quant_block_q4_0(src + 32 * i, dst + 18 * i);
      break;
    case TensorType::Q4_1:
      for (int64_t i = 0; i < n_blocks; ++i) quant_block_q4_1(src + 32 * i, dst + 20 * i);
      break;
    default:
      break;  // excluded by can_quantize
  }
  return out;
}

}  // namespace inferlab::gguf
