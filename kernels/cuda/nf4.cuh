// NF4 weights on the GPU (kernels/cpu/nf4.h describes the format): a stored
// projection is dequantized into the GPU type before its GEMM.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

struct Nf4View {
  const uint8_t* codes = nullptr;         // (n + 1) / 2 bytes, first value in the high nibble
  const float* absmax = nullptr;          // per block, or null with double quantization:
  const uint8_t* absmax_codes = nullptr;  //   per block, an index into dynamic_map
  const float* absmax_scale = nullptr;    //   per 256 blocks
  const float* dynamic_map = nullptr;     //   256 entries
  float absmax_offset = 0;
  int32_t block = 64;
  int64_t n = 0;  // values
};

// out(n) of dtype = the NF4 tensor's values.
cudaError_t nf4_dequantize(const Nf4View& w, void* out, DType dtype, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
