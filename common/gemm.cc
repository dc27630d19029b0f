#include "common/gemm.h"

#include <cblas.h>
#include <omp.h>

#include <algorithm>
#include <cstdint>

#include "common/parallel.h"

namespace muonps {
namespace {

// The k-th tile (row, col) with col >= row of a tiles x tiles grid, row-major.
void UpperTile(int64_t k, int tiles, int64_t* row, int64_t* col) {
  int64_t r = 0;
  while (k >= tiles - r) {
    k -= tiles - r;
    ++r;
  }
  *row = r;
  *col = r + k;
}

}  // namespace

void Sgemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc) {
  if (M <= 0 || N <= 0) return;
  if (K <= 0) {
    for (int64_t i = 0; i < M; ++i) {
      for (int64_t j = 0; j < N; ++j) c[i * ldc + j] = beta == 0.0f ? 0.0f : beta * c[i * ldc + j];
    }
    return;
  }
  // OpenBLAS's OpenMP build sizes its team from this thread's setting unless
  // it is called inside an active parallel region: pin it to one.
  if (omp_get_max_threads() != 1) omp_set_num_threads(1);
  cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
              trans_b ? CblasTrans : CblasNoTrans, M, N, K, alpha, a, static_cast<int>(lda), b,
              static_cast<int>(ldb), beta, c, static_cast<int>(ldc));
}

void TiledSgemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* a,
                int lda, const float* b, int ldb, float beta, float* c, int ldc, GemmTiles tiles,
                bool upper_only) {
  if (M <= 0 || N <= 0) return;
  const int row_tiles = (M + tiles.rows - 1) / tiles.rows;
  // With upper_only the tiles are square and only those on or above the
  // diagonal are enumerated, so the threads share the real work evenly.
  if (upper_only) tiles.cols = tiles.rows;
  const int col_tiles = (N + tiles.cols - 1) / tiles.cols;
  const int64_t count = upper_only ? static_cast<int64_t>(row_tiles) * (row_tiles + 1) / 2
                                   : static_cast<int64_t>(row_tiles) * col_tiles;
  ParallelFor(count, [&](int64_t k) {
    int64_t tr = k / col_tiles, tc = k % col_tiles;
    if (upper_only) UpperTile(k, row_tiles, &tr, &tc);
    const int64_t r0 = tr * tiles.rows;
    const int64_t c0 = tc * tiles.cols;
    const int rows = static_cast<int>(std::min<int64_t>(tiles.rows, M - r0));
    const int cols = static_cast<int>(std::min<int64_t>(tiles.cols, N - c0));
    const float* a_tile = trans_a ? a + r0 : a + r0 * lda;
    const float* b_tile = trans_b ? b + c0 * ldb : b + c0;
    Sgemm(trans_a, trans_b, rows, cols, K, alpha, a_tile, lda, b_tile, ldb, beta, c + r0 * ldc + c0,
          ldc);
  });
}

}  // namespace muonps
