// 4-bit NormalFloat weights (QLoRA, Dettmers et al. 2023): the tensor, taken
// flat, in blocks of `block` values, each value the index of the nearest of 16
// fixed levels (quantiles of a normal distribution, scaled to [-1, 1]) after
// dividing by the block's absolute maximum. Double quantization stores those
// absmaxes in 8 bits too: their mean subtracted, blocks of 256, each value the
// nearest entry of the signed dynamic 8-bit map times the block's own absmax.
// Two values per byte, the first in the high nibble.
#pragma once

#include <cstdint>
#include <span>
#include <vector>

namespace inferlab::kernels::cpu {

inline constexpr int32_t kNf4AbsmaxBlock = 256;  // double quantization's block of absmaxes

// The 16 NF4 levels, ascending (index 7 is 0).
std::span<const float> nf4_levels();
// The signed dynamic 8-bit map (256 entries, ascending) double quantization uses.
std::span<const float> dynamic_map_signed();

struct Nf4Tensor {
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

// Quantizes a (rows, cols) float tensor. block: 2..4096, even.
Nf4Tensor nf4_quantize(const float* w, int64_t rows, int64_t cols, int32_t block, bool double_quant);
// One row, dequantized into `out` (cols floats).
void nf4_dequantize_row(const Nf4Tensor& w, int64_t row, float* out);
// The whole tensor, dequantized (rows * cols floats).
void nf4_dequantize(const Nf4Tensor& w, float* out);
// Y(m, rows) = X(m, cols) * W^T through the 4-bit weight: per output row its
// values are dequantized and dotted (m small), or the tensor is dequantized
// into `scratch` once and multiplied (m large). `scratch` grows as needed.
void nf4_matmul_xwt(float* y, const float* x, const Nf4Tensor& w, int64_t m, std::vector<float>& scratch);

}  // namespace inferlab::kernels::cpu
