#include "cpu/sgemm_tiles.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>

namespace inferlab::kernels::cpu {
namespace {

void tile(int64_t t, int64_t tiles_n, bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a,
          int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  const int64_t i0 = (t / tiles_n) * kSgemmTileRows, j0 = (t % tiles_n) * kSgemmTileCols;
  const int64_t rows = std::min(kSgemmTileRows, m - i0), cols = std::min(kSgemmTileCols, n - j0);
  cblas_sgemm(CblasRowMajor, CblasNoTrans, trans_b ? CblasTrans : CblasNoTrans, blasint(rows), blasint(cols),
              blasint(k), alpha, a + i0 * lda, blasint(lda), trans_b ? b + j0 * ldb : b + j0, blasint(ldb), beta,
              c + i0 * ldc + j0, blasint(ldc));
}

// OpenBLAS (its OpenMP build) runs one thread inside an active parallel
// region and otherwise omp_get_max_threads(): this holds the latter at one
// for calls made outside such a region.
class OneBlasThread {
 public:
  OneBlasThread() : saved_(omp_get_max_threads()) { omp_set_num_threads(1); }
  ~OneBlasThread() { omp_set_num_threads(saved_); }
  OneBlasThread(const OneBlasThread&) = delete;
  OneBlasThread& operator=(const OneBlasThread&) = delete;

 private:
  int saved_;
};

}  // namespace

void sgemm_tiles(bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (m <= 0 || n <= 0) return;
  const int64_t tiles_n = (n + kSgemmTileCols - 1) / kSgemmTileCols;
  const int64_t tiles = (m + kSgemmTileRows - 1) / kSgemmTileRows * tiles_n;
  const int64_t team = std::min<int64_t>(omp_in_parallel() ? 1 : omp_get_max_threads(), tiles);
  if (team <= 1) {
    const OneBlasThread one;
    for (int64_t t = 0; t < tiles; ++t) tile(t, tiles_n, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
    return;
  }
#pragma omp parallel for schedule(dynamic) num_threads(int(team))
  for (int64_t t = 0; t < tiles; ++t) tile(t, tiles_n, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc);
}

}  // namespace inferlab::kernels::cpu
