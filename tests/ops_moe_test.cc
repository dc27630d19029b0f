// Tests for the CPU ops of the MoE layer and the losses: dispatch and combine,
// cross-entropy and the aux loss against finite differences, and results
// independent of the thread count. The method is ops_test.cc's (tests/ops_test_util.h).
#include "tests/ops_test_util.h"

namespace muonps {
namespace {

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
    // NOLINTNEXTLINE(bugprone-suspicious-memory-comparison): the test wants bit-identical floats.
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
