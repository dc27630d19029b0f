#include "services/optimizer/newton_schulz.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include <cblas.h>

#include "common/parallel.h"
#include "services/optimizer/grad_norm.h"

namespace muonps {
namespace {

constexpr float kA = 3.4445f;
constexpr float kB = -4.7750f;
constexpr float kC = 2.0315f;
constexpr double kNormEps = 1e-7;

// Edge of the output tiles the products are split into. A constant, so which
// BLAS call computes an element, and thus its rounding, depends only on the
// shape. (A multithreaded BLAS call partitions its output by the thread count,
// and OpenBLAS's edge kernels round differently from its main kernels.)
constexpr int kTile = 256;

// Per-thread scratch, grown on demand and never shrunk.
struct Workspace {
  std::vector<float> x;  // (m, n) or (n, m): the ping-pong partner of `out`
  std::vector<float> a;  // (m, m) X X^T
  std::vector<float> b;  // (m, m) a I + b A + c A A

  void Reserve(int64_t xn, int64_t mm) {
    if (static_cast<int64_t>(x.size()) < xn) x.resize(xn);
    if (static_cast<int64_t>(a.size()) < mm) a.resize(mm);
    if (static_cast<int64_t>(b.size()) < mm) b.resize(mm);
  }
};

int NumTiles(int extent) { return (extent + kTile - 1) / kTile; }

// The k-th tile (row, col) with col >= row of a tiles x tiles grid, row-major.
std::pair<int, int> UpperTile(int64_t k, int tiles) {
  int row = 0;
  while (k >= tiles - row) {
    k -= tiles - row;
    ++row;
  }
  return {row, row + static_cast<int>(k)};
}

// C (M, N) = alpha * op(A) op(B) + beta * C, row-major, with op(A) (M, K) and
// op(B) (K, N), as one single-threaded BLAS call per kTile x kTile tile of C,
// the tiles spread over the threads. With upper_only (M == N), only tiles on
// or above the diagonal are computed: enough for a symmetric result.
void TiledGemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* a,
               int lda, const float* b, int ldb, float beta, float* c, int ldc, bool upper_only) {
  const int row_tiles = NumTiles(M);
  const int col_tiles = NumTiles(N);
  const int64_t count = upper_only ? static_cast<int64_t>(row_tiles) * (row_tiles + 1) / 2
                                   : static_cast<int64_t>(row_tiles) * col_tiles;
  // Inside the parallel region OpenBLAS runs each call on the calling thread.
  ParallelFor(count, [&](int64_t k) {
    const auto [tr, tc] =
        upper_only ? UpperTile(k, row_tiles) : std::pair<int, int>(k / col_tiles, k % col_tiles);
    const int64_t r0 = static_cast<int64_t>(tr) * kTile;
    const int64_t c0 = static_cast<int64_t>(tc) * kTile;
    const int rows = std::min<int>(kTile, M - r0);
    const int cols = std::min<int>(kTile, N - c0);
    const float* a_tile = trans_a ? a + r0 : a + r0 * lda;
    const float* b_tile = trans_b ? b + c0 * ldb : b + c0;
    cblas_sgemm(CblasRowMajor, trans_a ? CblasTrans : CblasNoTrans,
                trans_b ? CblasTrans : CblasNoTrans, rows, cols, K, alpha, a_tile, lda, b_tile, ldb,
                beta, c + r0 * ldc + c0, ldc);
  });
}

// s (m, m) holds a symmetric matrix in its upper triangle (row-major, j >= i).
// Copies it into the lower triangle, adds diag_add to the diagonal, and when
// copy is not null writes the completed matrix there too.
void CompleteSymmetric(float* s, int m, float diag_add, float* copy) {
  ParallelFor(m, [&](int64_t i) {
    float* row = s + i * m;
    for (int64_t j = 0; j < i; ++j) row[j] = s[j * m + i];
    row[i] += diag_add;
    if (copy != nullptr) std::copy(row, row + m, copy + i * m);
  });
}

}  // namespace

void NewtonSchulz(float* out, const float* in, int rows, int cols, int steps) {
  if (rows <= 0 || cols <= 0) return;
  const int m = std::min(rows, cols);
  const int n = std::max(rows, cols);
  // For rows > cols the stored matrix is X^T (n, m). Instead of transposing,
  // the products use the transposed forms: X X^T = (X^T)^T X^T, and since B is
  // symmetric, (B X)^T = X^T B.
  const bool tall = rows > cols;
  const int64_t size = static_cast<int64_t>(rows) * cols;

  thread_local Workspace ws;
  ws.Reserve(size, static_cast<int64_t>(m) * m);
  float* a = ws.a.data();
  float* b = ws.b.data();

  // Ping-pong between `out` and the scratch, starting where an even/odd
  // number of swaps ends in `out`.
  float* cur = (steps % 2 == 0) ? out : ws.x.data();
  float* next = (cur == out) ? ws.x.data() : out;

  const double inv_norm = 1.0 / (std::sqrt(SumOfSquares(in, size)) + kNormEps);
  ParallelFor(size, [&](int64_t i) { cur[i] = static_cast<float>(in[i] * inv_norm); });

  for (int step = 0; step < steps; ++step) {
    // A = X X^T. Symmetric: compute the upper tiles, mirror, and start B = A.
    if (tall) {
      TiledGemm(true, false, m, m, n, 1.0f, cur, m, cur, m, 0.0f, a, m, /*upper_only=*/true);
    } else {
      TiledGemm(false, true, m, m, n, 1.0f, cur, n, cur, n, 0.0f, a, m, /*upper_only=*/true);
    }
    CompleteSymmetric(a, m, 0.0f, b);
    // B = c A A + b A + a I, symmetric as well. The a X term of the update is
    // folded into B's diagonal, so the next product gives a X + (b A + c A A) X.
    TiledGemm(false, false, m, m, m, kC, a, m, a, m, kB, b, m, /*upper_only=*/true);
    CompleteSymmetric(b, m, kA, nullptr);
    // X <- B X  (tall: X^T <- X^T B).
    if (tall) {
      TiledGemm(false, false, n, m, m, 1.0f, cur, m, b, m, 0.0f, next, m, false);
    } else {
      TiledGemm(false, false, m, n, m, 1.0f, b, m, cur, n, 0.0f, next, n, false);
    }
    std::swap(cur, next);
  }
}

double NewtonSchulzFlops(int rows, int cols, int steps) {
  const double m = std::min(rows, cols);
  const double n = std::max(rows, cols);
  return steps * (4.0 * m * m * n + 2.0 * m * m * m);
}

}  // namespace muonps
