// Paged attention on the GPU: one layer's attention of `call.n_rows` new query
// rows over each kv head's selected cached keys and the new keys, exactly the
// semantics of AttentionCall (kernel_types.h); kernels/cpu/attention_twin.h is
// the CPU twin. Two kernels:
//   - decode (n_rows <= kDecodeMaxRows, n_rows * group_size <= kDecodeMaxQueries,
//     no sparse plan): split-K flash-decoding, one CTA per (split, kv head)
//     holding all the group's query rows, so K/V are read once per group; a
//     second kernel merges the splits.
//   - prefill (otherwise): causal flash attention on tensor cores, a CTA per
//     (64 query rows, query head), key tiles gathered through the page table,
//     a sparse head's tiles gathered from its query blocks' ranges and columns.
// Both read n_cached, selections, masks and block lists from device memory;
// the grid depends only on host fields of `call` and on max_keys, so a decode
// call can be captured in a CUDA graph and replayed while those change.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

constexpr int32_t kDecodeMaxRows = 8;
constexpr int32_t kDecodeMaxQueries = 16;  // n_rows * group_size held by one decode CTA

// Whether `attention` runs the split-K decode kernel for this call.
bool attention_uses_decode(const AttentionCall& call);

// Workspace `attention` needs (split-K partials); max_keys bounds the keys any
// kv head reads (its cached selection + the new rows).
size_t attention_workspace_bytes(const AttentionCall& call, int32_t max_keys);

// Runs one layer's attention on `stream`. All pointers in `call` are device
// pointers; KV elements are f16 or bf16 (F32 and head dims other than 64 and
// 128 return cudaErrorInvalidValue, as does a workspace smaller than
// attention_workspace_bytes). Chunk bases must be 16-byte aligned; selections
// and block lists ascending without repeats. max_keys only sizes the decode
// split count (any value is correct; a close bound balances the splits). With
// key_mass, the kernels atomically add the key probabilities to it.
cudaError_t attention(const AttentionCall& call, int32_t max_keys, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
