#include "cuda/backward.cuh"

#include <algorithm>

#include "counter_rng.h"
#include "cuda/block_reduce.cuh"
#include "cuda/launch_checks.cuh"
#include "cuda/rope_math.cuh"

namespace inferlab::kernels::cuda {

cublasStatus_t sgemm_rm(cublasHandle_t handle, bool trans_a, bool trans_b, int64_t m, int64_t n, int64_t k,
                        float alpha, const float* a, int64_t lda, const float* b, int64_t ldb, float beta, float* c,
                        int64_t ldc) {
  if (m == 0 || n == 0) return CUBLAS_STATUS_SUCCESS;
  // Column-major view of row-major storage: C^T (n, m) = op(B)^T (n, k) op(A)^T (k, m).
  return cublasSgemm(handle, trans_b ? CUBLAS_OP_T : CUBLAS_OP_N, trans_a ? CUBLAS_OP_T : CUBLAS_OP_N, int(n), int(m),
                     int(k), &alpha, b, int(ldb), a, int(lda), &beta, c, int(ldc));
}

namespace {

constexpr int kThreads = 256;

// Block per row.
__global__ void rmsnorm_inverse_kernel(float* inv, const float* x, int64_t n, float eps) {
  const float* xr = x + int64_t(blockIdx.x) * n;
  double sum_sq = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) sum_sq += double(xr[i]) * double(xr[i]);
  sum_sq = block_sum_double(sum_sq);
  // Correctly rounded sqrt and division, as the CPU twin computes them: the
  // library is built with fast math, which would make both approximate.
  if (threadIdx.x == 0) inv[blockIdx.x] = __fdiv_rn(1.0f, __fsqrt_rn(float(sum_sq / double(n)) + eps));
}

__global__ void rmsnorm_backward_kernel(float* dx, const float* dy, const float* x, const float* inv,
                                        const float* weight, int64_t n, bool accumulate) {
  const int64_t off = int64_t(blockIdx.x) * n;
  double dot = 0.0;
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) dot += double(dy[off + i]) * double(weight[i]) * double(x[off + i]);
  dot = block_sum_double(dot);
  const float s = inv[blockIdx.x];
  const float c = float(double(s) * double(s) * double(s) * dot / double(n));
  for (int64_t i = threadIdx.x; i < n; i += blockDim.x) {
    const float g = s * dy[off + i] * weight[i] - x[off + i] * c;
    dx[off + i] = accumulate ? dx[off + i] + g : g;
  }
}

// Block per row; a thread takes pairs i of every head, rotated by minus the angle.
__global__ void rope_backward_kernel(float* dx, int64_t row_stride, int64_t n_heads, int64_t head_dim,
                                     const int32_t* positions, const RopeFreqs freqs) {
  const int64_t r = blockIdx.x;
  const int32_t position = -positions[r];
  for (int32_t i = threadIdx.x; i < freqs.half; i += blockDim.x) {
    float c, s;
    rope_cos_sin(freqs, i, position, &c, &s);
    for (int64_t h = 0; h < n_heads; ++h) {
      float* head = dx + r * row_stride + h * head_dim;
      rope_rotate_pair(freqs, i, c, s, [&](int32_t d) { return head[d]; }, [&](int32_t d, float v) { head[d] = v; });
    }
  }
}

__global__ void silu_mul_backward_kernel(float* dgate, float* dup, const float* dact, const float* gate,
                                         const float* up, int64_t count) {
  INFERLAB_GRID_STRIDE(i, count) {
    const float g = gate[i];
    const float s = 1.0f / (1.0f + expf(-g));
    const float d = dact[i];
    dup[i] = d * g * s;
    dgate[i] = d * up[i] * s * (1.0f + g * (1.0f - s));
  }
}

// q . k over head_dim.
__device__ __forceinline__ float dot(const float* a, const float* b, int64_t n) {
  float s = 0.0f;
  for (int64_t e = 0; e < n; ++e) s += a[e] * b[e];
  return s;
}

