// CPU kernels for the MoE transformer (see ops.h for the size legend).
//
// Determinism: every ParallelFor iteration owns a disjoint set of output
// elements and reduces in an order fixed by the code. Reductions over rows
// into per-channel buffers (rmsnorm dweight, embedding dwte) are partitioned
// over fixed channel blocks, each summing rows in increasing order.
#include "model/ops.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/gemm.h"
#include "common/parallel.h"

namespace muonps {
namespace {

// Channels per iteration when reducing over rows into a per-channel buffer.
constexpr int kChannelBlock = 64;

int NumChannelBlocks(int C) { return (C + kChannelBlock - 1) / kChannelBlock; }

// 1 / (1 + exp(-x)) without overflow in the intermediate exp.
inline float Sigmoid(float x) {
  if (x >= 0.0f) return 1.0f / (1.0f + std::exp(-x));
  const float e = std::exp(x);
  return e / (1.0f + e);
}

}  // namespace

// ---- embedding ------------------------------------------------------------

void embedding_forward(float* out, const int32_t* inp, const float* wte, int N, int C) {
  ParallelFor(N, [&](int64_t n) {
    std::memcpy(out + n * C, wte + static_cast<int64_t>(inp[n]) * C, sizeof(float) * C);
  });
}

void embedding_backward(float* dwte, const float* dout, const int32_t* inp, int N, int C) {
  if (dwte == nullptr) return;
  ParallelFor(NumChannelBlocks(C), [&](int64_t blk) {
    const int c0 = static_cast<int>(blk) * kChannelBlock;
    const int c1 = std::min(C, c0 + kChannelBlock);
    for (int64_t n = 0; n < N; ++n) {
      float* dst = dwte + static_cast<int64_t>(inp[n]) * C;
      const float* src = dout + n * C;
      for (int c = c0; c < c1; ++c) dst[c] += src[c];
    }
  });
}

// ---- RMSNorm ----------------------------------------------------------------

void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C,
                     float eps) {
  ParallelFor(N, [&](int64_t n) {
    const float* x = inp + n * C;
    float* o = out + n * C;
    float ss = 0.0f;
    for (int c = 0; c < C; ++c) ss += x[c] * x[c];
    const float r = 1.0f / std::sqrt(ss / static_cast<float>(C) + eps);
    for (int c = 0; c < C; ++c) o[c] = x[c] * r * weight[c];
    rstd[n] = r;
  });
}

void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int N, int C) {
  if (dinp != nullptr) {
    // out_c = x_c r w_c with d r / d x_c = -r^3 x_c / C, so
    // dx_c = r (g_c w_c - x_c r^2 <g w, x> / C).
    ParallelFor(N, [&](int64_t n) {
      const float* x = inp + n * C;
      const float* g = dout + n * C;
      float* dx = dinp + n * C;
      const float r = rstd[n];
      float dot = 0.0f;
      for (int c = 0; c < C; ++c) dot += g[c] * weight[c] * x[c];
      const float coef = r * r * dot / static_cast<float>(C);
      for (int c = 0; c < C; ++c) dx[c] += r * (g[c] * weight[c] - x[c] * coef);
    });
  }
  if (dweight != nullptr) {
    ParallelFor(NumChannelBlocks(C), [&](int64_t blk) {
      const int c0 = static_cast<int>(blk) * kChannelBlock;
      const int c1 = std::min(C, c0 + kChannelBlock);
      for (int64_t n = 0; n < N; ++n) {
        const float* x = inp + n * C;
        const float* g = dout + n * C;
        const float r = rstd[n];
        for (int c = c0; c < c1; ++c) dweight[c] += g[c] * x[c] * r;
      }
    });
  }
}

// ---- linear -----------------------------------------------------------------

void matmul_forward(float* out, const float* inp, const float* weight, int N, int IC, int OC) {
  if (N <= 0 || OC <= 0) return;
  if (IC <= 0) {
    std::fill(out, out + static_cast<int64_t>(N) * OC, 0.0f);
    return;
  }
  TiledSgemm(false, true, N, OC, IC, 1.0f, inp, IC, weight, IC, 0.0f, out, OC);
}

