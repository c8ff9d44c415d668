// Error handling shared by the CUDA backend's files.
#pragma once

#include <cuda_runtime.h>
#include <fmt/format.h>

#include <string>

#include "inferlab/result.h"

namespace inferlab {

inline constexpr int64_t kLogitsChunkRows = 64;  // rows of logits per LM-head GEMM

inline Error cuda_error(cudaError_t err, const std::string& what) {
  cudaGetLastError();  // clear a non-sticky error so the next call starts clean
  return Error{fmt::format("cuda: {}: {}", what, cudaGetErrorString(err))};
}

#define CUDA_TRY(expr, what)                                  \
  do {                                                        \
    if (const cudaError_t err_ = (expr); err_ != cudaSuccess) \
      return ::inferlab::cuda_error(err_, what);              \
  } while (0)

}  // namespace inferlab
