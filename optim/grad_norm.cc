#include "optim/grad_norm.h"

#include <algorithm>
#include <vector>

#include "common/parallel.h"

namespace muonps {
namespace {

// Elements per partial sum. A constant, so the summation tree depends only on
// n. Large enough that the per-chunk bookkeeping is negligible.
constexpr int64_t kChunk = 8192;

// Sum of squares of one chunk: four interleaved accumulators (for
// instruction-level parallelism), combined in a fixed order. Not inlined
// or cloned (one call per chunk costs nothing): GCC's loop analysis
// misjudges the tail loop once n is the constant kChunk.
[[gnu::noipa]] double ChunkSumOfSquares(const float* x, int64_t n) {
  double acc[4] = {0.0, 0.0, 0.0, 0.0};
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int j = 0; j < 4; ++j) {
      const double v = x[i + j];
      acc[j] += v * v;
    }
  }
  for (; i < n; ++i) {
    const double v = x[i];
    acc[0] += v * v;
  }
  return (acc[0] + acc[1]) + (acc[2] + acc[3]);
}

}  // namespace

double SumOfSquares(const float* x, int64_t n) {
  if (n <= 0) return 0.0;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  if (chunks == 1) return ChunkSumOfSquares(x, n);
  // Reused across calls on the same thread; grows only.
  thread_local std::vector<double> partial;
  if (static_cast<int64_t>(partial.size()) < chunks) partial.resize(chunks);
  double* p = partial.data();
  ParallelFor(chunks, [&](int64_t c) {
    const int64_t begin = c * kChunk;
    const int64_t len = (begin + kChunk <= n) ? kChunk : n - begin;
    p[c] = ChunkSumOfSquares(x + begin, len);
  });
  double total = 0.0;
  for (int64_t c = 0; c < chunks; ++c) total += p[c];
  return total;
}

void SumOfSquaresStream::Filled(int64_t filled) {
  filled = std::min(filled, n_);
  while (done_ + kChunk <= filled) {
    total_ += ChunkSumOfSquares(base_ + done_, kChunk);
    done_ += kChunk;
  }
}

double SumOfSquaresStream::Total() {
  Filled(n_);
  if (done_ < n_) {
    total_ += ChunkSumOfSquares(base_ + done_, n_ - done_);
    done_ = n_;
  }
  // One chunk: SumOfSquares returns its sum itself (0 + p = p for p >= 0).
  return total_;
}

void Scale(float* x, int64_t n, float s) {
  ParallelFor(n, [&](int64_t i) { x[i] *= s; });
}

}  // namespace muonps
