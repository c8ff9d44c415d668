// Backward passes of the transformer's operations, for fine-tuning: the CPU
// reference (float32, row-major), beside the forward kernels of cpu_ops.h.
// Each takes what its forward kept and returns the gradient of the inputs
// from the gradient of the outputs. Deterministic for a fixed thread count:
// every parallel loop writes disjoint outputs, and no sum is split by thread.
#pragma once

#include <cstdint>

#include "kernel_types.h"

namespace inferlab::kernels::cpu {

// Per row, 1/sqrt(mean(x^2) + eps), exactly as rmsnorm computes it.
void rmsnorm_inverse(float* inv, const float* x, int64_t rows, int64_t n, float eps);

// y = x * inv * w (rmsnorm with the row's inverse kept); given dy, for each row
//   dx = inv * (dy * w) - x * inv^3 * mean(dy * w * x)
// added to dx (accumulate) or written over it.
void rmsnorm_backward(float* dx, const float* dy, const float* x, const float* inv, const float* weight,
                      int64_t rows, int64_t n, bool accumulate);

// The transpose of rope_strided: rotates each pair by minus its angle (dq, dk
// in place). cos(-a) and -sin(a) are exact, so this is rope's exact transpose.
void rope_backward(float* dx, int64_t rows, int64_t row_stride, int64_t n_heads, int64_t head_dim, int64_t rope_dim,
                   const int32_t* positions, float theta, bool neox, const RopeScaling& scaling = {});

// act = silu(gate) * up; given dact: dgate = dact * up * silu'(gate),
// dup = dact * silu(gate), with silu'(g) = s(g) (1 + g (1 - s(g))).
void silu_mul_backward(float* dgate, float* dup, const float* dact, const float* gate, const float* up, int64_t count);

// Causal grouped-query attention over `batch` sequences of `seq_len` tokens
// each (rows b * seq_len + t), with every query seeing keys 0..t of its own
// sequence. q (rows, n_heads * head_dim), k and v (rows, n_kv_heads *
// head_dim), out like q; lse (batch, n_heads, seq_len) receives each query's
// log-sum-exp of its scaled scores, which is all backward needs to rebuild the
// probabilities (nothing of size seq_len^2 is kept).
void causal_attention_forward(const float* q, const float* k, const float* v, float* out, float* lse, int64_t batch,
                              int64_t seq_len, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale);

// Gradients of q, k and v (written over) from dout, for the forward above's
// q, k, v, out and lse: per head P = exp(scale q k^T - lse) rebuilt, dP = dout
// v^T, dS = P (dP - rowsum(dout * out)), dq = scale dS k, dk += scale dS^T q,
// dv += P^T dout, the heads of a group summed into their shared K/V in head order.
void causal_attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q, const float* k,
                               const float* v, const float* out, const float* lse, int64_t batch, int64_t seq_len,
                               int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale);

// dx(m, k) = dy(m, n) * W(n, k) (the input gradient of y = x W^T), written
// over dx or added to it.
void matmul_dy_w(float* dx, const float* dy, const float* w, int64_t m, int64_t n, int64_t k, bool accumulate);
// dW(n, k) += scale * dy(m, n)^T * x(m, k) (a weight's gradient, accumulated).
void matmul_dyt_x_add(float* dw, const float* dy, const float* x, int64_t m, int64_t n, int64_t k, float scale);

}  // namespace inferlab::kernels::cpu
