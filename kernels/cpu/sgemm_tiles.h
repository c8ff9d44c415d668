// OpenBLAS sgemm in fixed tiles of the output, so that a product does not
// depend on the thread count.
#pragma once

#include <cstdint>

namespace inferlab::kernels::cpu {

// C(m, n) = alpha * A(m, k) * op(B) + beta * C, row-major; op(B) = B(k, n), or
// B(n, k)^T when trans_b. C is cut into tiles of at most kSgemmTileRows x
// kSgemmTileCols, each one single-threaded sgemm; this library's OpenMP
// threads share the tiles.
//
// Why not OpenBLAS's own threads: they split C by the thread count, and some
// of its kernels (Haswell's, which it also picks on AMD Zen) then sum an
// element in a different order, so the same product would change with the
// thread count, which the CPU backend's thread governor changes between
// calls. Here every element's sum is that of one fixed single-threaded call.
inline constexpr int64_t kSgemmTileRows = 256;
inline constexpr int64_t kSgemmTileCols = 256;
void sgemm_tiles(bool trans_b, int64_t m, int64_t n, int64_t k, float alpha, const float* a, int64_t lda,
                 const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

}  // namespace inferlab::kernels::cpu