void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                     const float* weight, int N, int IC, int OC) {
  if (N <= 0 || IC <= 0 || OC <= 0) return;
  if (dinp != nullptr) {
    TiledSgemm(false, false, N, IC, OC, 1.0f, dout, OC, weight, IC, 1.0f, dinp, IC);
  }
  if (dweight != nullptr) {
    TiledSgemm(true, false, OC, IC, N, 1.0f, dout, OC, inp, IC, 1.0f, dweight, IC);
  }
}

// ---- RoPE -----------------------------------------------------------------------

void rope_tables(float* cos, float* sin, int T, int D, double theta) {
  const int half = D / 2;
  for (int p = 0; p < T; ++p) {
    for (int i = 0; i < half; ++i) {
      const double angle = p * std::pow(theta, -2.0 * i / D);
      cos[p * half + i] = static_cast<float>(std::cos(angle));
      sin[p * half + i] = static_cast<float>(std::sin(angle));
    }
  }
}

void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int B, int T,
                  int H, int D) {
  const int half = D / 2;
  const int64_t C = static_cast<int64_t>(H) * D;
  ParallelFor(static_cast<int64_t>(B) * T, [&](int64_t bt) {
    const float* c = cos + (bt % T) * half;
    const float* s = sin + (bt % T) * half;
    for (int h = 0; h < H; ++h) {
      const float* x = inp + bt * C + h * D;
      float* o = out + bt * C + h * D;
      for (int i = 0; i < half; ++i) {
        const float x1 = x[i];
        const float x2 = x[i + half];
        o[i] = x1 * c[i] - x2 * s[i];
        o[i + half] = x2 * c[i] + x1 * s[i];
      }
    }
  });
}

void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int B, int T,
                   int H, int D) {
  if (dinp == nullptr) return;
  const int half = D / 2;
  const int64_t C = static_cast<int64_t>(H) * D;
  ParallelFor(static_cast<int64_t>(B) * T, [&](int64_t bt) {
    const float* c = cos + (bt % T) * half;
    const float* s = sin + (bt % T) * half;
    for (int h = 0; h < H; ++h) {
      const float* g = dout + bt * C + h * D;
      float* dx = dinp + bt * C + h * D;
      for (int i = 0; i < half; ++i) {
        const float g1 = g[i];
        const float g2 = g[i + half];
        dx[i] += g1 * c[i] + g2 * s[i];
        dx[i + half] += g2 * c[i] - g1 * s[i];
      }
    }
  });
}

// ---- causal multi-head attention -----------------------------------------------
//
// One ParallelFor iteration per (b, h) pair; it reads and writes only that
// head's columns. The per-head products are single Sgemm calls (one thread
// each, common/gemm.h) with shapes fixed by (T, D): the rounding does not
// depend on the thread count. Causality is used
// at the granularity of kAttnBlock rows (queries) or columns (keys): a block
// only touches the keys (queries) it can see, and entries above the diagonal
// inside a block are exact zeros in A and dP.

namespace {

constexpr int kAttnBlock = 64;

}  // namespace

void attention_forward(float* out, float* att, const float* q, const float* k, const float* v,
                       int B, int T, int H, int Dk, int Dv, float* logit_max) {
  const int64_t Ck = static_cast<int64_t>(H) * Dk, Cv = static_cast<int64_t>(H) * Dv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dk));
  ParallelFor(static_cast<int64_t>(B) * H, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t qk_base = b * T * Ck + h * Dk;  // (b, t = 0, head h)
    const int64_t v_base = b * T * Cv + h * Dv;
    float* a = att + bh * T * T;  // (T, T)
    float head_max = -INFINITY;
    for (int i0 = 0; i0 < T; i0 += kAttnBlock) {
      const int mb = std::min(kAttnBlock, T - i0), n = i0 + mb;
      // Scores scale * q_t . k_j for the keys the block can see.
      Sgemm(false, true, mb, n, Dk, scale, q + qk_base + i0 * Ck, Ck, k + qk_base, Ck, 0.0f,
            a + i0 * T, T);
      for (int t = i0; t < n; ++t) {
        float* row = a + static_cast<int64_t>(t) * T;
        float mx = -INFINITY;
        for (int j = 0; j <= t; ++j) mx = std::max(mx, row[j]);
        head_max = std::max(head_max, mx);
        float sum = 0.0f;
        for (int j = 0; j <= t; ++j) {
          row[j] = std::exp(row[j] - mx);
          sum += row[j];
        }
        const float inv = 1.0f / sum;
        for (int j = 0; j <= t; ++j) row[j] *= inv;
        for (int j = t + 1; j < T; ++j) row[j] = 0.0f;
      }
      // out = A V over the visible keys.
      Sgemm(false, false, mb, Dv, n, 1.0f, a + i0 * T, T, v + v_base, Cv, 0.0f,
            out + v_base + i0 * Cv, Cv);
    }
    if (logit_max != nullptr) logit_max[bh] = head_max;
  });
}

