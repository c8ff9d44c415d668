// Token embedding lookup: rows of a (n_vocab, n_embd) table, widened to float.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// out(n, n_embd) float = table[ids[i], :]; table (n_vocab, n_embd) of dtype.
// ids are not range-checked (the launcher does not know n_vocab).
cudaError_t embedding_lookup(const void* table, DType dtype, int64_t n_embd, const int32_t* ids, int64_t n,
                             float* out, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
