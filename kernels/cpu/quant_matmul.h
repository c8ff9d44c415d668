// Matrix products with GGUF block-quantized weights kept quantized in memory,
// computed the way llama.cpp's CPU backend does: for decode-sized batches the
// activations are quantized per 32-value block to 8 bits (Q8_0, or Q8_1 for
// Q4_1 weights) and each block's dot product is done in integers, scaled in
// float; for larger batches the weights are dequantized (a chunk of rows at a
// time) and multiplied with sgemm.
//
// Block layouts (ggml's, little endian, 32 values per block):
//   Q4_0: fp16 d, 16 bytes of nibbles; value j (0..15) = ((qs[j] & 15) - 8) * d,
//         value j + 16 = ((qs[j] >> 4) - 8) * d.                     18 bytes
//   Q4_1: fp16 d, fp16 m, 16 bytes of nibbles (same order); q * d + m. 20 bytes
//   Q8_0: fp16 d, 32 int8; q * d.                                     34 bytes
#pragma once

#include <cstdint>
#include <vector>

namespace inferlab::kernels::cpu {

enum class QuantType : int32_t { Q4_0, Q4_1, Q8_0 };

inline constexpr int64_t kQuantBlock = 32;  // values per block, every type

// Bytes per block: 18, 20, 34.
int64_t quant_block_bytes(QuantType type);

// A row-major (rows, cols) quantized matrix: rows = outputs, cols = inputs,
// cols % 32 == 0; row r starts at data + r * (cols / 32) * quant_block_bytes.
struct QuantMatrixRef {
  QuantType type = QuantType::Q8_0;
  const uint8_t* data = nullptr;
  int64_t rows = 0;
  int64_t cols = 0;

  int64_t row_bytes() const { return cols / kQuantBlock * quant_block_bytes(type); }
};

// Buffers reused between calls (they only grow): the quantized activations of
// the integer path, the dequantized weight rows of the sgemm path.
struct QuantScratch {
  std::vector<uint8_t> activations;
  std::vector<float> dequant;
};

// Batches of at most this many rows take the integer-dot path (20-30 GMAC/s a
// core whatever m); larger ones dequantize and call sgemm, which overtakes it
// near m = 20 once the dequantization is paid for (measured on AVX2, Zen).
inline constexpr int64_t kQuantMatmulMaxIntegerRows = 16;

// Y(m, n) = X(m, k) * W^T with n = w.rows, k = w.cols; y and x row-major.
void quant_matmul_xwt(float* y, const float* x, const QuantMatrixRef& w, int64_t m, QuantScratch& scratch);

// Several products of the same X (m rows) with matrices of the same input
// width: targets[i].y(m, rows_i) = X * targets[i].w^T. Decode-sized batches
// quantize X once and share one parallel region among all the matrices' rows.
struct QuantTarget {
  float* y = nullptr;
  QuantMatrixRef w;
};
void quant_matmul_group(const QuantTarget* targets, int count, const float* x, int64_t m, QuantScratch& scratch);

// Rows [r0, r0 + count) of w, dequantized into out (count * cols floats):
// embedding lookups; bit-identical to ggml's dequantize_row_* (q * d is exact in float).
void quant_dequantize_rows(const QuantMatrixRef& w, int64_t r0, int64_t count, float* out);

}  // namespace inferlab::kernels::cpu