void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                        const float* k, const float* v, const float* att, int B, int T, int H,
                        int Dk, int Dv) {
  if (dq == nullptr && dk == nullptr && dv == nullptr) return;
  const int64_t Ck = static_cast<int64_t>(H) * Dk, Cv = static_cast<int64_t>(H) * Dv;
  const float scale = 1.0f / std::sqrt(static_cast<float>(Dk));
  ParallelFor(static_cast<int64_t>(B) * H, [&](int64_t bh) {
    const int64_t b = bh / H, h = bh % H;
    const int64_t qk_base = b * T * Ck + h * Dk;
    const int64_t v_base = b * T * Cv + h * Dv;
    const float* a = att + bh * T * T;  // (T, T)
    // Key blocks j0: only queries t >= j0 see them.
    if (dv != nullptr) {
      for (int j0 = 0; j0 < T; j0 += kAttnBlock) {
        const int mb = std::min(kAttnBlock, T - j0);
        // dv[j] += sum_t A[t, j] dout[t]
        Sgemm(true, false, mb, Dv, T - j0, 1.0f, a + j0 * T + j0, T, dout + v_base + j0 * Cv, Cv,
              1.0f, dv + v_base + j0 * Cv, Cv);
      }
    }
    if (dq == nullptr && dk == nullptr) return;
    thread_local std::vector<float> dp_buffer;
    dp_buffer.resize(static_cast<size_t>(T) * T);
    float* dp = dp_buffer.data();  // (T, T)
    for (int i0 = 0; i0 < T; i0 += kAttnBlock) {
      const int mb = std::min(kAttnBlock, T - i0), n = i0 + mb;
      // datt = dout V^T, then dp = a * (datt - <a, datt>) on and below the diagonal.
      Sgemm(false, true, mb, n, Dv, 1.0f, dout + v_base + i0 * Cv, Cv, v + v_base, Cv, 0.0f,
            dp + i0 * T, T);
      for (int t = i0; t < n; ++t) {
        const float* at = a + static_cast<int64_t>(t) * T;
        float* row = dp + static_cast<int64_t>(t) * T;
        float s = 0.0f;
        for (int j = 0; j <= t; ++j) s += at[j] * row[j];
        for (int j = 0; j <= t; ++j) row[j] = at[j] * (row[j] - s);
        for (int j = t + 1; j < T; ++j) row[j] = 0.0f;
      }
      // dq = scale dp K over the visible keys.
      if (dq != nullptr) {
        Sgemm(false, false, mb, Dk, n, scale, dp + i0 * T, T, k + qk_base, Ck, 1.0f,
              dq + qk_base + i0 * Ck, Ck);
      }
    }
    if (dk != nullptr) {
      for (int j0 = 0; j0 < T; j0 += kAttnBlock) {
        const int mb = std::min(kAttnBlock, T - j0);
        // dk[j] += scale sum_{t >= j0} dp[t, j] q[t]
        Sgemm(true, false, mb, Dk, T - j0, scale, dp + j0 * T + j0, T, q + qk_base + j0 * Ck, Ck,
              1.0f, dk + qk_base + j0 * Ck, Ck);
      }
    }
  });
}

// ---- column slices --------------------------------------------------------------

void slice_forward(float* out, const float* inp, int64_t N, int ld, int off, int w) {
  ParallelFor(N, [&](int64_t n) {
    std::memcpy(out + n * w, inp + n * ld + off, sizeof(float) * static_cast<size_t>(w));
  });
}

