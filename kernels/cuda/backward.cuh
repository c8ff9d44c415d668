// Backward passes of the transformer's operations on the GPU, for
// fine-tuning: twins of kernels/cpu/backward.h (float32, row-major), plus what
// the training graph needs around them (training attention with its
// log-sum-exp, the cross-entropy of a chunk of logits, PEFT dropout masks,
// rows that skip a layer, row-major float GEMMs with any alpha and beta).
// Every kernel is deterministic: each output element is written by one thread
// or summed by one block in a fixed order (no atomics), so a step repeated on
// the same GPU gives the same bits.
#pragma once

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cuda {

// C(m, n) = alpha * op(A) op(B) + beta * C, row-major, float32 throughout
// (FP32 math, never TF32): op(A) is (m, k) and op(B) is (k, n); lda, ldb and
// ldc are the row lengths of A, B and C as stored. The handle must be bound
// to the stream.
cublasStatus_t sgemm_rm(cublasHandle_t handle, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                        float alpha, const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                        int64_t ldc);

// Per row, 1/sqrt(mean(x^2) + eps) (sum of squares in double, as cpu::rmsnorm_inverse).
cudaError_t rmsnorm_inverse(float* inv, const float* x, int64_t rows, int64_t n, float eps, cudaStream_t stream);

// cpu::rmsnorm_backward: dx (=, or += with accumulate) from dy for y = x * inv * w.
cudaError_t rmsnorm_backward(float* dx, const float* dy, const float* x, const float* inv, const float* weight,
                             int64_t rows, int64_t n, bool accumulate, cudaStream_t stream);

// cpu::rope_backward: rotates each pair of dx (rows, row_stride; n_heads heads
// of head_dim from column 0) by minus its angle at positions[r], in place.
cudaError_t rope_backward(float* dx, int64_t rows, int64_t row_stride, int64_t n_heads, int64_t head_dim,
                          int64_t rope_dim, const int32_t* positions, float theta, bool neox, cudaStream_t stream,
                          const RopeScaling& scaling = {});

// cpu::silu_mul_backward: dgate and dup from dact for act = silu(gate) * up.
cudaError_t silu_mul_backward(float* dgate, float* dup, const float* dact, const float* gate, const float* up,
                              int64_t count, cudaStream_t stream);

// The longest training sequence the attention kernels take (a query's scores
// live in shared memory).
inline constexpr int64_t kTrainAttentionMaxSeq = 8192;

// cpu::causal_attention_forward: `batch` sequences of seq_len rows, each
// query seeing keys 0..t of its own sequence; lse (batch, n_heads, seq_len)
// receives each query's log-sum-exp of its scaled scores.
cudaError_t causal_attention_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                                     int64_t batch, int64_t seq_len, int64_t n_heads, int64_t n_kv_heads,
                                     int64_t head_dim, float scale, cudaStream_t stream);

// cpu::causal_attention_backward: dq, dk, dv written over from dout. `delta`
// is scratch of (batch * seq_len, n_heads) floats (rowsum(dout * out)).
cudaError_t causal_attention_backward(float* dq, float* dk, float* dv, float* delta, const float* dout,
                                      const float* q, const float* k, const float* v, const float* out,
                                      const float* lse, int64_t batch, int64_t seq_len, int64_t n_heads,
                                      int64_t n_kv_heads, int64_t head_dim, float scale, cudaStream_t stream);

// The cross-entropy of m rows of logits z(m, vocab) against targets(m) (every
// target in range): loss[i] = logsumexp(z_i) - z_i[target] (in double); with
// write_grad, z_i becomes grad_scale * (softmax(z_i) - onehot(target)).
cudaError_t softmax_cross_entropy(float* z, const int32_t* targets, int64_t m, int64_t vocab, float grad_scale,
                                  bool write_grad, double* loss, cudaStream_t stream);

// PEFT dropout with the CPU graph's masks: element e keeps x[e] / (1 - p)
// when the uniform draw from splitmix64(key + e) is at least p, else 0:
// out[e] = x[e] * factor(e), or out[e] += that with accumulate.
cudaError_t dropout(float* out, const float* x, int64_t count, uint64_t key, float p, float keep_scale,
                    bool accumulate, cudaStream_t stream);

// Rows r with flags[r] != 0: out's row becomes x's (copy_flagged_rows) or zero
// (zero_flagged_rows); rows of n floats.
cudaError_t copy_flagged_rows(float* out, const float* x, const uint8_t* flags, int64_t rows, int64_t n,
                              cudaStream_t stream);
cudaError_t zero_flagged_rows(float* out, const uint8_t* flags, int64_t rows, int64_t n, cudaStream_t stream);

// out[rows[i]] = in[i] for i < count (rows of n floats): a chunk's rows back
// into place (gather_rows in activation.cuh is the other way).
cudaError_t scatter_rows(float* out, const float* in, const int32_t* rows, int64_t count, int64_t n,
                         cudaStream_t stream);

}  // namespace inferlab::kernels::cuda
