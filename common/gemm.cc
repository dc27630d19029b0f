#include "common/gemm.h"

#include <cblas.h>

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
  // Inside the OpenMP region OpenBLAS runs each call on the calling thread.
  ParallelFor(count, [&](int64_t k) {
    int64_t tr = k / col_tiles, tc = k % col_tiles;
    if (upper_only) UpperTile(k, row_tiles, &tr, &tc);
    const int64_t r0 = tr * tiles.rows;
    const int64_t c0 = tc * tiles.cols;
    const int rows = static_cast<int>(std::min<int64_t>(tiles.rows, M - r0));
    const int cols = static_cast<int>(std::min<int64_t>(tiles.cols, N - c0));
    float* c_tile = c + r0 * ldc + c0;
    if (K <= 0) {
      for (int i = 0; i < rows; ++i) {
        for (int j = 0; j < cols; ++j) c_tile[i * ldc + j] *= beta;
      }
      return;
    }
    const float* a_tile = trans_a ? a + r0 : a + r0 * lda;
    const float* b_tile = trans_b ? b + c0 * ldb : b + c0;
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, rows, cols, K, alpha, a_tile, lda, b_tile,
                ldb, beta, c_tile, ldc);
  });
}

}  // namespace muonps
