#include "cpu/activation_sparse.h"

#include <immintrin.h>
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace inferlab::kernels::cpu {

namespace {

// Kept input rows per chunk: each chunk's rows are summed into its own partial
// row, the chunks then in order, so the result is the same whatever the thread count.
constexpr int64_t kChunkRows = 32;

// y[0, out) += the sum over `count` (1..4) rows of x_r * w_r[0, out), four
// rows streamed at once (one load and store of y per four products).
inline void axpy_rows(float* y, const float* const* w, const float* xs, int count, int64_t out) {
  const __m256 s0 = _mm256_set1_ps(xs[0]), s1 = _mm256_set1_ps(count > 1 ? xs[1] : 0.0f),
               s2 = _mm256_set1_ps(count > 2 ? xs[2] : 0.0f), s3 = _mm256_set1_ps(count > 3 ? xs[3] : 0.0f);
  const float* w0 = w[0];
  const float* w1 = count > 1 ? w[1] : w0;
  const float* w2 = count > 2 ? w[2] : w0;
  const float* w3 = count > 3 ? w[3] : w0;
  int64_t j = 0;
  for (; j + 8 <= out; j += 8) {
    __m256 acc = _mm256_loadu_ps(y + j);
    acc = _mm256_fmadd_ps(s0, _mm256_loadu_ps(w0 + j), acc);
    acc = _mm256_fmadd_ps(s1, _mm256_loadu_ps(w1 + j), acc);
    acc = _mm256_fmadd_ps(s2, _mm256_loadu_ps(w2 + j), acc);
    acc = _mm256_fmadd_ps(s3, _mm256_loadu_ps(w3 + j), acc);
    _mm256_storeu_ps(y + j, acc);
  }
  for (; j < out; ++j) {
    float acc = y[j];
    for (int r = 0; r < count; ++r) acc = std::fma(xs[r], w[r][j], acc);
    y[j] = acc;
  }
}

inline float dot(const float* a, const float* b, int64_t n) {
  __m256 a0 = _mm256_setzero_ps(), a1 = a0;
  int64_t d = 0;
  for (; d + 16 <= n; d += 16) {
    a0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d), _mm256_loadu_ps(b + d), a0);
    a1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + d + 8), _mm256_loadu_ps(b + d + 8), a1);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, _mm256_add_ps(a0, a1));
  float sum = 0;
  for (const float v : lanes) sum += v;
  for (; d < n; ++d) sum += a[d] * b[d];
  return sum;
}

}  // namespace

namespace {

// y(out) = the sum over j of xs[j] * wt[rows[j], :], for several jobs at once.
struct RowsJob {
  float* y;
  const float* wt;
  int64_t out;
  const int32_t* rows;
  const float* xs;  // per listed row
  int64_t n;
};

// Every job's rows in chunks of kChunkRows, all chunks of all jobs in one
// parallel loop (one fork and join for Q, K and V); chunk c of a job sums into
// its partial row c (chunk 0 straight into y), then the partials in order.
void run_rows_jobs(const RowsJob* jobs, int count) {
  struct Chunk {
    int job;
    int64_t first, last;  // into the job's rows
    float* acc;
  };
  thread_local std::vector<float> partial;
  thread_local std::vector<Chunk> chunks;
  chunks.clear();
  int64_t partial_rows = 0, work = 0;
  for (int j = 0; j < count; ++j) {
    std::fill(jobs[j].y, jobs[j].y + jobs[j].out, 0.0f);
    work += jobs[j].n * jobs[j].out;
    partial_rows += std::max<int64_t>((jobs[j].n + kChunkRows - 1) / kChunkRows - 1, 0) * jobs[j].out;
  }
  partial.resize(size_t(partial_rows));
  float* next_partial = partial.data();  // the calling thread's: the workers' thread_locals are others
  for (int j = 0; j < count; ++j)
    for (int64_t r = 0, c = 0; r < jobs[j].n; r += kChunkRows, ++c) {
      float* acc = jobs[j].y;
      if (c > 0) {
        acc = next_partial;
        next_partial += jobs[j].out;
        std::fill(acc, acc + jobs[j].out, 0.0f);
      }
      chunks.push_back({j, r, std::min(r + kChunkRows, jobs[j].n), acc});
    }
  const Chunk* list = chunks.data();
  const int64_t n_chunks = int64_t(chunks.size());
#pragma omp parallel for schedule(static) if (work >= (1 << 15))
  for (int64_t c = 0; c < n_chunks; ++c) {
    const Chunk& ch = list[c];
    const RowsJob& job = jobs[ch.job];
    for (int64_t r = ch.first; r < ch.last; r += 4) {
      const int n = int(std::min<int64_t>(4, ch.last - r));
      const float* w[4];
      for (int k = 0; k < n; ++k) w[k] = job.wt + int64_t(job.rows[r + k]) * job.out;
      axpy_rows(ch.acc, w, job.xs + r, n, job.out);
    }
  }
  for (const Chunk& ch : chunks) {
    float* y = jobs[ch.job].y;
    if (ch.acc == y) continue;
    for (int64_t j = 0; j < jobs[ch.job].out; ++j) y[j] += ch.acc[j];
  }
}

}  // namespace

