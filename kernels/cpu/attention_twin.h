// CPU twin of the CUDA attention kernels (kernels/cuda/attention.cuh): the same
// AttentionCall semantics (kernel_types.h) on host memory, exact softmax per
// row. It is the reference the GPU tests compare against.
#pragma once

#include <cstdint>
#include <vector>

#include "kernel_types.h"

namespace inferlab::kernels::cpu {

// Runs one layer's attention. Every pointer of `call` points to host memory;
// call.kv.chunk_base points to chunks of float (F32) or of uint16 f16/bf16 bits.
// Selections must be ascending per head; listed tokens or page slots at or
// beyond n_cached are skipped (the new tokens come after the selection anyway).
void attention_twin(const AttentionCall& call);

// The cached tokens (stored before the call) kv head g reads before its new
// tokens, in order, as its KeySelect says: all of them (head_bit -1, their
// union), or those query head g * group_size + head_bit reads (select_heads).
std::vector<int32_t> selected_cached_tokens(const AttentionCall& call, int32_t g, int32_t head_bit = -1);

}  // namespace inferlab::kernels::cpu
