// The ops Multi-head Latent Attention adds: attention with a value width of
// its own and the per-head largest logit, column slices, and the MLA head
// assembly with DeepSeek-V3's pairwise rotary embedding. Forwards against
// direct float64 formulas, backwards against central finite differences
// (see ops_test.cc for the method and the tolerances).
#include "tests/ops_test_util.h"

namespace muonps {
namespace {

TEST(OpsMla, AttentionWithItsOwnValueWidthMatchesFiniteDifferences) {
  const int B = 2, T = 6, H = 2, Dk = 6, Dv = 4;
  std::vector<float> q = Random(B * T * H * Dk, 60, -1.5f, 1.5f);
  std::vector<float> k = Random(B * T * H * Dk, 61, -1.5f, 1.5f);
  std::vector<float> v = Random(B * T * H * Dv, 62);
  const std::vector<float> R = Random(B * T * H * Dv, 63);
  std::vector<float> out(B * T * H * Dv), att(B * H * T * T), logit_max(B * H);
  auto loss = [&] {
    attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, Dk, Dv);
    return Dot(out, R);
  };
  loss();
  const std::vector<float> bq = Random(q.size(), 64), bk = Random(k.size(), 65),
                           bv = Random(v.size(), 66);
  std::vector<float> dq = bq, dk = bk, dv = bv;
  attention_backward(dq.data(), dk.data(), dv.data(), R.data(), q.data(), k.data(), v.data(),
                     att.data(), B, T, H, Dk, Dv);
  CheckGradient("dq", &q, Minus(dq, bq), loss, 2e-3, 5e-3);
  CheckGradient("dk", &k, Minus(dk, bk), loss, 2e-3, 5e-3);
  CheckGradient("dv", &v, Minus(dv, bv), loss, 2e-3, 5e-3);

  // The largest logit of each (b, h) over the causal pairs, computed directly.
  attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, Dk, Dv,
                    logit_max.data());
  for (int b = 0; b < B; ++b) {
    for (int h = 0; h < H; ++h) {
      double mx = -1e300;
      for (int t = 0; t < T; ++t) {
        for (int j = 0; j <= t; ++j) {
          double s = 0.0;
          for (int d = 0; d < Dk; ++d) {
            s += static_cast<double>(q[((b * T + t) * H + h) * Dk + d]) *
                 k[((b * T + j) * H + h) * Dk + d];
          }
          mx = std::max(mx, s / std::sqrt(static_cast<double>(Dk)));
        }
      }
      EXPECT_NEAR(logit_max[b * H + h], mx, 1e-5) << b << " " << h;
    }
  }
}

TEST(OpsMla, SliceForwardAndBackward) {
  const int N = 5, ld = 7, off = 2, w = 3;
  std::vector<float> inp = Random(N * ld, 70);
  std::vector<float> out(N * w);
  slice_forward(out.data(), inp.data(), N, ld, off, w);
  for (int n = 0; n < N; ++n) {
    for (int i = 0; i < w; ++i) EXPECT_EQ(out[n * w + i], inp[n * ld + off + i]);
  }
  const std::vector<float> R = Random(N * w, 71);
  auto loss = [&] {
    slice_forward(out.data(), inp.data(), N, ld, off, w);
    return Dot(out, R);
  };
  const std::vector<float> base = Random(N * ld, 72);
  std::vector<float> dinp = base;
  slice_backward(dinp.data(), R.data(), N, ld, off, w);
  CheckGradient("dinp", &inp, Minus(dinp, base), loss, 1e-3, 1e-3);
}

struct MlaSizes {
  int B = 2, T = 5, H = 3, dn = 2, dr = 4, dv = 3, r = 3;
  int qk() const { return dn + dr; }
};

// q, k, v of the MLA heads computed directly in float64: the rotary part
// pairs (x[2i], x[2i+1]) at angle t * theta^(-2i/dr), written as
// [rotated x[2i] | rotated x[2i+1]] (DeepSeek-V3's apply_rotary_pos_emb).
TEST(OpsMla, HeadsForwardMatchesTheDirectFormula) {
  const MlaSizes z;
  const double theta = 50.0;
  const int N = z.B * z.T, half = z.dr / 2;
  std::vector<float> cos(z.T * half), sin(z.T * half);
  rope_tables(cos.data(), sin.data(), z.T, z.dr, theta);
  const std::vector<float> qp = Random(N * z.H * z.qk(), 80);
  const std::vector<float> kv = Random(N * z.H * (z.dn + z.dv), 81);
  const std::vector<float> kva = Random(N * (z.r + z.dr), 82);
  std::vector<float> q(N * z.H * z.qk()), k(N * z.H * z.qk()), v(N * z.H * z.dv);
  mla_heads_forward(q.data(), k.data(), v.data(), qp.data(), kv.data(), kva.data(), cos.data(),
                    sin.data(), z.B, z.T, z.H, z.dn, z.dr, z.dv, z.r);
  for (int n = 0; n < N; ++n) {
    const int t = n % z.T;
    const float* kr = kva.data() + n * (z.r + z.dr) + z.r;
    for (int h = 0; h < z.H; ++h) {
      const float* qh = qp.data() + (n * z.H + h) * z.qk();
      const float* kvh = kv.data() + (n * z.H + h) * (z.dn + z.dv);
      const float* qo = q.data() + (n * z.H + h) * z.qk();
      const float* ko = k.data() + (n * z.H + h) * z.qk();
      for (int i = 0; i < z.dn; ++i) {
        EXPECT_EQ(qo[i], qh[i]);
        EXPECT_EQ(ko[i], kvh[i]);
      }
      for (int i = 0; i < z.dv; ++i) EXPECT_EQ(v[(n * z.H + h) * z.dv + i], kvh[z.dn + i]);
      for (int i = 0; i < half; ++i) {
        const double a = t / std::pow(theta, 2.0 * i / z.dr), c = std::cos(a), s = std::sin(a);
        const double q1 = qh[z.dn + 2 * i], q2 = qh[z.dn + 2 * i + 1];
        EXPECT_NEAR(qo[z.dn + i], q1 * c - q2 * s, 1e-6);
        EXPECT_NEAR(qo[z.dn + half + i], q2 * c + q1 * s, 1e-6);
        // The key's rotary part is the one shared vector, in every head.
        const double k1 = kr[2 * i], k2 = kr[2 * i + 1];
        EXPECT_NEAR(ko[z.dn + i], k1 * c - k2 * s, 1e-6);
        EXPECT_NEAR(ko[z.dn + half + i], k2 * c + k1 * s, 1e-6);
      }
    }
  }
}

