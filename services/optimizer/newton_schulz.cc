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
// Copies it into the lower triangle and adds diag_add to the diagonal.
void CompleteSymmetric(float* s, int m, float diag_add) {
  ParallelFor(m, [&](int64_t i) {
    float* row = s + i * m;
    for (int64_t j = 0; j < i; ++j) row[j] = s[j * m + i];
    row[i] += diag_add;
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
    // A = X X^T (upper triangle), then mirrored: the next product reads all of A.
    if (tall) {
      cblas_ssyrk(CblasRowMajor, CblasUpper, CblasTrans, m, n, 1.0f, cur, m, 0.0f, a, m);
    } else {
      cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, m, n, 1.0f, cur, n, 0.0f, a, m);
    }
    CompleteSymmetric(a, m, 0.0f);
    // B = c A A + b A + a I. A is symmetric, so A A = A A^T is a rank-k update.
    std::copy(a, a + static_cast<int64_t>(m) * m, b);
    cblas_ssyrk(CblasRowMajor, CblasUpper, CblasNoTrans, m, m, kC, a, m, kB, b, m);
    CompleteSymmetric(b, m, kA);
    // X <- B X  (the a X term is folded into B's diagonal).
    if (tall) {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, n, m, m, 1.0f, cur, m, b, m, 0.0f,
                  next, m);
    } else {
      cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasNoTrans, m, n, m, 1.0f, b, m, cur, n, 0.0f,
                  next, n);
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
