// Activation sparsity (TEAL, CATS): projections that skip the weights small
// inputs would multiply. An input entry with |x| <= threshold counts as zero
// (threshold 0: exact zeros only, the dense result). Each function returns the
// number of entries it took as zero. These are the CPU backend's kernels and
// the twins of kernels/cuda/activation_sparse.cu.
#pragma once

#include <cmath>
#include <cstdint>

namespace inferlab::kernels::cpu {

// y(out) = sum over i with |x_i| > threshold of x_i * wt[i, :], for one row x(in).
// wt (in, out) row-major: the weight transposed, so a skipped input is a
// skipped contiguous row of out floats. Each y[j] adds its terms in ascending
// i whatever the thread count.
int64_t sparse_input_gemv(float* y, const float* x, const float* wt, int64_t in, int64_t out, float threshold);

// Several projections of the same input x(in) (Q, K, V), each through its own
// threshold, in one parallel region; `zeros` is set to each one's count.
struct SparseInputTarget {
  float* y;
  const float* wt;  // (in, out)
  int64_t out;
  float threshold;
  int64_t zeros = 0;
};
void sparse_input_gemv_group(SparseInputTarget* targets, int count, const float* x, int64_t in);

// y(out) = the sum over j < n_rows of x[j] * wt[rows[j], :]: the listed rows
// of wt (·, out) only (a neuron subset's down columns, a head subset's O
// columns, from the transposed weight), in fixed chunks whatever the thread count.
void gather_rows_gemv(float* y, const float* x, const float* wt, const int32_t* rows, int64_t n_rows, int64_t out);

// dst(count) = x with the entries |x| <= threshold set to 0 (dst may be x).
int64_t sparsify(float* dst, const float* x, int64_t count, float threshold);

// CATS for one row: act(n_ff)[j] = silu(gate[j]) * (w_up[j, :] . x) where
// |silu(gate[j])| > threshold, else 0 without reading w_up's row j.
// w_up (n_ff, in) row-major, x (in).
int64_t gated_silu_up(float* act, const float* gate, const float* x, const float* w_up, int64_t n_ff, int64_t in,
                      float threshold);

// CATS for many rows whose up projection ran dense: act(count) = silu(gate) *
// up where |silu(gate)| > threshold, else 0 (act may alias gate).
int64_t gated_silu_mul(float* act, const float* gate, const float* up, int64_t count, float threshold);

inline float silu(float g) { return g / (1.0f + std::exp(-g)); }

}  // namespace inferlab::kernels::cpu

namespace inferlab::kernels::cpu {

// Oracle selection (ComponentMask::oracle_neurons): in each of `rows` rows of
// x (rows, cols) the k entries of largest magnitude stay and the others become
// 0; ties to the lower index (all of them stay when k >= cols).
void keep_top_k_magnitudes(float* x, int64_t rows, int64_t cols, int32_t k);

// Oracle selection of heads: in each row of attn (rows, n_heads * head_dim),
// the k heads among those with computed[h] != 0 whose output has the largest
// L2 norm keep it and every other head's output becomes 0; ties to the lower head.
void keep_top_heads(float* attn, int64_t rows, int32_t n_heads, int32_t head_dim, int32_t k, const uint8_t* computed);

}  // namespace inferlab::kernels::cpu