TEST(OpsMla, HeadsBackwardMatchesFiniteDifferences) {
  const MlaSizes z;
  const int N = z.B * z.T, half = z.dr / 2;
  std::vector<float> cos(z.T * half), sin(z.T * half);
  rope_tables(cos.data(), sin.data(), z.T, z.dr, 50.0);
  std::vector<float> qp = Random(N * z.H * z.qk(), 90);
  std::vector<float> kv = Random(N * z.H * (z.dn + z.dv), 91);
  std::vector<float> kva = Random(N * (z.r + z.dr), 92);
  std::vector<float> q(N * z.H * z.qk()), k(N * z.H * z.qk()), v(N * z.H * z.dv);
  const std::vector<float> Rq = Random(q.size(), 93), Rk = Random(k.size(), 94),
                           Rv = Random(v.size(), 95);
  auto loss = [&] {
    mla_heads_forward(q.data(), k.data(), v.data(), qp.data(), kv.data(), kva.data(), cos.data(),
                      sin.data(), z.B, z.T, z.H, z.dn, z.dr, z.dv, z.r);
    return Dot(q, Rq) + Dot(k, Rk) + Dot(v, Rv);
  };
  const std::vector<float> bq = Random(qp.size(), 96), bkv = Random(kv.size(), 97),
                           bkva = Random(kva.size(), 98);
  std::vector<float> dqp = bq, dkv = bkv, dkva = bkva;
  mla_heads_backward(dqp.data(), dkv.data(), dkva.data(), Rq.data(), Rk.data(), Rv.data(),
                     cos.data(), sin.data(), z.B, z.T, z.H, z.dn, z.dr, z.dv, z.r);
  CheckGradient("dqp", &qp, Minus(dqp, bq), loss, 1e-3, 1e-3);
  CheckGradient("dkv", &kv, Minus(dkv, bkv), loss, 1e-3, 1e-3);
  // Only the rotary columns of kva feed the heads: the latent ones get 0,
  // which the finite differences confirm entry by entry.
  CheckGradient("dkva", &kva, Minus(dkva, bkva), loss, 1e-3, 1e-3);
  for (int n = 0; n < N; ++n) {
    for (int i = 0; i < z.r; ++i) {
      EXPECT_EQ(dkva[n * (z.r + z.dr) + i], bkva[n * (z.r + z.dr) + i]) << "latent column touched";
    }
  }
}

TEST(OpsMla, HeadsAreIndependentOfTheThreadCount) {
  const MlaSizes z{3, 17, 4, 8, 6, 5, 7};
  const int N = z.B * z.T, half = z.dr / 2;
  std::vector<float> cos(z.T * half), sin(z.T * half);
  rope_tables(cos.data(), sin.data(), z.T, z.dr, 1e4);
  const std::vector<float> qp = Random(N * z.H * z.qk(), 100);
  const std::vector<float> kv = Random(N * z.H * (z.dn + z.dv), 101);
  const std::vector<float> kva = Random(N * (z.r + z.dr), 102);
  const int saved = NumThreads();
  std::vector<std::vector<float>> results;
  for (int threads : {1, 2}) {
    SetNumThreads(threads);
    std::vector<float> q(qp.size()), k(qp.size()), v(N * z.H * z.dv);
    mla_heads_forward(q.data(), k.data(), v.data(), qp.data(), kv.data(), kva.data(), cos.data(),
                      sin.data(), z.B, z.T, z.H, z.dn, z.dr, z.dv, z.r);
    std::vector<float> dqp(qp.size(), 0.0f), dkv(kv.size(), 0.0f), dkva(kva.size(), 0.0f);
    mla_heads_backward(dqp.data(), dkv.data(), dkva.data(), q.data(), k.data(), v.data(),
                       cos.data(), sin.data(), z.B, z.T, z.H, z.dn, z.dr, z.dv, z.r);
    std::vector<float> all = q;
    for (const std::vector<float>* part : {&k, &v, &dqp, &dkv, &dkva}) {
      all.insert(all.end(), part->begin(), part->end());
    }
    results.push_back(std::move(all));
  }
  SetNumThreads(saved);
  EXPECT_EQ(0, std::memcmp(results[0].data(), results[1].data(), results[0].size() * 4));
}

}  // namespace
}  // namespace muonps