void slice_backward(float* dinp, const float* dout, int64_t N, int ld, int off, int w) {
  if (dinp == nullptr) return;
  ParallelFor(N, [&](int64_t n) {
    float* d = dinp + n * ld + off;
    const float* g = dout + n * w;
    for (int i = 0; i < w; ++i) d[i] += g[i];
  });
}

// ---- MLA heads ------------------------------------------------------------------
//
// The rotary part pairs neighbours (x[2i], x[2i+1]), as DeepSeek-V3's
// apply_rotary_pos_emb does after its view(d/2, 2).transpose: the result
// lands in rotate_half order, [rotated first halves | rotated second halves],
// the same for queries and keys, so their products are those of the
// checkpoint's model.

namespace {

// out[i] = x[2i] c - x[2i+1] s;  out[i + half] = x[2i+1] c + x[2i] s.
void RopeInterleaved(float* out, const float* x, const float* c, const float* s, int half) {
  for (int i = 0; i < half; ++i) {
    const float x1 = x[2 * i], x2 = x[2 * i + 1];
    out[i] = x1 * c[i] - x2 * s[i];
    out[i + half] = x2 * c[i] + x1 * s[i];
  }
}

// dx[2i] += g[i] c + g[i + half] s;  dx[2i+1] += g[i + half] c - g[i] s.
void RopeInterleavedBackward(float* dx, const float* g, const float* c, const float* s, int half) {
  for (int i = 0; i < half; ++i) {
    const float g1 = g[i], g2 = g[i + half];
    dx[2 * i] += g1 * c[i] + g2 * s[i];
    dx[2 * i + 1] += g2 * c[i] - g1 * s[i];
  }
}

}  // namespace

void mla_heads_forward(float* q, float* k, float* v, const float* qp, const float* kv,
                       const float* kva, const float* cos, const float* sin, int B, int T, int H,
                       int dn, int dr, int dv, int r) {
  const int dqk = dn + dr, dkv = dn + dv, half = dr / 2;
  ParallelFor(static_cast<int64_t>(B) * T, [&](int64_t n) {
    const float* c = cos + (n % T) * half;
    const float* s = sin + (n % T) * half;
    thread_local std::vector<float> kr_buffer;
    kr_buffer.resize(static_cast<size_t>(dr));
    float* kr = kr_buffer.data();
    RopeInterleaved(kr, kva + n * (r + dr) + r, c, s, half);
    for (int h = 0; h < H; ++h) {
      const float* qh = qp + (n * H + h) * dqk;
      const float* kvh = kv + (n * H + h) * dkv;
      float* qo = q + (n * H + h) * dqk;
      float* ko = k + (n * H + h) * dqk;
      std::memcpy(qo, qh, sizeof(float) * static_cast<size_t>(dn));
      RopeInterleaved(qo + dn, qh + dn, c, s, half);
      std::memcpy(ko, kvh, sizeof(float) * static_cast<size_t>(dn));
      std::memcpy(ko + dn, kr, sizeof(float) * static_cast<size_t>(dr));
      std::memcpy(v + (n * H + h) * dv, kvh + dn, sizeof(float) * static_cast<size_t>(dv));
    }
  });
}

void mla_heads_backward(float* dqp, float* dkv, float* dkva, const float* dq, const float* dk,
                        const float* dv, const float* cos, const float* sin, int B, int T, int H,
                        int dn, int dr, int dv_dim, int r) {
  const int dqk = dn + dr, dkvw = dn + dv_dim, half = dr / 2;
  ParallelFor(static_cast<int64_t>(B) * T, [&](int64_t n) {
    const float* c = cos + (n % T) * half;
    const float* s = sin + (n % T) * half;
    thread_local std::vector<float> dkr_buffer;
    dkr_buffer.assign(static_cast<size_t>(dr), 0.0f);
    float* dkr = dkr_buffer.data();  // the shared key's gradient, heads in order
    for (int h = 0; h < H; ++h) {
      const float* gq = dq + (n * H + h) * dqk;
      const float* gk = dk + (n * H + h) * dqk;
      const float* gv = dv + (n * H + h) * dv_dim;
      if (dqp != nullptr) {
        float* d = dqp + (n * H + h) * dqk;
        for (int i = 0; i < dn; ++i) d[i] += gq[i];
        RopeInterleavedBackward(d + dn, gq + dn, c, s, half);
      }
      if (dkv != nullptr) {
        float* d = dkv + (n * H + h) * dkvw;
        for (int i = 0; i < dn; ++i) d[i] += gk[i];
        for (int i = 0; i < dv_dim; ++i) d[dn + i] += gv[i];
      }
      for (int i = 0; i < dr; ++i) dkr[i] += gk[dn + i];
    }
    if (dkva != nullptr) {
      RopeInterleavedBackward(dkva + n * (r + dr) + r, dkr, c, s, half);
    }
  });
}

