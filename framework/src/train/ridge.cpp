// Linear maps fitted to captured activations: ridge regression through its
// normal equations, [x 1]^T [x 1] + ridge terms, solved by Cholesky (LAPACK
// dposv, which OpenBLAS provides); and the RMS-scaled rows such maps read.
#include <cblas.h>

#include <cmath>
#include <string>

#include "inferlab/train.h"

extern "C" void dposv_(const char* uplo, const int* n, const int* nrhs, double* a, const int* lda, double* b,
                       const int* ldb, int* info);

namespace inferlab::train {

Status ridge_regression(std::span<const float> x, std::span<const float> y, int64_t in, int64_t out, double ridge,
                        std::vector<float>& w, std::vector<float>& b) {
  if (in <= 0 || out <= 0 || x.empty() || x.size() % size_t(in) != 0)
    return Error{"ridge regression: " + std::to_string(x.size()) + " inputs are not rows of " + std::to_string(in)};
  const int64_t rows = int64_t(x.size()) / in;
  if (int64_t(y.size()) != rows * out)
    return Error{"ridge regression: " + std::to_string(y.size()) + " targets for " + std::to_string(rows) +
                 " rows of " + std::to_string(out)};
  if (!(ridge >= 0)) return Error{"ridge regression: the ridge must be >= 0"};
  const int64_t n = in + 1;  // the last column is the bias's constant 1
  if (n > int64_t(1) << 15) return Error{"ridge regression: more than 32767 inputs"};
  // In chunks of rows: G += xa^T xa and R += xa^T y, with xa = [x 1] in double.
  std::vector<double> g(size_t(n * n), 0.0), r(size_t(n * out), 0.0);
  constexpr int64_t kChunk = 512;
  std::vector<double> xa, ya;
  for (int64_t r0 = 0; r0 < rows; r0 += kChunk) {
    const int64_t m = std::min(kChunk, rows - r0);
    xa.resize(size_t(m * n));
    ya.resize(size_t(m * out));
    for (int64_t i = 0; i < m; ++i) {
      for (int64_t j = 0; j < in; ++j) xa[size_t(i * n + j)] = double(x[size_t((r0 + i) * in + j)]);
      xa[size_t(i * n + in)] = 1.0;
      for (int64_t j = 0; j < out; ++j) ya[size_t(i * out + j)] = double(y[size_t((r0 + i) * out + j)]);
    }
    cblas_dsyrk(CblasRowMajor, CblasUpper, CblasTrans, int(n), int(m), 1.0, xa.data(), int(n), 1.0, g.data(), int(n));
    cblas_dgemm(CblasRowMajor, CblasTrans, CblasNoTrans, int(n), int(out), int(m), 1.0, xa.data(), int(n), ya.data(),
                int(out), 1.0, r.data(), int(out));
  }
  for (int64_t j = 0; j < in; ++j) g[size_t(j * n + j)] += ridge * double(rows);
  // Row-major upper = column-major lower: LAPACK sees G (symmetric) and R^T's
  // columns as its right-hand sides, so solve for the transposed layout.
  std::vector<double> rhs(size_t(n * out));
  for (int64_t i = 0; i < n; ++i)
    for (int64_t k = 0; k < out; ++k) rhs[size_t(k * n + i)] = r[size_t(i * out + k)];
  const int ni = int(n), nrhs = int(out);
  int info = 0;
  dposv_("L", &ni, &nrhs, g.data(), &ni, rhs.data(), &ni, &info);
  if (info != 0)
    return Error{"ridge regression: the normal equations are not positive definite (LAPACK dposv info " +
                 std::to_string(info) + "); use a ridge > 0"};
  w.assign(size_t(out * in), 0.0f);
  b.assign(size_t(out), 0.0f);
  for (int64_t k = 0; k < out; ++k) {
    for (int64_t j = 0; j < in; ++j) w[size_t(k * in + j)] = float(rhs[size_t(k * n + j)]);
    b[size_t(k)] = float(rhs[size_t(k * n + in)]);
  }
  return ok_status();
}

void rms_scale_rows(std::span<float> rows, int64_t width, float eps) {
  for (size_t r = 0; r + size_t(width) <= rows.size(); r += size_t(width)) {
    double ss = 0;
    for (int64_t i = 0; i < width; ++i) ss += double(rows[r + size_t(i)]) * double(rows[r + size_t(i)]);
    const auto s = float(1.0 / std::sqrt(ss / double(width) + double(eps)));
    for (int64_t i = 0; i < width; ++i) rows[r + size_t(i)] *= s;
  }
}

}  // namespace inferlab::train
