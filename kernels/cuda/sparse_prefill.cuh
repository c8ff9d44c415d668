// MInference's online index estimation for sparse prefill on the device:
// vertical-slash scores and segmented top-k. Layouts and contracts:
// VerticalSlashCall and TopKCall in kernel_types.h. CPU twins:
// cpu::vertical_slash_scores and cpu::top_k_ascending (cpu/sparse_prefill.h).
#pragma once

#include <cuda_runtime.h>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

cudaError_t vertical_slash_scores(const VerticalSlashCall& call, cudaStream_t stream);
cudaError_t top_k_segments(const TopKCall& call, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
