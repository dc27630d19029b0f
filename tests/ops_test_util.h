// Tests for the CPU ops: every backward against central finite differences,
// a few forwards against direct references, routing invariants, and
// bit-identical results for any thread count.
//
// Gradient checks: L = sum(out * R) for a random projection R (or the loss
// itself), the analytic gradient comes from the backward seeded with R, and
// the reference is (L(x + h e_i) - L(x - h e_i)) / (2h) with L accumulated in
// double from the float forward, h = 1e-3 and values O(1). Every entry of the
// small tensors is checked with |analytic - fd| <= atol + rtol |fd|. The
// float forward limits the difference quotient to about 1e-4, so the
// tolerances below sit an order of magnitude above that noise and far below
// the O(0.1) error of a wrong sign or a missing term. Backward outputs start
// from a random base so that "adds into" is checked as well.
// (The shared fixture and helpers; the tests are in the files that include it.)
#ifndef MUONPS_TESTS_OPS_TEST_UTIL_H_
#define MUONPS_TESTS_OPS_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "common/parallel.h"
#include "model/ops.h"

namespace muonps {

constexpr double kH = 1e-3;

inline std::vector<float> Random(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

inline double Dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

inline std::vector<float> Minus(const std::vector<float>& a, const std::vector<float>& b) {
  std::vector<float> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

// Compares grad with central differences of loss() with respect to every
// entry of *x. min_scale guards against a check that passes only because
// everything is zero.
inline void CheckGradient(const std::string& name, std::vector<float>* x,
                          const std::vector<float>& grad, const std::function<double()>& loss,
                          double atol, double rtol, double min_scale = 0.05) {
  ASSERT_EQ(x->size(), grad.size()) << name;
  double max_fd = 0.0;
  for (size_t i = 0; i < x->size(); ++i) {
    const float orig = (*x)[i];
    const float xp = static_cast<float>(orig + kH);
    const float xm = static_cast<float>(orig - kH);
    (*x)[i] = xp;
    const double lp = loss();
    (*x)[i] = xm;
    const double lm = loss();
    (*x)[i] = orig;
    const double fd = (lp - lm) / (static_cast<double>(xp) - static_cast<double>(xm));
    EXPECT_NEAR(grad[i], fd, atol + rtol * std::abs(fd)) << name << "[" << i << "]";
    max_fd = std::max(max_fd, std::abs(fd));
  }
  EXPECT_GT(max_fd, min_scale) << name << ": gradient too small for a meaningful check";
}

// Top-K of each row of scores (+ bias) via a stable sort, as an independent
// reference for router_topk.
inline std::vector<int32_t> ReferenceTopk(const std::vector<float>& scores, const float* bias,
                                          int N, int E, int K) {
  std::vector<int32_t> out;
  for (int n = 0; n < N; ++n) {
    std::vector<int32_t> order(E);
    std::iota(order.begin(), order.end(), 0);
    auto key = [&](int e) { return scores[n * E + e] + (bias ? bias[e] : 0.0f); };
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return key(a) > key(b); });
    out.insert(out.end(), order.begin(), order.begin() + K);
  }
  return out;
}

// Rows of well separated router logits: a shuffled ladder with step 1 plus
// noise of at most 0.1, so no top-k choice is near a tie.
inline std::vector<float> SeparatedLogits(int N, int E, uint32_t seed) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> noise(-0.1f, 0.1f);
  std::vector<float> logits(static_cast<size_t>(N) * E);
  for (int n = 0; n < N; ++n) {
    std::vector<int> perm(E);
    std::iota(perm.begin(), perm.end(), 0);
    std::shuffle(perm.begin(), perm.end(), gen);
    for (int e = 0; e < E; ++e) logits[n * E + e] = perm[e] - 0.5f * (E - 1) + noise(gen);
  }
  return logits;
}

}  // namespace muonps

#endif  // MUONPS_TESTS_OPS_TEST_UTIL_H_
