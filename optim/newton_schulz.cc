#include "optim/newton_schulz.h"

#include <algorithm>
#include <cmath>
#include <utility>
#include <vector>

#include "common/gemm.h"
#include "common/parallel.h"
#include "optim/grad_norm.h"

namespace muonps {
namespace {

constexpr float kA = 3.4445f;
constexpr float kB = -4.7750f;
constexpr float kC = 2.0315f;
constexpr double kNormEps = 1e-7;

// Output tiles of the products (see common/gemm.h for why tiles): large,
// since these matrices are big and each tile is one single-threaded BLAS call.
constexpr GemmTiles kTiles = {256, 256};

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
      TiledSgemm(true, false, m, m, n, 1.0f, cur, m, cur, m, 0.0f, a, m, kTiles,
                 /*upper_only=*/true);
    } else {
      TiledSgemm(false, true, m, m, n, 1.0f, cur, n, cur, n, 0.0f, a, m, kTiles,
                 /*upper_only=*/true);
    }
    CompleteSymmetric(a, m, 0.0f, b);
    // B = c A A + b A + a I, symmetric as well. The a X term of the update is
    // folded into B's diagonal, so the next product gives a X + (b A + c A A) X.
    TiledSgemm(false, false, m, m, m, kC, a, m, a, m, kB, b, m, kTiles, /*upper_only=*/true);
    CompleteSymmetric(b, m, kA, nullptr);
    // X <- B X  (tall: X^T <- X^T B).
    if (tall) {
      TiledSgemm(false, false, n, m, m, 1.0f, cur, m, b, m, 0.0f, next, m, kTiles);
    } else {
      TiledSgemm(false, false, m, n, m, 1.0f, b, m, cur, n, 0.0f, next, n, kTiles);
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
