// MInference's online index estimation for sparse prefill on the device:
// vertical-slash scores, pooled block scores and segmented top-k, then the
// plan the prefill kernel reads (ranges and columns per query block). Layouts
// and contracts: VerticalSlashCall, BlockScoresCall, TopKCall and
// SparseBuildCall in kernel_types.h. CPU twins: cpu::vertical_slash_scores,
// cpu::mean_pool_keys / mean_pool_rows, cpu::top_k_ascending
// (cpu/sparse_prefill.h) and SparsePlanBuilder (engine/plans.h).
#pragma once

#include <cuda_runtime.h>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

cudaError_t vertical_slash_scores(const VerticalSlashCall& call, cudaStream_t stream);
cudaError_t block_scores(const BlockScoresCall& call, cudaStream_t stream);
cudaError_t top_k_segments(const TopKCall& call, cudaStream_t stream);
cudaError_t build_sparse_plan(const SparseBuildCall& call, cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