// ---- SwiGLU -----------------------------------------------------------------

void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int F) {
  ParallelFor(N, [&](int64_t n) {
    const int64_t o = n * F;
    for (int f = 0; f < F; ++f) {
      const float x = gate[o + f];
      out[o + f] = x * Sigmoid(x) * up[o + f];
    }
  });
}

void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t N, int F) {
  if (dgate == nullptr && dup == nullptr) return;
  ParallelFor(N, [&](int64_t n) {
    const int64_t o = n * F;
    for (int f = 0; f < F; ++f) {
      const float x = gate[o + f];
      const float s = Sigmoid(x);
      const float g = dout[o + f];
      // d silu / dx = s (1 + x (1 - s)).
      if (dgate != nullptr) dgate[o + f] += g * up[o + f] * s * (1.0f + x * (1.0f - s));
      if (dup != nullptr) dup[o + f] += g * x * s;
    }
  });
}

// ---- router -------------------------------------------------------------------

void router_score_forward(float* scores, const float* logits, int N, int E, ScoringFunc func) {
  ParallelFor(N, [&](int64_t n) {
    const float* l = logits + n * E;
    float* s = scores + n * E;
    if (func == ScoringFunc::kSigmoid) {
      for (int e = 0; e < E; ++e) s[e] = Sigmoid(l[e]);
      return;
    }
    float mx = -INFINITY;
    for (int e = 0; e < E; ++e) mx = std::max(mx, l[e]);
    float sum = 0.0f;
    for (int e = 0; e < E; ++e) {
      s[e] = std::exp(l[e] - mx);
      sum += s[e];
    }
    const float inv = 1.0f / sum;
    for (int e = 0; e < E; ++e) s[e] *= inv;
  });
}

void router_score_backward(float* dlogits, const float* dscores, const float* scores, int N, int E,
                           ScoringFunc func) {
  if (dlogits == nullptr) return;
  ParallelFor(N, [&](int64_t n) {
    const float* s = scores + n * E;
    const float* g = dscores + n * E;
    float* dl = dlogits + n * E;
    if (func == ScoringFunc::kSigmoid) {
      for (int e = 0; e < E; ++e) dl[e] += g[e] * s[e] * (1.0f - s[e]);
      return;
    }
    float dot = 0.0f;
    for (int e = 0; e < E; ++e) dot += s[e] * g[e];
    for (int e = 0; e < E; ++e) dl[e] += s[e] * (g[e] - dot);
  });
}

void router_topk(int32_t* idx, const float* scores, const float* bias, int N, int E, int K) {
  if (K <= 0) return;
  ParallelFor(N, [&](int64_t n) {
    const float* s = scores + n * E;
    int32_t* out = idx + n * K;
    auto key = [&](int e) { return bias != nullptr ? s[e] + bias[e] : s[e]; };
    // Insertion into a sorted list of at most K; a strict comparison keeps the
    // earlier (lower) expert ahead on ties.
    int count = 0;
    for (int e = 0; e < E; ++e) {
      const float val = key(e);
      if (count == K && !(val > key(out[K - 1]))) continue;
      int i = count < K ? count : K - 1;
      while (i > 0 && val > key(out[i - 1])) {
        out[i] = out[i - 1];
        --i;
      }
      out[i] = e;
      if (count < K) ++count;
    }
  });
}

