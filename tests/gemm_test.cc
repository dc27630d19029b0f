// TiledSgemm: correct against a double-precision product, and bit-identical
// for any thread count at shapes where a plain multithreaded sgemm is not.
#include "common/gemm.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "common/parallel.h"
#include "common/philox.h"

namespace muonps {
namespace {

struct Shape {
  bool ta, tb;
  int M, N, K;
};

std::vector<float> Random(int64_t n, const char* name) {
  std::vector<float> v(n);
  FillNormal(v.data(), n, 42, name, 1.0);
  return v;
}

std::vector<float> Multiply(const Shape& s, const std::vector<float>& a,
                            const std::vector<float>& b, const std::vector<float>& c0,
                            int threads) {
  SetNumThreads(threads);
  std::vector<float> c = c0;
  const int lda = s.ta ? s.M : s.K, ldb = s.tb ? s.K : s.N;
  TiledSgemm(s.ta, s.tb, s.M, s.N, s.K, 0.5f, a.data(), lda, b.data(), ldb, 1.0f, c.data(), s.N);
  return c;
}

TEST(GemmTest, MatchesDoublePrecisionAndIgnoresThreadCount) {
  const Shape shapes[] = {{false, true, 517, 384, 128},
                          {true, false, 384, 128, 517},
                          {false, false, 517, 128, 384},
                          {true, true, 70, 300, 33},
                          {false, true, 1, 5, 7}};
  for (const Shape& s : shapes) {
    const std::vector<float> a = Random(static_cast<int64_t>(s.M) * s.K, "a");
    const std::vector<float> b = Random(static_cast<int64_t>(s.K) * s.N, "b");
    const std::vector<float> c0 = Random(static_cast<int64_t>(s.M) * s.N, "c");
    const std::vector<float> one = Multiply(s, a, b, c0, 1);
    const int lda = s.ta ? s.M : s.K, ldb = s.tb ? s.K : s.N;
    double max_err = 0.0;
    for (int i = 0; i < s.M; ++i) {
      for (int j = 0; j < s.N; ++j) {
        double ref = c0[i * s.N + j];
        for (int k = 0; k < s.K; ++k) {
          const double x = s.ta ? a[k * lda + i] : a[i * lda + k];
          const double y = s.tb ? b[j * ldb + k] : b[k * ldb + j];
          ref += 0.5 * x * y;
        }
        max_err = std::max(max_err, std::abs(ref - one[i * s.N + j]));
      }
    }
    EXPECT_LT(max_err, 1e-3 * std::sqrt(static_cast<double>(s.K))) << s.M << "x" << s.N;
    for (int threads : {2, 3, 4}) {
      const std::vector<float> other = Multiply(s, a, b, c0, threads);
      EXPECT_EQ(std::memcmp(one.data(), other.data(), one.size() * sizeof(float)), 0)
          << s.M << "x" << s.N << "x" << s.K << " with " << threads << " threads";
    }
  }
  SetNumThreads(2);
}

}  // namespace
}  // namespace muonps
