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
#include "model/ops.h"

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

namespace muonps {
namespace {

constexpr double kH = 1e-3;

std::vector<float> Random(size_t n, uint32_t seed, float lo = -1.0f, float hi = 1.0f) {
  std::mt19937 gen(seed);
  std::uniform_real_distribution<float> dist(lo, hi);
  std::vector<float> v(n);
  for (float& x : v) x = dist(gen);
  return v;
}

double Dot(const std::vector<float>& a, const std::vector<float>& b) {
  double s = 0.0;
  for (size_t i = 0; i < a.size(); ++i) s += static_cast<double>(a[i]) * b[i];
  return s;
}

std::vector<float> Minus(const std::vector<float>& a, const std::vector<float>& b) {
  std::vector<float> d(a.size());
  for (size_t i = 0; i < a.size(); ++i) d[i] = a[i] - b[i];
  return d;
}

// Compares grad with central differences of loss() with respect to every
// entry of *x. min_scale guards against a check that passes only because
// everything is zero.
void CheckGradient(const std::string& name, std::vector<float>* x, const std::vector<float>& grad,
                   const std::function<double()>& loss, double atol, double rtol,
                   double min_scale = 0.05) {
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
std::vector<int32_t> ReferenceTopk(const std::vector<float>& scores, const float* bias, int N,
                                   int E, int K) {
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
std::vector<float> SeparatedLogits(int N, int E, uint32_t seed) {
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

// ---- gradient checks --------------------------------------------------------

TEST(Ops, EmbeddingBackwardMatchesFiniteDifferences) {
  const int V = 5, N = 6, C = 8;
  const std::vector<int32_t> inp = {1, 3, 1, 0, 4, 1};  // token 1 three times, 2 never
  std::vector<float> wte = Random(V * C, 1);
  const std::vector<float> R = Random(N * C, 2);
  std::vector<float> out(N * C);
  auto loss = [&] {
    embedding_forward(out.data(), inp.data(), wte.data(), N, C);
    return Dot(out, R);
  };
  const std::vector<float> base = Random(V * C, 3);
  std::vector<float> dwte = base;
  embedding_backward(dwte.data(), R.data(), inp.data(), N, C);
  CheckGradient("dwte", &wte, Minus(dwte, base), loss, 1e-3, 1e-3);
  for (int c = 0; c < C; ++c) EXPECT_EQ(dwte[2 * C + c], base[2 * C + c]);
}

TEST(Ops, RmsnormBackwardMatchesFiniteDifferences) {
  const int N = 6, C = 8;
  const float eps = 1e-5f;
  std::vector<float> inp = Random(N * C, 10);
  std::vector<float> weight = Random(C, 11, 0.5f, 1.5f);
  const std::vector<float> R = Random(N * C, 12);
  std::vector<float> out(N * C), rstd(N);
  auto loss = [&] {
    rmsnorm_forward(out.data(), rstd.data(), inp.data(), weight.data(), N, C, eps);
    return Dot(out, R);
  };
  loss();
  const std::vector<float> base_x = Random(N * C, 13), base_w = Random(C, 14);
  std::vector<float> dinp = base_x, dweight = base_w;
  rmsnorm_backward(dinp.data(), dweight.data(), R.data(), inp.data(), weight.data(), rstd.data(), N,
                   C);
  CheckGradient("dinp", &inp, Minus(dinp, base_x), loss, 2e-3, 5e-3);
  CheckGradient("dweight", &weight, Minus(dweight, base_w), loss, 2e-3, 5e-3);
}

TEST(Ops, MatmulForwardAndBackward) {
  const int N = 6, IC = 8, OC = 5;
  std::vector<float> inp = Random(N * IC, 20);
  std::vector<float> weight = Random(OC * IC, 21);
  const std::vector<float> R = Random(N * OC, 22);
  std::vector<float> out(N * OC, 123.0f);  // forward overwrites
  matmul_forward(out.data(), inp.data(), weight.data(), N, IC, OC);
  for (int n = 0; n < N; ++n) {
    for (int o = 0; o < OC; ++o) {
      double ref = 0.0;
      for (int i = 0; i < IC; ++i) ref += static_cast<double>(inp[n * IC + i]) * weight[o * IC + i];
      EXPECT_NEAR(out[n * OC + o], ref, 1e-5) << n << "," << o;
    }
  }
  auto loss = [&] {
    matmul_forward(out.data(), inp.data(), weight.data(), N, IC, OC);
    return Dot(out, R);
  };
  const std::vector<float> base_x = Random(N * IC, 23), base_w = Random(OC * IC, 24);
  std::vector<float> dinp = base_x, dweight = base_w;
  matmul_backward(dinp.data(), dweight.data(), R.data(), inp.data(), weight.data(), N, IC, OC);
  CheckGradient("dinp", &inp, Minus(dinp, base_x), loss, 1e-3, 1e-3);
  CheckGradient("dweight", &weight, Minus(dweight, base_w), loss, 1e-3, 1e-3);
  // A nullptr gradient is skipped.
  std::vector<float> dinp2 = base_x;
  matmul_backward(dinp2.data(), nullptr, R.data(), inp.data(), weight.data(), N, IC, OC);
  EXPECT_EQ(0, std::memcmp(dinp2.data(), dinp.data(), sizeof(float) * dinp.size()));
}

TEST(Ops, RopeForwardAndBackward) {
  const int B = 2, T = 5, H = 2, D = 4, C = H * D;
  const double theta = 100.0;
  std::vector<float> cos(T * D / 2), sin(T * D / 2);
  rope_tables(cos.data(), sin.data(), T, D, theta);
  std::vector<float> inp = Random(B * T * C, 30);
  std::vector<float> out(B * T * C);
  rope_forward(out.data(), inp.data(), cos.data(), sin.data(), B, T, H, D);
  // Direct formula: rotate (x_i, x_{i+D/2}) by angle t * theta^(-2i/D).
  for (int b = 0; b < B; ++b) {
    for (int t = 0; t < T; ++t) {
      for (int h = 0; h < H; ++h) {
        const int o = (b * T + t) * C + h * D;
        for (int i = 0; i < D / 2; ++i) {
          const double a = t / std::pow(theta, 2.0 * i / D);
          const double x1 = inp[o + i], x2 = inp[o + i + D / 2];
          EXPECT_NEAR(out[o + i], x1 * std::cos(a) - x2 * std::sin(a), 1e-6);
          EXPECT_NEAR(out[o + i + D / 2], x2 * std::cos(a) + x1 * std::sin(a), 1e-6);
        }
      }
    }
  }
  // In place gives the same bits.
  std::vector<float> inplace = inp;
  rope_forward(inplace.data(), inplace.data(), cos.data(), sin.data(), B, T, H, D);
  EXPECT_EQ(0, std::memcmp(inplace.data(), out.data(), sizeof(float) * out.size()));

  const std::vector<float> R = Random(B * T * C, 31);
  auto loss = [&] {
    rope_forward(out.data(), inp.data(), cos.data(), sin.data(), B, T, H, D);
    return Dot(out, R);
  };
  const std::vector<float> base = Random(B * T * C, 32);
  std::vector<float> dinp = base;
  rope_backward(dinp.data(), R.data(), cos.data(), sin.data(), B, T, H, D);
  CheckGradient("dinp", &inp, Minus(dinp, base), loss, 1e-3, 1e-3);
}

void CheckAttentionGradients(int B, int T, int H, int D) {
  const int C = H * D;
  std::vector<float> q = Random(B * T * C, 40, -1.5f, 1.5f);
  std::vector<float> k = Random(B * T * C, 41, -1.5f, 1.5f);
  std::vector<float> v = Random(B * T * C, 42);
  const std::vector<float> R = Random(B * T * C, 43);
  std::vector<float> out(B * T * C), att(B * H * T * T);
  auto loss = [&] {
    attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, D);
    return Dot(out, R);
  };
  loss();
  const std::vector<float> bq = Random(B * T * C, 44), bk = Random(B * T * C, 45),
                           bv = Random(B * T * C, 46);
  std::vector<float> dq = bq, dk = bk, dv = bv;
  attention_backward(dq.data(), dk.data(), dv.data(), R.data(), q.data(), k.data(), v.data(),
                     att.data(), B, T, H, D);
  CheckGradient("dq", &q, Minus(dq, bq), loss, 2e-3, 5e-3);
  CheckGradient("dk", &k, Minus(dk, bk), loss, 2e-3, 5e-3);
  CheckGradient("dv", &v, Minus(dv, bv), loss, 2e-3, 5e-3);
}

void CheckAttentionForward(int B, int T, int H, int D) {
  const int C = H * D;
  std::vector<float> q = Random(B * T * C, 50, -2.0f, 2.0f);
  std::vector<float> k = Random(B * T * C, 51, -2.0f, 2.0f);
  std::vector<float> v = Random(B * T * C, 52);
  std::vector<float> out(B * T * C), att(B * H * T * T);
  attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, D);
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      for (int t = 0; t < T; ++t) {
        std::vector<double> p(t + 1);
        double mx = -1e300, sum = 0.0;
        for (int j = 0; j <= t; ++j) {
          double s = 0.0;
          for (int d = 0; d < D; ++d) {
            s += static_cast<double>(q[(b * T + t) * C + h * D + d]) *
                 k[(b * T + j) * C + h * D + d];
          }
          p[j] = s / std::sqrt(static_cast<double>(D));
          mx = std::max(mx, p[j]);
        }
        for (double& x : p) sum += (x = std::exp(x - mx));
        const float* row = att.data() + ((b * H + h) * T + t) * T;
        for (int j = 0; j < T; ++j) {
          EXPECT_NEAR(row[j], j <= t ? p[j] / sum : 0.0, 1e-6) << b << h << t << j;
          if (j > t) {
            EXPECT_EQ(row[j], 0.0f);
          }
        }
        for (int d = 0; d < D; ++d) {
          double o = 0.0;
          for (int j = 0; j <= t; ++j) o += p[j] / sum * v[(b * T + j) * C + h * D + d];
          EXPECT_NEAR(out[(b * T + t) * C + h * D + d], o, 1e-5);
        }
      }
    }
  }
  // Changing q, k, v after position t0 leaves every output up to t0 untouched.
  const int t0 = T / 2;
  for (int b = 0; b < B; ++b) {
    for (int t = t0 + 1; t < T; ++t) {
      for (int c = 0; c < C; ++c) {
        const int i = (b * T + t) * C + c;
        q[i] += 3.0f;
        k[i] -= 2.0f;
        v[i] *= -5.0f;
      }
    }
  }
  std::vector<float> out2(B * T * C), att2(B * H * T * T);
  attention_forward(out2.data(), att2.data(), q.data(), k.data(), v.data(), B, T, H, D);
  for (int b = 0; b < B; ++b) {
    const size_t first = static_cast<size_t>(b) * T * C;
    EXPECT_EQ(0,
              std::memcmp(out.data() + first, out2.data() + first, sizeof(float) * (t0 + 1) * C));
    EXPECT_NE(0, std::memcmp(out.data() + first, out2.data() + first, sizeof(float) * T * C));
  }
}

// Sizes for the attention checks: the first is tiny, the second also runs the
// kernel's full 4 x 8 register tiles and a short last row block (T % 4 != 0).
struct AttentionSizes {
  int B, T, H, D;
};
constexpr AttentionSizes kAttentionSizes[] = {{2, 5, 2, 4}, {1, 11, 2, 8}};

TEST(Ops, AttentionBackwardMatchesFiniteDifferences) {
  for (const AttentionSizes& sz : kAttentionSizes) {
    SCOPED_TRACE(testing::Message() << "T=" << sz.T << " D=" << sz.D);
    CheckAttentionGradients(sz.B, sz.T, sz.H, sz.D);
  }
}

TEST(Ops, AttentionForwardIsCausalAndMatchesReference) {
  for (const AttentionSizes& sz : kAttentionSizes) {
    SCOPED_TRACE(testing::Message() << "T=" << sz.T << " D=" << sz.D);
    CheckAttentionForward(sz.B, sz.T, sz.H, sz.D);
  }
}

TEST(Ops, SwigluBackwardMatchesFiniteDifferences) {
  const int N = 6, F = 8;
  std::vector<float> gate = Random(N * F, 60, -3.0f, 3.0f);
  std::vector<float> up = Random(N * F, 61);
  const std::vector<float> R = Random(N * F, 62);
  std::vector<float> out(N * F);
  auto loss = [&] {
    swiglu_forward(out.data(), gate.data(), up.data(), N, F);
    return Dot(out, R);
  };
  const std::vector<float> bg = Random(N * F, 63), bu = Random(N * F, 64);
  std::vector<float> dgate = bg, dup = bu;
  swiglu_backward(dgate.data(), dup.data(), R.data(), gate.data(), up.data(), N, F);
  CheckGradient("dgate", &gate, Minus(dgate, bg), loss, 1e-3, 2e-3);
  CheckGradient("dup", &up, Minus(dup, bu), loss, 1e-3, 2e-3);
}

TEST(Ops, SwigluIsFiniteForLargeInputs) {
  const std::vector<float> gate = {-1e4f, -100.0f, -89.0f, 0.0f, 89.0f, 100.0f, 1e4f, 1e30f};
  const int F = static_cast<int>(gate.size());
  const std::vector<float> up(F, 2.0f), dout(F, 1.0f);
  std::vector<float> out(F), dgate(F, 0.0f), dup(F, 0.0f);
  swiglu_forward(out.data(), gate.data(), up.data(), 1, F);
  swiglu_backward(dgate.data(), dup.data(), dout.data(), gate.data(), up.data(), 1, F);
  for (int f = 0; f < F; ++f) {
    EXPECT_TRUE(std::isfinite(out[f]) && std::isfinite(dgate[f]) && std::isfinite(dup[f])) << f;
  }
  EXPECT_EQ(out[0], 0.0f);
  EXPECT_FLOAT_EQ(out[6], 2e4f);
  EXPECT_FLOAT_EQ(dgate[6], 2.0f);
  EXPECT_EQ(dgate[0], 0.0f);
}

TEST(Ops, RouterScoreBackwardMatchesFiniteDifferences) {
  const int N = 6, E = 4;
  for (ScoringFunc func : {ScoringFunc::kSigmoid, ScoringFunc::kSoftmax}) {
    const std::string name = func == ScoringFunc::kSigmoid ? "sigmoid" : "softmax";
    std::vector<float> logits = Random(N * E, 70, -2.0f, 2.0f);
    const std::vector<float> R = Random(N * E, 71, -2.0f, 2.0f);
    std::vector<float> scores(N * E);
    auto loss = [&] {
      router_score_forward(scores.data(), logits.data(), N, E, func);
      return Dot(scores, R);
    };
    loss();
    const std::vector<float> base = Random(N * E, 72);
    std::vector<float> dlogits = base;
    router_score_backward(dlogits.data(), R.data(), scores.data(), N, E, func);
    CheckGradient(name, &logits, Minus(dlogits, base), loss, 1e-3, 2e-3);
  }
}

TEST(Ops, RouterScoreIsFiniteForLargeLogits) {
  const int E = 4;
  const std::vector<float> logits = {1000.0f, 0.0f, -1000.0f, 999.0f};
  std::vector<float> sig(E), soft(E);
  router_score_forward(sig.data(), logits.data(), 1, E, ScoringFunc::kSigmoid);
  router_score_forward(soft.data(), logits.data(), 1, E, ScoringFunc::kSoftmax);
  EXPECT_EQ(sig[0], 1.0f);
  EXPECT_EQ(sig[1], 0.5f);
  EXPECT_EQ(sig[2], 0.0f);
  EXPECT_NEAR(soft[0], 1.0 / (1.0 + std::exp(-1.0)), 1e-6);
  EXPECT_NEAR(soft[3], std::exp(-1.0) / (1.0 + std::exp(-1.0)), 1e-6);
  EXPECT_EQ(soft[2], 0.0f);
}

TEST(Ops, TopkWeightsBackwardMatchesFiniteDifferences) {
  const int N = 6, E = 4, K = 2;
  std::vector<float> logits = SeparatedLogits(N, E, 80);
  std::vector<float> scores(N * E);
  router_score_forward(scores.data(), logits.data(), N, E, ScoringFunc::kSigmoid);
  std::vector<int32_t> idx(N * K);
  router_topk(idx.data(), scores.data(), nullptr, N, E, K);
  const std::vector<float> R = Random(N * K, 81, -2.0f, 2.0f);
  struct Case {
    bool norm;
    float scale;
  };
  for (const Case& cs : {Case{false, 2.5f}, Case{true, 1.0f}, Case{true, 2.5f}}) {
    const std::string name =
        std::string(cs.norm ? "norm" : "plain") + " scale " + std::to_string(cs.scale);
    std::vector<float> weights(N * K);
    auto loss = [&] {
      topk_weights_forward(weights.data(), scores.data(), idx.data(), N, E, K, cs.norm, cs.scale);
      return Dot(weights, R);
    };
    const std::vector<float> base = Random(N * E, 82);
    std::vector<float> dscores = base;
    topk_weights_backward(dscores.data(), R.data(), scores.data(), idx.data(), N, E, K, cs.norm,
                          cs.scale);
    CheckGradient(name, &scores, Minus(dscores, base), loss, 1e-3, 2e-3);
  }
}

// logits -> scores -> top-k (recomputed at every evaluation, with a bias) ->
// normalised weights, differentiated through the chain of backwards.
TEST(Ops, RouterChainBackwardMatchesFiniteDifferences) {
  const int N = 6, E = 4, K = 2;
  const std::vector<float> bias = {0.02f, -0.03f, 0.0f, 0.01f};
  for (ScoringFunc func : {ScoringFunc::kSigmoid, ScoringFunc::kSoftmax}) {
    const std::string name = func == ScoringFunc::kSigmoid ? "sigmoid" : "softmax";
    std::vector<float> logits = SeparatedLogits(N, E, 90);
    const std::vector<float> R = Random(N * K, 91, -2.0f, 2.0f);
    std::vector<float> scores(N * E), weights(N * K);
    std::vector<int32_t> idx(N * K);
    auto loss = [&] {
      router_score_forward(scores.data(), logits.data(), N, E, func);
      router_topk(idx.data(), scores.data(), bias.data(), N, E, K);
      topk_weights_forward(weights.data(), scores.data(), idx.data(), N, E, K, true, 1.5f);
      return Dot(weights, R);
    };
    loss();
    // The K-th and (K+1)-th keys are far apart compared with h.
    for (int n = 0; n < N; ++n) {
      std::vector<float> keys(E);
      for (int e = 0; e < E; ++e) keys[e] = scores[n * E + e] + bias[e];
      std::sort(keys.rbegin(), keys.rend());
      ASSERT_GT(keys[K - 1] - keys[K], 0.02f) << name << " row " << n;
    }
    std::vector<float> dscores(N * E, 0.0f), dlogits(N * E, 0.0f);
    topk_weights_backward(dscores.data(), R.data(), scores.data(), idx.data(), N, E, K, true, 1.5f);
    router_score_backward(dlogits.data(), dscores.data(), scores.data(), N, E, func);
    CheckGradient(name, &logits, dlogits, loss, 1e-3, 2e-3);
  }
}

TEST(Ops, RouterTopkOrderAndTies) {
  const int E = 5;
  // Three-way tie at 0.75: lower indices first.
  const std::vector<float> s = {0.5f, 0.75f, 0.75f, 0.25f, 0.75f};
  std::vector<int32_t> idx(3);
  router_topk(idx.data(), s.data(), nullptr, 1, E, 3);
  EXPECT_EQ(idx, (std::vector<int32_t>{1, 2, 4}));
  router_topk(idx.data(), s.data(), nullptr, 1, E, 2);
  EXPECT_EQ((std::vector<int32_t>{idx[0], idx[1]}), (std::vector<int32_t>{1, 2}));
  // A bias creates a four-way tie at 0.25 + 0.5 = 0.75 that goes to expert 0,
  // and pushes expert 3 first.
  const std::vector<float> bias = {0.25f, 0.0f, 0.0f, 1.0f, 0.0f};
  router_topk(idx.data(), s.data(), bias.data(), 1, E, 3);
  EXPECT_EQ(idx, (std::vector<int32_t>{3, 0, 1}));
  // All equal: the first K.
  const std::vector<float> flat(E, 0.125f);
  router_topk(idx.data(), flat.data(), nullptr, 1, E, 3);
  EXPECT_EQ(idx, (std::vector<int32_t>{0, 1, 2}));
  // Random rows against a stable-sort reference, with coarse values to force ties.
  const int N = 200, E2 = 8, K = 3;
  std::vector<float> scores = Random(N * E2, 100);
  for (float& x : scores) x = std::round(x * 4.0f) / 4.0f;
  const std::vector<float> b2 = {0.0f, 0.25f, 0.0f, -0.25f, 0.0f, 0.5f, 0.0f, 0.0f};
  std::vector<int32_t> got(N * K);
  router_topk(got.data(), scores.data(), b2.data(), N, E2, K);
  EXPECT_EQ(got, ReferenceTopk(scores, b2.data(), N, E2, K));
  router_topk(got.data(), scores.data(), nullptr, N, E2, K);
  EXPECT_EQ(got, ReferenceTopk(scores, nullptr, N, E2, K));
}

TEST(Ops, BuildRoutingInvariants) {
  const int N = 50, E = 6, K = 3, P = N * K;
  const std::vector<float> scores = Random(N * E, 110);
  std::vector<int32_t> idx(P);
  router_topk(idx.data(), scores.data(), nullptr, N, E, K);
  std::vector<int32_t> offsets(E + 1), token(P), pos(P);
  build_routing(offsets.data(), token.data(), pos.data(), idx.data(), N, E, K);
  EXPECT_EQ(offsets[0], 0);
  EXPECT_EQ(offsets[E], P);
  for (int e = 0; e < E; ++e) {
    EXPECT_EQ(offsets[e + 1] - offsets[e], std::count(idx.begin(), idx.end(), e)) << e;
    for (int p = offsets[e] + 1; p < offsets[e + 1]; ++p) {
      EXPECT_LT(token[p - 1], token[p]) << "token order in expert " << e;
    }
  }
  std::vector<int> seen(P, 0);
  for (int n = 0; n < N; ++n) {
    for (int j = 0; j < K; ++j) {
      const int p = pos[n * K + j];
      ASSERT_GE(p, 0);
      ASSERT_LT(p, P);
      ++seen[p];
      EXPECT_EQ(token[p], n);
      const int e = idx[n * K + j];
      EXPECT_GE(p, offsets[e]);
      EXPECT_LT(p, offsets[e + 1]);
    }
  }
  EXPECT_EQ(std::count(seen.begin(), seen.end(), 1), P);

  // A small plan written out by hand.
  const std::vector<int32_t> idx2 = {2, 0, 0, 2, 2, 1};  // N=3, K=2, E=3
  std::vector<int32_t> off2(4), tok2(6), pos2(6);
  build_routing(off2.data(), tok2.data(), pos2.data(), idx2.data(), 3, 3, 2);
  EXPECT_EQ(off2, (std::vector<int32_t>{0, 2, 3, 6}));
  EXPECT_EQ(tok2, (std::vector<int32_t>{0, 1, 2, 0, 1, 2}));
  EXPECT_EQ(pos2, (std::vector<int32_t>{3, 0, 1, 4, 5, 2}));
}

// Routing plan for the dispatch/combine checks: N=6, E=4, K=2.
struct SmallPlan {
  static constexpr int N = 6, E = 4, K = 2, P = N * K;
  std::vector<int32_t> idx = std::vector<int32_t>(P), offsets = std::vector<int32_t>(E + 1),
                       token = std::vector<int32_t>(P), pos = std::vector<int32_t>(P);
  SmallPlan() {
    const std::vector<float> logits = SeparatedLogits(N, E, 120);
    router_topk(idx.data(), logits.data(), nullptr, N, E, K);
    build_routing(offsets.data(), token.data(), pos.data(), idx.data(), N, E, K);
  }
};

TEST(Ops, DispatchBackwardMatchesFiniteDifferences) {
  const SmallPlan plan;
  const int N = SmallPlan::N, K = SmallPlan::K, P = SmallPlan::P, C = 8;
  std::vector<float> x = Random(N * C, 130);
  const std::vector<float> R = Random(P * C, 131);
  std::vector<float> xe(P * C);
  auto loss = [&] {
    dispatch_forward(xe.data(), x.data(), plan.token.data(), P, C);
    return Dot(xe, R);
  };
  loss();
  for (int p = 0; p < P; ++p) {
    EXPECT_EQ(0, std::memcmp(&xe[p * C], &x[plan.token[p] * C], sizeof(float) * C));
  }
  const std::vector<float> base = Random(N * C, 132);
  std::vector<float> dx = base;
  dispatch_backward(dx.data(), R.data(), plan.pos.data(), N, K, C);
  CheckGradient("dx", &x, Minus(dx, base), loss, 1e-3, 1e-3);
}

TEST(Ops, CombineBackwardMatchesFiniteDifferences) {
  const SmallPlan plan;
  const int N = SmallPlan::N, K = SmallPlan::K, P = SmallPlan::P, C = 8;
  std::vector<float> ye = Random(P * C, 140);
  std::vector<float> weights = Random(N * K, 141, 0.2f, 1.0f);
  const std::vector<float> out0 = Random(N * C, 142);  // combine adds into out
  const std::vector<float> R = Random(N * C, 143);
  std::vector<float> out(N * C);
  auto loss = [&] {
    out = out0;
    combine_forward(out.data(), ye.data(), weights.data(), plan.pos.data(), N, K, C);
    return Dot(out, R);
  };
  const std::vector<float> bye = Random(P * C, 144), bw = Random(N * K, 145);
  std::vector<float> dye = bye, dweights = bw;
  combine_backward(dye.data(), dweights.data(), R.data(), ye.data(), weights.data(),
                   plan.pos.data(), N, K, C);
  CheckGradient("dye", &ye, Minus(dye, bye), loss, 1e-3, 1e-3);
  CheckGradient("dweights", &weights, Minus(dweights, bw), loss, 1e-3, 1e-3);
}

// x -> dispatch -> per-row scale (a stand-in expert) -> combine, through the
// chain of backwards.
TEST(Ops, DispatchCombineChainMatchesFiniteDifferences) {
  const SmallPlan plan;
  const int N = SmallPlan::N, K = SmallPlan::K, P = SmallPlan::P, C = 8;
  std::vector<float> x = Random(N * C, 150);
  const std::vector<float> expert_scale = Random(SmallPlan::E, 151, 0.5f, 2.0f);
  const std::vector<float> weights = Random(N * K, 152, 0.2f, 1.0f);
  const std::vector<float> R = Random(N * C, 153);
  std::vector<float> xe(P * C), ye(P * C), out(N * C);
  auto expert_of = [&](int p) {
    int e = 0;
    while (plan.offsets[e + 1] <= p) ++e;
    return e;
  };
  auto loss = [&] {
    dispatch_forward(xe.data(), x.data(), plan.token.data(), P, C);
    for (int p = 0; p < P; ++p) {
      for (int c = 0; c < C; ++c) ye[p * C + c] = expert_scale[expert_of(p)] * xe[p * C + c];
    }
    std::fill(out.begin(), out.end(), 0.0f);
    combine_forward(out.data(), ye.data(), weights.data(), plan.pos.data(), N, K, C);
    return Dot(out, R);
  };
  loss();
  std::vector<float> dye(P * C, 0.0f), dx(N * C, 0.0f);
  combine_backward(dye.data(), nullptr, R.data(), ye.data(), weights.data(), plan.pos.data(), N, K,
                   C);
  for (int p = 0; p < P; ++p) {
    for (int c = 0; c < C; ++c) dye[p * C + c] *= expert_scale[expert_of(p)];
  }
  dispatch_backward(dx.data(), dye.data(), plan.pos.data(), N, K, C);
  CheckGradient("dx", &x, dx, loss, 1e-3, 2e-3);
}

TEST(Ops, CrossEntropyForwardAndBackward) {
  const int N = 6, V = 8;
  std::vector<float> logits = Random(N * V, 160, -3.0f, 3.0f);
  const std::vector<int32_t> targets = {0, 7, 3, 3, 5, 1};
  const std::vector<float> dlosses = Random(N, 161, 0.5f, 1.5f);
  std::vector<float> losses(N), probs(N * V);
  crossentropy_forward(losses.data(), probs.data(), logits.data(), targets.data(), N, V);
  for (int n = 0; n < N; ++n) {
    double sum = 0.0;
    for (int v = 0; v < V; ++v) sum += std::exp(static_cast<double>(logits[n * V + v]));
    EXPECT_NEAR(losses[n], std::log(sum) - logits[n * V + targets[n]], 1e-5);
    for (int v = 0; v < V; ++v) {
      EXPECT_NEAR(probs[n * V + v], std::exp(static_cast<double>(logits[n * V + v])) / sum, 1e-6);
    }
  }
  auto loss = [&] {
    crossentropy_forward(losses.data(), probs.data(), logits.data(), targets.data(), N, V);
    return Dot(losses, dlosses);
  };
  loss();
  const std::vector<float> base = Random(N * V, 162);
  std::vector<float> dlogits = base;
  crossentropy_backward(dlogits.data(), dlosses.data(), probs.data(), targets.data(), N, V);
  CheckGradient("dlogits", &logits, Minus(dlogits, base), loss, 1e-3, 2e-3);
}

TEST(Ops, CrossEntropyIsFiniteForLargeLogits) {
  const int V = 4;
  const std::vector<float> logits = {1000.0f, -1000.0f, 0.0f, 999.0f,
                                     1000.0f, -1000.0f, 0.0f, 999.0f};
  const std::vector<int32_t> targets = {0, 1};
  std::vector<float> losses(2), probs(2 * V);
  crossentropy_forward(losses.data(), probs.data(), logits.data(), targets.data(), 2, V);
  EXPECT_NEAR(losses[0], std::log1p(std::exp(-1.0)), 1e-6);
  EXPECT_NEAR(losses[1], 2000.0 + std::log1p(std::exp(-1.0)), 1e-3);
  for (float p : probs) EXPECT_TRUE(std::isfinite(p));
}

TEST(Ops, AuxLossForwardAndBackward) {
  const int N = 6, E = 4, K = 2;
  std::vector<float> scores(N * E);
  router_score_forward(scores.data(), Random(N * E, 170, -2.0f, 2.0f).data(), N, E,
                       ScoringFunc::kSigmoid);
  std::vector<int32_t> idx(N * K);
  router_topk(idx.data(), scores.data(), nullptr, N, E, K);
  // Direct formula.
  double ref = 0.0;
  for (int e = 0; e < E; ++e) {
    const double f = static_cast<double>(E) / (K * N) * std::count(idx.begin(), idx.end(), e);
    double pe = 0.0;
    for (int n = 0; n < N; ++n) {
      double s = 0.0;
      for (int e2 = 0; e2 < E; ++e2) s += scores[n * E + e2];
      pe += scores[n * E + e] / s / N;
    }
    ref += f * pe;
  }
  EXPECT_NEAR(aux_loss_forward(scores.data(), idx.data(), N, E, K), ref, 1e-6);
  // Balanced load and uniform scores give exactly 1.
  const std::vector<float> uniform(4 * E, 0.5f);
  const std::vector<int32_t> balanced = {0, 1, 2, 3, 0, 1, 2, 3};
  EXPECT_NEAR(aux_loss_forward(uniform.data(), balanced.data(), 4, E, K), 1.0, 1e-6);

  const float daux = 4.0f;
  auto loss = [&] {
    return daux * static_cast<double>(aux_loss_forward(scores.data(), idx.data(), N, E, K));
  };
  const std::vector<float> base = Random(N * E, 171);
  std::vector<float> dscores = base;
  aux_loss_backward(dscores.data(), daux, scores.data(), idx.data(), N, E, K);
  CheckGradient("dscores", &scores, Minus(dscores, base), loss, 1e-3, 2e-3);
}

// ---- thread-count independence ----------------------------------------------

// Runs fn under 1, 2 and 3 threads and expects the same bytes each time.
void ExpectSameForAnyThreadCount(const std::string& name,
                                 const std::function<std::vector<float>()>& fn) {
  const int saved = NumThreads();
  SetNumThreads(1);
  const std::vector<float> ref = fn();
  for (int threads : {2, 3}) {
    SetNumThreads(threads);
    const std::vector<float> got = fn();
    ASSERT_EQ(got.size(), ref.size());
    EXPECT_EQ(0, std::memcmp(got.data(), ref.data(), sizeof(float) * ref.size()))
        << name << " differs with " << threads << " threads";
  }
  SetNumThreads(saved);
}

TEST(Ops, ResultsIndependentOfThreadCount) {
  {
    const int B = 2, T = 64, H = 4, D = 16, C = H * D, n = B * T * C;
    const std::vector<float> q = Random(n, 200), k = Random(n, 201), v = Random(n, 202),
                             g = Random(n, 203);
    ExpectSameForAnyThreadCount("attention", [&] {
      std::vector<float> out(n), att(B * H * T * T), dq(n, 0.0f), dk(n, 0.0f), dv(n, 0.0f);
      attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, D);
      attention_backward(dq.data(), dk.data(), dv.data(), g.data(), q.data(), k.data(), v.data(),
                         att.data(), B, T, H, D);
      std::vector<float> all = out;
      for (const auto* t : {&att, &dq, &dk, &dv}) all.insert(all.end(), t->begin(), t->end());
      return all;
    });
  }
  const int N = 300, C = 200, V = 50;
  const std::vector<float> x = Random(N * C, 210), w = Random(C, 211), g = Random(N * C, 212);
  ExpectSameForAnyThreadCount("rmsnorm", [&] {
    std::vector<float> out(N * C), rstd(N), dx(N * C, 0.0f), dw(C, 0.0f);
    rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, 1e-5f);
    rmsnorm_backward(dx.data(), dw.data(), g.data(), x.data(), w.data(), rstd.data(), N, C);
    out.insert(out.end(), dx.begin(), dx.end());
    out.insert(out.end(), dw.begin(), dw.end());
    return out;
  });
  std::vector<int32_t> tokens(N);
  for (int i = 0; i < N; ++i) tokens[i] = (i * 7 + i / 13) % V;
  ExpectSameForAnyThreadCount("embedding", [&] {
    std::vector<float> dwte(V * C, 0.0f);
    embedding_backward(dwte.data(), g.data(), tokens.data(), N, C);
    return dwte;
  });
  ExpectSameForAnyThreadCount("crossentropy", [&] {
    std::vector<float> losses(N), probs(N * C), dl(N * C, 0.0f);
    crossentropy_forward(losses.data(), probs.data(), x.data(), tokens.data(), N, C);
    crossentropy_backward(dl.data(), g.data(), probs.data(), tokens.data(), N, C);
    losses.insert(losses.end(), dl.begin(), dl.end());
    return losses;
  });
  ExpectSameForAnyThreadCount("aux loss", [&] {
    const int E = 8, K = 2;
    std::vector<float> s(N * E), ds(N * E, 0.0f);
    router_score_forward(s.data(), x.data(), N, E, ScoringFunc::kSoftmax);
    std::vector<int32_t> idx(N * K);
    router_topk(idx.data(), s.data(), nullptr, N, E, K);
    aux_loss_backward(ds.data(), 1.0f, s.data(), idx.data(), N, E, K);
    ds.push_back(aux_loss_forward(s.data(), idx.data(), N, E, K));
    return ds;
  });
}

}  // namespace
}  // namespace muonps