void sparse_input_gemv_group(SparseInputTarget* targets, int count, const float* x, int64_t in) {
  thread_local std::vector<int32_t> kept;
  thread_local std::vector<float> kept_x;
  thread_local std::vector<RowsJob> jobs;
  kept.resize(size_t(count) * size_t(in));
  kept_x.resize(kept.size());
  jobs.clear();
  for (int t = 0; t < count; ++t) {
    int32_t* rows = kept.data() + size_t(t) * size_t(in);
    float* xs = kept_x.data() + size_t(t) * size_t(in);
    int64_t n = 0;
    for (int64_t i = 0; i < in; ++i)
      if (std::fabs(x[i]) > targets[t].threshold) {
        rows[n] = int32_t(i);
        xs[n++] = x[i];
      }
    targets[t].zeros = in - n;
    jobs.push_back({targets[t].y, targets[t].wt, targets[t].out, rows, xs, n});
  }
  run_rows_jobs(jobs.data(), count);
}

void gather_rows_gemv(float* y, const float* x, const float* wt, const int32_t* rows, int64_t n_rows, int64_t out) {
  const RowsJob job{y, wt, out, rows, x, n_rows};
  run_rows_jobs(&job, 1);
}

int64_t sparse_input_gemv(float* y, const float* x, const float* wt, int64_t in, int64_t out, float threshold) {
  SparseInputTarget t{y, wt, out, threshold};
  sparse_input_gemv_group(&t, 1, x, in);
  return t.zeros;
}

int64_t sparsify(float* dst, const float* x, int64_t count, float threshold) {
  int64_t zeros = 0;
  for (int64_t i = 0; i < count; ++i) {
    const bool zero = std::fabs(x[i]) <= threshold;
    zeros += zero;
    dst[i] = zero ? 0.0f : x[i];
  }
  return zeros;
}

int64_t gated_silu_up(float* act, const float* gate, const float* x, const float* w_up, int64_t n_ff, int64_t in,
                      float threshold) {
  int64_t zeros = 0;
#pragma omp parallel for reduction(+ : zeros) if (n_ff * in >= (1 << 15))
  for (int64_t j = 0; j < n_ff; ++j) {
    const float s = silu(gate[j]);
    if (std::fabs(s) <= threshold) {
      act[j] = 0.0f;
      ++zeros;
    } else {
      act[j] = s * dot(w_up + j * in, x, in);
    }
  }
  return zeros;
}

int64_t gated_silu_mul(float* act, const float* gate, const float* up, int64_t count, float threshold) {
  int64_t zeros = 0;
#pragma omp parallel for reduction(+ : zeros) if (count > 65536)
  for (int64_t i = 0; i < count; ++i) {
    const float s = silu(gate[i]);
    const bool zero = std::fabs(s) <= threshold;
    zeros += zero;
    act[i] = zero ? 0.0f : s * up[i];
  }
  return zeros;
}

namespace {

// The indices of the k largest values of `score` (ties to the lower index), flagged in `keep`.
void flag_top_k(const float* score, int64_t n, int32_t k, std::vector<int32_t>& order, std::vector<uint8_t>& keep) {
  order.resize(size_t(n));
  for (int64_t i = 0; i < n; ++i) order[size_t(i)] = int32_t(i);
  const int64_t kk = std::min<int64_t>(k, n);
  std::nth_element(order.begin(), order.begin() + kk, order.end(), [&](int32_t a, int32_t b) {
    return score[a] > score[b] || (score[a] == score[b] && a < b);
  });
  keep.assign(size_t(n), 0);
  for (int64_t i = 0; i < kk; ++i) keep[size_t(order[size_t(i)])] = 1;
}

}  // namespace

void keep_top_k_magnitudes(float* x, int64_t rows, int64_t cols, int32_t k) {
  if (k >= cols) return;
#pragma omp parallel for if (rows > 1)
  for (int64_t r = 0; r < rows; ++r) {
    std::vector<int32_t> order;
    std::vector<uint8_t> keep;
    std::vector<float> mag(static_cast<size_t>(cols));
    float* row = x + r * cols;
    for (int64_t j = 0; j < cols; ++j) mag[size_t(j)] = std::fabs(row[j]);
    flag_top_k(mag.data(), cols, k, order, keep);
    for (int64_t j = 0; j < cols; ++j)
      if (keep[size_t(j)] == 0) row[j] = 0.0f;
  }
}

void keep_top_heads(float* attn, int64_t rows, int32_t n_heads, int32_t head_dim, int32_t k, const uint8_t* computed) {
  std::vector<int32_t> order;
  std::vector<uint8_t> keep;
  std::vector<float> norm(static_cast<size_t>(n_heads));
  for (int64_t r = 0; r < rows; ++r) {
    float* row = attn + r * n_heads * head_dim;
    for (int32_t h = 0; h < n_heads; ++h) {
      double sum = 0;
      for (int32_t d = 0; d < head_dim; ++d) sum += double(row[h * head_dim + d]) * row[h * head_dim + d];
      norm[size_t(h)] = computed[h] != 0 ? float(std::sqrt(sum)) : -1.0f;  // never before a computed head
    }
    flag_top_k(norm.data(), n_heads, k, order, keep);
    for (int32_t h = 0; h < n_heads; ++h)
      if (keep[size_t(h)] == 0 || computed[h] == 0) std::fill(row + h * head_dim, row + (h + 1) * head_dim, 0.0f);
  }
}

}  // namespace inferlab::kernels::cpu