void topk_weights_forward(float* weights, const float* scores, const int32_t* idx, int N, int E,
                          int K, bool norm, float scale) {
  ParallelFor(N, [&](int64_t n) {
    const float* s = scores + n * E;
    const int32_t* ix = idx + n * K;
    float* w = weights + n * K;
    if (!norm) {
      for (int j = 0; j < K; ++j) w[j] = s[ix[j]] * scale;
      return;
    }
    float sum = 0.0f;
    for (int j = 0; j < K; ++j) sum += s[ix[j]];
    for (int j = 0; j < K; ++j) w[j] = s[ix[j]] / sum * scale;
  });
}

void topk_weights_backward(float* dscores, const float* dweights, const float* scores,
                           const int32_t* idx, int N, int E, int K, bool norm, float scale) {
  if (dscores == nullptr) return;
  ParallelFor(N, [&](int64_t n) {
    const float* s = scores + n * E;
    const int32_t* ix = idx + n * K;
    const float* g = dweights + n * K;
    float* ds = dscores + n * E;
    if (!norm) {
      for (int j = 0; j < K; ++j) ds[ix[j]] += g[j] * scale;
      return;
    }
    // w_j = scale s_j / S: d w_j / d s_m = scale (delta_jm / S - s_j / S^2).
    float sum = 0.0f;
    float dot = 0.0f;
    for (int j = 0; j < K; ++j) {
      sum += s[ix[j]];
      dot += g[j] * s[ix[j]];
    }
    const float inv = 1.0f / sum;
    const float mean = dot * inv;
    for (int j = 0; j < K; ++j) ds[ix[j]] += scale * inv * (g[j] - mean);
  });
}

// ---- expert dispatch / combine -------------------------------------------------

void build_routing(int32_t* offsets, int32_t* token, int32_t* pos, const int32_t* idx, int N, int E,
                   int K) {
  // Counting sort: stable in (n, j), so tokens stay in order within an expert.
  std::fill(offsets, offsets + E + 1, 0);
  const int64_t P = static_cast<int64_t>(N) * K;
  for (int64_t a = 0; a < P; ++a) ++offsets[idx[a] + 1];
  for (int e = 0; e < E; ++e) offsets[e + 1] += offsets[e];
  std::vector<int32_t> cursor(offsets, offsets + E);
  for (int64_t a = 0; a < P; ++a) {
    const int32_t p = cursor[idx[a]]++;
    token[p] = static_cast<int32_t>(a / K);
    pos[a] = p;
  }
}

void dispatch_forward(float* xe, const float* x, const int32_t* token, int P, int C) {
  ParallelFor(P, [&](int64_t p) {
    std::memcpy(xe + p * C, x + static_cast<int64_t>(token[p]) * C, sizeof(float) * C);
  });
}

void dispatch_backward(float* dx, const float* dxe, const int32_t* pos, int N, int K, int C) {
  if (dx == nullptr) return;
  ParallelFor(N, [&](int64_t n) {
    float* dst = dx + n * C;
    for (int j = 0; j < K; ++j) {
      const float* src = dxe + static_cast<int64_t>(pos[n * K + j]) * C;
      for (int c = 0; c < C; ++c) dst[c] += src[c];
    }
  });
}

void combine_forward(float* out, const float* ye, const float* weights, const int32_t* pos, int N,
                     int K, int C) {
  ParallelFor(N, [&](int64_t n) {
    float* dst = out + n * C;
    for (int j = 0; j < K; ++j) {
      const float w = weights[n * K + j];
      const float* src = ye + static_cast<int64_t>(pos[n * K + j]) * C;
      for (int c = 0; c < C; ++c) dst[c] += w * src[c];
    }
  });
}

void combine_backward(float* dye, float* dweights, const float* dout, const float* ye,
                      const float* weights, const int32_t* pos, int N, int K, int C) {
  if (dye == nullptr && dweights == nullptr) return;
  // Each sorted position belongs to exactly one (n, j), so rows of dye are
  // written by one iteration only.
  ParallelFor(N, [&](int64_t n) {
    const float* g = dout + n * C;
    for (int j = 0; j < K; ++j) {
      const int64_t p = pos[n * K + j];
      if (dye != nullptr) {
        const float w = weights[n * K + j];
        float* dst = dye + p * C;
        for (int c = 0; c < C; ++c) dst[c] += w * g[c];
      }
      if (dweights != nullptr) {
        const float* y = ye + p * C;
        float dot = 0.0f;
        for (int c = 0; c < C; ++c) dot += g[c] * y[c];
        dweights[n * K + j] += dot;
      }
    }
  });
}

