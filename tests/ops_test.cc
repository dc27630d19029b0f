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
#include "tests/ops_test_util.h"

namespace muonps {
namespace {

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

}  // namespace
}  // namespace muonps
