// 4-bit weights on the GPU (kernels/cpu/quant4.h describes the formats: NF4,
// FP4, Int4; blocks with an fp32 or double-quantized absmax; two codes per
// byte, the first value in the high nibble). A stored projection is either
// multiplied in place by a fused dequantizing GEMV (a few rows: decode) or
// dequantized into the GPU type for a GEMM (prefill).
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

struct Quant4View {
  const uint8_t* codes = nullptr;         // (n + 1) / 2 bytes, first value in the high nibble
  const float* absmax = nullptr;          // per block, or null with double quantization:
  const uint8_t* absmax_codes = nullptr;  //   per block, an index into dynamic_map
  const float* absmax_scale = nullptr;    //   per 256 blocks
  const float* dynamic_map = nullptr;     //   256 entries
  float absmax_offset = 0;
  float levels[16] = {};                  // the format's value of each code
  int32_t block = 64;
  int64_t n = 0;  // values
};

// out(n) of dtype = the tensor's values.
cudaError_t quant4_dequantize(const Quant4View& w, void* out, DType dtype, cudaStream_t stream);

inline constexpr int kQuant4GemvMaxRows = 4;

// y(m, rows) = x(m, cols) · W^T for W (rows, cols) held by `w` (n = rows * cols),
// x of dtype, y float32, m in 1..kQuant4GemvMaxRows: each output row's codes
// are read once, decoded in registers and dotted with the m input rows, fp32
// accumulation (one warp per output row).
cudaError_t quant4_gemv(const Quant4View& w, const void* x, DType dtype, float* y, int64_t m, int64_t rows,
                        int64_t cols, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
