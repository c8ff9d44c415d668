// sgemm_tiles: the CPU backend's float32 products above the GEMV's rows. The
// same product whatever the thread count (OpenBLAS's own threading is not, on
// the Haswell kernels it also picks on AMD Zen), and the product itself.
#include <gtest/gtest.h>
#include <omp.h>

#include <cmath>
#include <vector>

#include "cpu/sgemm_tiles.h"
#include "inferlab/testing/support.h"

namespace inferlab {
namespace {

namespace kc = kernels::cpu;

struct Shape {
  int64_t m, n, k;
};

// C = alpha A op(B) + beta C with the given thread count; lda = k, ldb = k
// (trans_b) or n, ldc = n + 3 (a C wider than the product).
std::vector<float> product(const Shape& s, bool trans_b, int threads) {
  const auto a = test::normal_floats(s.m * s.k, 1), b = test::normal_floats(s.n * s.k, 2);
  const int64_t ldc = s.n + 3;
  auto c = test::normal_floats(s.m * ldc, 3);
  const int saved = omp_get_max_threads();
  omp_set_num_threads(threads);
  kc::sgemm_tiles(trans_b, s.m, s.n, s.k, 0.5f, a.data(), s.k, b.data(), trans_b ? s.k : s.n, 2.0f, c.data(), ldc);
  omp_set_num_threads(saved);
  return c;
}

// Shapes of one tile, of several in each direction with ragged edges, and of
// prefill-sized projections (SmolLM2's widths).
const Shape kShapes[] = {{3, 5, 7}, {257, 300, 64}, {400, 576, 576}, {600, 192, 576}, {513, 1536, 576}};

TEST(SgemmTiles, TheProductDoesNotDependOnTheThreadCount) {
  for (const Shape& s : kShapes)
    for (const bool trans_b : {true, false}) {
      const auto one = product(s, trans_b, 1);
      for (const int threads : {2, 3})  // (LLVM's OpenMP keeps a grown team's threads: LeakSanitizer reports 8)
        EXPECT_EQ(product(s, trans_b, threads), one) << s.m << "x" << s.n << "x" << s.k << " trans_b " << trans_b
                                                     << " threads " << threads;
    }
}

TEST(SgemmTiles, ComputesAlphaTimesTheProductPlusBetaTimesC) {
  for (const Shape& s : kShapes)
    for (const bool trans_b : {true, false}) {
      const auto a = test::normal_floats(s.m * s.k, 1), b = test::normal_floats(s.n * s.k, 2);
      const auto c0 = test::normal_floats(s.m * (s.n + 3), 3);
      const auto got = product(s, trans_b, 2);
      const int64_t ldc = s.n + 3;
      for (int64_t i = 0; i < s.m; ++i) {
        for (int64_t j = 0; j < s.n; ++j) {
          double sum = 0.0;
          for (int64_t p = 0; p < s.k; ++p)
            sum += double(a[size_t(i * s.k + p)]) * b[size_t(trans_b ? j * s.k + p : p * s.n + j)];
          const double want = 0.5 * sum + 2.0 * c0[size_t(i * ldc + j)];
          ASSERT_NEAR(got[size_t(i * ldc + j)], want, 1e-4 * (1.0 + std::sqrt(double(s.k))))
              << s.m << "x" << s.n << "x" << s.k << " trans_b " << trans_b << " at " << i << "," << j;
        }
        for (int64_t j = s.n; j < ldc; ++j)  // the columns past the product untouched
          ASSERT_EQ(got[size_t(i * ldc + j)], c0[size_t(i * ldc + j)]);
      }
    }
}

}  // namespace
}  // namespace inferlab