// ---- loss ---------------------------------------------------------------------

void crossentropy_forward(float* losses, float* probs, const float* logits, const int32_t* targets,
                          int N, int V) {
  ParallelFor(N, [&](int64_t n) {
    const float* l = logits + n * V;
    float* p = probs + n * V;
    float mx = -INFINITY;
    for (int v = 0; v < V; ++v) mx = std::max(mx, l[v]);
    double sum = 0.0;
    for (int v = 0; v < V; ++v) {
      p[v] = std::exp(l[v] - mx);
      sum += p[v];
    }
    const float inv = static_cast<float>(1.0 / sum);
    for (int v = 0; v < V; ++v) p[v] *= inv;
    // -log softmax = log(sum exp(l - max)) - (l_target - max).
    losses[n] = static_cast<float>(std::log(sum) - (static_cast<double>(l[targets[n]]) - mx));
  });
}

void crossentropy_backward(float* dlogits, const float* dlosses, const float* probs,
                           const int32_t* targets, int N, int V) {
  if (dlogits == nullptr) return;
  ParallelFor(N, [&](int64_t n) {
    const float* p = probs + n * V;
    float* dl = dlogits + n * V;
    const float g = dlosses[n];
    for (int v = 0; v < V; ++v) dl[v] += g * p[v];
    dl[targets[n]] -= g;
  });
}

namespace {

// f_e = E / (K N) * (number of assignments to e).   f (E)
std::vector<float> ExpertLoadFractions(const int32_t* idx, int N, int E, int K) {
  std::vector<int64_t> count(E, 0);
  const int64_t P = static_cast<int64_t>(N) * K;
  for (int64_t a = 0; a < P; ++a) ++count[idx[a]];
  std::vector<float> f(E);
  const double norm = static_cast<double>(E) / (static_cast<double>(K) * N);
  for (int e = 0; e < E; ++e) f[e] = static_cast<float>(norm * static_cast<double>(count[e]));
  return f;
}

}  // namespace

float aux_loss_forward(const float* scores, const int32_t* idx, int N, int E, int K) {
  if (N <= 0) return 0.0f;
  const std::vector<float> f = ExpertLoadFractions(idx, N, E, K);
  // aux = (1/N) sum_n <f, s_n> / sum(s_n); per-row terms, then a fixed-order sum.
  std::vector<double> row(N);
  ParallelFor(N, [&](int64_t n) {
    const float* s = scores + n * E;
    double dot = 0.0;
    double sum = 0.0;
    for (int e = 0; e < E; ++e) {
      dot += static_cast<double>(f[e]) * s[e];
      sum += s[e];
    }
    row[n] = dot / sum;
  });
  double total = 0.0;
  for (int n = 0; n < N; ++n) total += row[n];
  return static_cast<float>(total / N);
}

void aux_loss_backward(float* dscores, float daux, const float* scores, const int32_t* idx, int N,
                       int E, int K) {
  if (dscores == nullptr || N <= 0) return;
  const std::vector<float> f = ExpertLoadFractions(idx, N, E, K);
  // d aux / d s[n,e] = (f_e - <f, s_n> / S_n) / (N S_n), S_n = sum(s_n).
  ParallelFor(N, [&](int64_t n) {
    const float* s = scores + n * E;
    float* ds = dscores + n * E;
    double dot = 0.0;
    double sum = 0.0;
    for (int e = 0; e < E; ++e) {
      dot += static_cast<double>(f[e]) * s[e];
      sum += s[e];
    }
    const double mean = dot / sum;
    const double coef = static_cast<double>(daux) / (static_cast<double>(N) * sum);
    for (int e = 0; e < E; ++e) ds[e] += static_cast<float>(coef * (f[e] - mean));
  });
}

}  // namespace muonps