// Block (query t, head h, sequence b); scores of keys 0..t in shared memory.
__global__ void causal_attention_forward_kernel(const float* q, const float* k, const float* v, float* out,
                                                float* lse, int64_t seq_len, int64_t n_heads, int64_t n_kv_heads,
                                                int64_t head_dim, float scale) {
  extern __shared__ float scores[];
  const int64_t t = blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / (n_heads / n_kv_heads);
  const int64_t qs = n_heads * head_dim, ks = n_kv_heads * head_dim;
  const float* qi = q + (b * seq_len + t) * qs + h * head_dim;
  const float* kb = k + b * seq_len * ks + g * head_dim;
  const float* vb = v + b * seq_len * ks + g * head_dim;
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j <= t; j += blockDim.x) {
    scores[j] = scale * dot(qi, kb + j * ks, head_dim);
    m = fmaxf(m, scores[j]);
  }
  m = block_max(m);
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j <= t; j += blockDim.x) sum += exp(double(scores[j]) - double(m));
  sum = block_sum_double(sum);
  const float l = m + float(log(sum));
  for (int64_t j = threadIdx.x; j <= t; j += blockDim.x) scores[j] = expf(scores[j] - l);
  __syncthreads();
  if (threadIdx.x == 0) lse[(b * n_heads + h) * seq_len + t] = l;
  float* oi = out + (b * seq_len + t) * qs + h * head_dim;
  for (int64_t e = threadIdx.x; e < head_dim; e += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j <= t; ++j) acc += scores[j] * vb[j * ks + e];
    oi[e] = acc;
  }
}

// Block (row, head): delta = rowsum(dout * out) of the head, in double.
__global__ void attention_delta_kernel(float* delta, const float* dout, const float* out, int64_t n_heads,
                                       int64_t head_dim) {
  const int64_t r = blockIdx.x, h = blockIdx.y, off = r * n_heads * head_dim + h * head_dim;
  double s = 0.0;
  for (int64_t e = threadIdx.x; e < head_dim; e += blockDim.x) s += double(dout[off + e]) * double(out[off + e]);
  s = block_sum_double(s);
  if (threadIdx.x == 0) delta[r * n_heads + h] = float(s);
}

// Block (query i, head h, sequence b): dq_i = scale sum_j dS_ij k_j over j <= i.
__global__ void attention_dq_kernel(float* dq, const float* delta, const float* dout, const float* q, const float* k,
                                    const float* v, const float* lse, int64_t seq_len, int64_t n_heads,
                                    int64_t n_kv_heads, int64_t head_dim, float scale) {
  extern __shared__ float ds[];
  const int64_t i = blockIdx.x, h = blockIdx.y, b = blockIdx.z, g = h / (n_heads / n_kv_heads);
  const int64_t qs = n_heads * head_dim, ks = n_kv_heads * head_dim, row = b * seq_len + i;
  const float* qi = q + row * qs + h * head_dim;
  const float* doi = dout + row * qs + h * head_dim;
  const float* kb = k + b * seq_len * ks + g * head_dim;
  const float* vb = v + b * seq_len * ks + g * head_dim;
  const float l = lse[(b * n_heads + h) * seq_len + i], d_i = delta[row * n_heads + h];
  for (int64_t j = threadIdx.x; j <= i; j += blockDim.x) {
    const float p = expf(scale * dot(qi, kb + j * ks, head_dim) - l);
    ds[j] = p * (dot(doi, vb + j * ks, head_dim) - d_i);
  }
  __syncthreads();
  float* dqi = dq + row * qs + h * head_dim;
  for (int64_t e = threadIdx.x; e < head_dim; e += blockDim.x) {
    float acc = 0.0f;
    for (int64_t j = 0; j <= i; ++j) acc += ds[j] * kb[j * ks + e];
    dqi[e] = scale * acc;
  }
}

