// Engine-side retention: per-token scores kept in a slot plane beside the KV
// rows, updated from a layer's attention mass, and the tokens each head drops
// chosen by radix selection; contract: RetentionCall in kernel_types.h. CPU
// twins: cpu::retention_update and cpu::retention_select.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// max_tokens bounds n_g over the heads (it sizes the grid on the host).
cudaError_t retention_update(const RetentionCall& call, int32_t max_tokens, cudaStream_t stream);
cudaError_t retention_select(const RetentionCall& call, cudaStream_t stream);

// Retention per sequence (SequenceRetentionCall): the update, a thread per
// token; the selection, one block for the layer (its scratch: 3 * n_tokens).
cudaError_t sequence_retention_update(const SequenceRetentionCall& call, cudaStream_t stream);
cudaError_t sequence_retention_select(const SequenceRetentionCall& call, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
