// Matrix products whose rounding does not depend on the thread count.
//
// A multithreaded OpenBLAS sgemm partitions its output by the number of
// threads, and its edge kernels round differently from its main kernels, so
// the same product can differ in the last bit between 1 and 2 threads (seen
// with OpenBLAS 0.3.21 at shapes such as (517x128)^T (517x384)). TiledSgemm
// instead cuts C into tiles of a fixed size, computes each tile with one
// single-threaded BLAS call, and spreads the tiles over the threads: which
// call computes an element, and so its rounding, depends only on the shape.
#ifndef MUONPS_COMMON_GEMM_H_
#define MUONPS_COMMON_GEMM_H_

namespace muonps {

struct GemmTiles {
  int rows = 128;  // tile height (rows of C)
  int cols = 256;  // tile width (columns of C)
};

// C (M, N) = alpha * op(A) · op(B) + beta * C, all row-major, where op(A) is
// (M, K) and op(B) is (K, N). With upper_only (M == N; tiles made square)
// only the tiles on or above the diagonal are computed: enough for a
// symmetric result whose lower triangle the caller mirrors.
void TiledSgemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* a,
                int lda, const float* b, int ldb, float beta, float* c, int ldc,
                GemmTiles tiles = {}, bool upper_only = false);

}  // namespace muonps

#endif  // MUONPS_COMMON_GEMM_H_