// Block (key j, kv head g, sequence b): over the group's heads in order and the
// queries i >= j, dk_j = scale sum dS_ij q_i and dv_j = sum P_ij dout_i.
__global__ void attention_dkv_kernel(float* dk, float* dv, const float* delta, const float* dout, const float* q,
                                     const float* k, const float* v, const float* lse, int64_t seq_len,
                                     int64_t n_heads, int64_t n_kv_heads, int64_t head_dim, float scale) {
  extern __shared__ float shared[];
  float* p = shared;              // seq_len
  float* ds = shared + seq_len;   // seq_len
  const int64_t j = blockIdx.x, g = blockIdx.y, b = blockIdx.z, group = n_heads / n_kv_heads;
  const int64_t qs = n_heads * head_dim, ks = n_kv_heads * head_dim, count = seq_len - j;
  const float* kj = k + (b * seq_len + j) * ks + g * head_dim;
  const float* vj = v + (b * seq_len + j) * ks + g * head_dim;
  float* dkj = dk + (b * seq_len + j) * ks + g * head_dim;
  float* dvj = dv + (b * seq_len + j) * ks + g * head_dim;
  for (int64_t hi = 0; hi < group; ++hi) {
    const int64_t h = g * group + hi;
    __syncthreads();  // the previous head's p and ds are read to the end
    for (int64_t x = threadIdx.x; x < count; x += blockDim.x) {
      const int64_t row = b * seq_len + j + x;
      const float pij = expf(scale * dot(q + row * qs + h * head_dim, kj, head_dim) -
                             lse[(b * n_heads + h) * seq_len + j + x]);
      p[x] = pij;
      ds[x] = pij * (dot(dout + row * qs + h * head_dim, vj, head_dim) - delta[row * n_heads + h]);
    }
    __syncthreads();
    for (int64_t e = threadIdx.x; e < head_dim; e += blockDim.x) {
      float acc_k = 0.0f, acc_v = 0.0f;
      for (int64_t x = 0; x < count; ++x) {
        const int64_t row = b * seq_len + j + x;
        acc_k += ds[x] * q[row * qs + h * head_dim + e];
        acc_v += p[x] * dout[row * qs + h * head_dim + e];
      }
      dkj[e] = hi == 0 ? scale * acc_k : dkj[e] + scale * acc_k;
      dvj[e] = hi == 0 ? acc_v : dvj[e] + acc_v;
    }
  }
}

// Block per row of logits.
__global__ void softmax_cross_entropy_kernel(float* z, const int32_t* targets, int64_t vocab, float grad_scale,
                                             bool write_grad, double* loss) {
  float* zr = z + int64_t(blockIdx.x) * vocab;
  const int32_t target = targets[blockIdx.x];
  float m = -INFINITY;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) m = fmaxf(m, zr[j]);
  m = block_max(m);
  double sum = 0.0;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) sum += exp(double(zr[j]) - double(m));
  sum = block_sum_double(sum);
  const double l = double(m) + log(sum);
  const float zt = zr[target];
  __syncthreads();  // every thread read zr[target] before it is overwritten
  if (threadIdx.x == 0) loss[blockIdx.x] = l - double(zt);
  if (!write_grad) return;
  for (int64_t j = threadIdx.x; j < vocab; j += blockDim.x) {
    float gj = float(exp(double(zr[j]) - l)) * grad_scale;
    if (j == target) gj -= grad_scale;
    zr[j] = gj;
  }
}

__global__ void dropout_kernel(float* out, const float* x, int64_t count, uint64_t key, float p, float keep_scale,
                               bool accumulate) {
  INFERLAB_GRID_STRIDE(e, count) {
    const float v = x[e] * dropout_factor(key, e, p, keep_scale);
    out[e] = accumulate ? out[e] + v : v;
  }
}

