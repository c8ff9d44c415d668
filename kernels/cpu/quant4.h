// 4-bit block-quantized weights, the three formats QLoRA compares (Dettmers et
// al. 2023, Table 2), bit for bit as bitsandbytes' CPU path (0.50) makes them:
// the tensor, taken flat, in blocks of `block` values; each value scaled by
// its block's absolute maximum (times its reciprocal; the last, partial block
// divided by it) and stored as a 4-bit code, two per byte, the first value in
// the high nibble (an odd count pads with the code of 0). A code means one of
// 16 levels in [-1, 1], bitsandbytes' tables:
//   NF4   4-bit NormalFloat: quantiles of a normal distribution, ascending,
//         code 7 is 0.
//   FP4   a 4-bit float (sign, 2 exponent bits, 1 mantissa bit): codes 0-7
//         are 0, 1/192, 2/3, 1, 1/3, 1/2, 1/6, 1/4, codes 8-15 their negatives
//         (code 8 is 0 again).
//   Int4  symmetric integers over 7: codes 0-7 are 7/7 down to 0, codes 8-15
//         0 down to -7/7.
// A value takes the nearest level: the levels sorted (of two equal ones, the
// lower code first), a value past every float32 midpoint below it (on a
// midpoint: the lower level; so FP4 and Int4 code a tiny positive value 8, as
// bitsandbytes does). Double
// quantization stores the absmaxes in 8 bits too: their mean subtracted,
// blocks of 256, each value an entry of the signed dynamic 8-bit map times the
// group's own absmax, found through bitsandbytes' 65,536-bin table (nearly
// always the nearest entry).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace inferlab::kernels::cpu {

enum class Quant4Format : int32_t { NF4 = 0, FP4 = 1, Int4 = 2 };
const char* quant4_name(Quant4Format format);

inline constexpr int32_t kQuant4AbsmaxBlock = 256;  // double quantization's block of absmaxes

// The 16 levels of `format`, indexed by code.
std::span<const float> quant4_levels(Quant4Format format);
// The code `format` stores for x (x already divided by its block's absmax).
uint8_t quant4_encode(Quant4Format format, float x);
// The signed dynamic 8-bit map (256 entries, ascending) double quantization uses.
std::span<const float> dynamic_map_signed();

struct Quant4Tensor {
  Quant4Format format = Quant4Format::NF4;
  int64_t rows = 0, cols = 0;
  int32_t block = 64;
  bool double_quant = false;
  std::vector<uint8_t> codes;          // (rows * cols + 1) / 2 bytes
  std::vector<float> absmax;           // per block (without double quantization)
  std::vector<uint8_t> absmax_codes;   // per block (double quantization)
  std::vector<float> absmax_scale;     // per 256 blocks (double quantization)
  float absmax_offset = 0;             // the absmaxes' mean (double quantization)

  int64_t blocks() const { return (rows * cols + block - 1) / block; }
  float block_absmax(int64_t b) const;
  int64_t bytes() const;  // storage: codes and absmaxes
};

// Quantizes a (rows, cols) float tensor. block: 2..4096, even. The double
// quantization's offset is the absmaxes' mean, summed in double.
Quant4Tensor quant4_quantize(const float* w, int64_t rows, int64_t cols, Quant4Format format, int32_t block,
                             bool double_quant);
// Double quantization of a tensor's block absmaxes around `offset` (the step
// quant4_quantize ends with; bitsandbytes takes torch's float32 mean, which
// can differ from ours in the last bit).
void quant4_double_quantize(Quant4Tensor& t, const std::vector<float>& absmax, float offset);
// One row, dequantized into `out` (cols floats).
void quant4_dequantize_row(const Quant4Tensor& w, int64_t row, float* out);
// The whole tensor, dequantized (rows * cols floats).
void quant4_dequantize(const Quant4Tensor& w, float* out);
// Y(m, rows) = X(m, cols) * W^T through the 4-bit weight: per output row its
// codes are decoded and dotted with the inputs in one pass, fp32 accumulation
// (m <= 4: decode), or the tensor is dequantized into `scratch` once and
// multiplied (m large: prefill). `scratch` grows as needed.
void quant4_matmul_xwt(float* y, const float* x, const Quant4Tensor& w, int64_t m, std::vector<float>& scratch);

}  // namespace inferlab::kernels::cpu
