// attention(): argument checks and the choice between the decode and prefill
// kernels (attention_decode.cu, attention_prefill.cu).
#include "cuda/attention.cuh"
#include "cuda/attention_common.cuh"

namespace inferlab::kernels::cuda {
namespace {

bool valid_call(const AttentionCall& c) {
  const bool shapes = c.n_rows >= 0 && c.n_heads > 0 && c.n_kv_heads > 0 && c.n_heads % c.n_kv_heads == 0 &&
                      (c.head_dim == 64 || c.head_dim == 128) && c.kv.head_dim == c.head_dim &&
                      c.kv.page_size > 0 && c.kv.pages_per_chunk > 0;
  const bool dtype = (c.kv.dtype == DType::F16 || c.kv.dtype == DType::BF16) && !c.kv.planes.active();
  const bool pointers = c.q != nullptr && c.out != nullptr && c.n_cached != nullptr && c.kv.chunk_base != nullptr &&
                        c.table.pages != nullptr;
  // select_index and the sparse ranges / columns may be null when every list is empty.
  const bool select = c.select == nullptr || c.select_indptr != nullptr;
  const bool heads = c.select_heads == nullptr || (c.select != nullptr && c.n_kv_heads > 0 && c.n_heads <= 32 * c.n_kv_heads);
  const bool sparse = c.sparse.heads == nullptr || (c.sparse.range_begin != nullptr && c.sparse.range_end != nullptr &&
                                                    c.sparse.column_begin != nullptr && c.sparse.column_end != nullptr);
  return shapes && dtype && pointers && select && heads && sparse;
}

}  // namespace

bool attention_uses_decode(const AttentionCall& call) {
  return call.n_rows >= 1 && call.n_rows <= kDecodeMaxRows && call.sparse.heads == nullptr &&
         call.n_kv_heads > 0 && call.n_rows * call.group_size() <= kDecodeMaxQueries;
}

size_t attention_workspace_bytes(const AttentionCall& call, int32_t max_keys) {
  return attention_uses_decode(call) ? attn::decode_workspace_bytes(call, max_keys) : 0;
}

cudaError_t attention(const AttentionCall& call, int32_t max_keys, void* workspace, size_t workspace_bytes,
                      cudaStream_t stream) {
  if (!valid_call(call)) return cudaErrorInvalidValue;
  if (call.n_rows == 0) return cudaSuccess;
  if (!attention_uses_decode(call)) return attn::launch_prefill(call, stream);
  const size_t needed = attn::decode_workspace_bytes(call, max_keys);
  if (workspace_bytes < needed || workspace == nullptr) return cudaErrorInvalidValue;
  return attn::launch_decode(call, max_keys, workspace, stream);
}

}  // namespace inferlab::kernels::cuda