__global__ void flagged_rows_kernel(float* out, const float* x, const uint8_t* flags, int64_t rows, int64_t n) {
  INFERLAB_GRID_STRIDE(i, rows * n) {
    if (flags[i / n] != 0) out[i] = x ? x[i] : 0.0f;
  }
}

__global__ void scatter_rows_kernel(float* out, const float* in, const int32_t* rows, int64_t count, int64_t n) {
  INFERLAB_GRID_STRIDE(i, count * n) out[int64_t(rows[i / n]) * n + i % n] = in[i];
}

bool attention_shape_ok(int64_t batch, int64_t seq_len, int64_t n_heads, int64_t n_kv_heads, int64_t head_dim) {
  return batch > 0 && batch <= 65535 && seq_len > 0 && seq_len <= kTrainAttentionMaxSeq && n_kv_heads > 0 &&
         n_heads > 0 && n_heads <= 65535 && n_heads % n_kv_heads == 0 && head_dim > 0;
}

}  // namespace

cudaError_t rmsnorm_inverse(float* inv, const float* x, int64_t rows, int64_t n, float eps, cudaStream_t stream) {
  if (rows < 0 || rows > kMaxGridX || n <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  rmsnorm_inverse_kernel<<<unsigned(rows), kThreads, 0, stream>>>(inv, x, n, eps);
  return cudaGetLastError();
}

cudaError_t rmsnorm_backward(float* dx, const float* dy, const float* x, const float* inv, const float* weight,
                             int64_t rows, int64_t n, bool accumulate, cudaStream_t stream) {
  if (rows < 0 || rows > kMaxGridX || n <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  rmsnorm_backward_kernel<<<unsigned(rows), kThreads, 0, stream>>>(dx, dy, x, inv, weight, n, accumulate);
  return cudaGetLastError();
}

cudaError_t rope_backward(float* dx, int64_t rows, int64_t row_stride, int64_t n_heads, int64_t head_dim,
                          int64_t rope_dim, const int32_t* positions, float theta, bool neox, cudaStream_t stream,
                          const RopeScaling& scaling) {
  RopeFreqs freqs;
  if (rows < 0 || rows > kMaxGridX || n_heads <= 0 || head_dim <= 0 || rope_dim > head_dim ||
      n_heads * head_dim > row_stride || !make_rope_freqs(rope_dim, theta, neox, &freqs, scaling))
    return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const int threads = int(std::min<int64_t>(128, (freqs.half + 31) / 32 * 32));
  rope_backward_kernel<<<unsigned(rows), threads, 0, stream>>>(dx, row_stride, n_heads, head_dim, positions, freqs);
  return cudaGetLastError();
}

cudaError_t silu_mul_backward(float* dgate, float* dup, const float* dact, const float* gate, const float* up,
                              int64_t count, cudaStream_t stream) {
  if (count < 0) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  silu_mul_backward_kernel<<<grid_stride_blocks(count, kThreads), kThreads, 0, stream>>>(dgate, dup, dact, gate, up,
                                                                                          count);
  return cudaGetLastError();
}

cudaError_t causal_attention_forward(const float* q, const float* k, const float* v, float* out, float* lse,
                                     int64_t batch, int64_t seq_len, int64_t n_heads, int64_t n_kv_heads,
                                     int64_t head_dim, float scale, cudaStream_t stream) {
  if (!attention_shape_ok(batch, seq_len, n_heads, n_kv_heads, head_dim)) return cudaErrorInvalidValue;
  const dim3 grid{unsigned(seq_len), unsigned(n_heads), unsigned(batch)};
  causal_attention_forward_kernel<<<grid, 128, size_t(seq_len) * sizeof(float), stream>>>(
      q, k, v, out, lse, seq_len, n_heads, n_kv_heads, head_dim, scale);
  return cudaGetLastError();
}

cudaError_t causal_attention_backward(float* dq, float* dk, float* dv, float* delta, const float* dout,
                                      const float* q, const float* k, const float* v, const float* out,
                                      const float* lse, int64_t batch, int64_t seq_len, int64_t n_heads,
                                      int64_t n_kv_heads, int64_t head_dim, float scale, cudaStream_t stream) {
  if (!attention_shape_ok(batch, seq_len, n_heads, n_kv_heads, head_dim)) return cudaErrorInvalidValue;
  const int64_t rows = batch * seq_len;
  if (rows > kMaxGridX) return cudaErrorInvalidValue;
  attention_delta_kernel<<<dim3(unsigned(rows), unsigned(n_heads)), 32, 0, stream>>>(delta, dout, out, n_heads,
                                                                                    head_dim);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  const dim3 grid{unsigned(seq_len), unsigned(n_heads), unsigned(batch)};
  attention_dq_kernel<<<grid, 128, size_t(seq_len) * sizeof(float), stream>>>(dq, delta, dout, q, k, v, lse, seq_len,
                                                                               n_heads, n_kv_heads, head_dim, scale);
  if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  // Two floats per query in shared memory: up to 64 KiB, above the default 48.
  const size_t shared = 2 * size_t(seq_len) * sizeof(float);
  if (shared > 48 * 1024) {
    if (cudaError_t e = cudaFuncSetAttribute(attention_dkv_kernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                             int(shared));
        e != cudaSuccess)
      return e;
  }
  const dim3 grid_kv{unsigned(seq_len), unsigned(n_kv_heads), unsigned(batch)};
  attention_dkv_kernel<<<grid_kv, 128, shared, stream>>>(dk, dv, delta, dout, q, k, v, lse, seq_len, n_heads,
                                                         n_kv_heads, head_dim, scale);
  return cudaGetLastError();
}

cudaError_t softmax_cross_entropy(float* z, const int32_t* targets, int64_t m, int64_t vocab, float grad_scale,
                                  bool write_grad, double* loss, cudaStream_t stream) {
  if (m < 0 || m > kMaxGridX || vocab <= 0) return cudaErrorInvalidValue;
  if (m == 0) return cudaSuccess;
  softmax_cross_entropy_kernel<<<unsigned(m), kThreads, 0, stream>>>(z, targets, vocab, grad_scale, write_grad, loss);
  return cudaGetLastError();
}

cudaError_t dropout(float* out, const float* x, int64_t count, uint64_t key, float p, float keep_scale,
                    bool accumulate, cudaStream_t stream) {
  if (count < 0) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  dropout_kernel<<<grid_stride_blocks(count, kThreads), kThreads, 0, stream>>>(out, x, count, key, p, keep_scale,
                                                                               accumulate);
  return cudaGetLastError();
}

cudaError_t copy_flagged_rows(float* out, const float* x, const uint8_t* flags, int64_t rows, int64_t n,
                              cudaStream_t stream) {
  if (rows < 0 || n <= 0 || x == nullptr) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  flagged_rows_kernel<<<grid_stride_blocks(rows * n, kThreads), kThreads, 0, stream>>>(out, x, flags, rows, n);
  return cudaGetLastError();
}

cudaError_t zero_flagged_rows(float* out, const uint8_t* flags, int64_t rows, int64_t n, cudaStream_t stream) {
  if (rows < 0 || n <= 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  flagged_rows_kernel<<<grid_stride_blocks(rows * n, kThreads), kThreads, 0, stream>>>(out, nullptr, flags, rows, n);
  return cudaGetLastError();
}

cudaError_t scatter_rows(float* out, const float* in, const int32_t* rows, int64_t count, int64_t n,
                         cudaStream_t stream) {
  if (count < 0 || n <= 0) return cudaErrorInvalidValue;
  if (count == 0) return cudaSuccess;
  scatter_rows_kernel<<<grid_stride_blocks(count * n, kThreads), kThreads, 0, stream>>>(out, in, rows, count, n);
  return cudaGetLastError();
}

}  // namespace inferlab::kernels::cuda
