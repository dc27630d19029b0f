// CPU kernels of attention (see ops.h for the size legend): causal
// multi-head attention, the column slices and head assembly of Multi-head
// Latent Attention. The determinism rules of ops.cc hold here too.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "common/gemm.h"
#include "common/parallel.h"
#include "model/ops.h"

namespace muonps {

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

}  // namespace muonps
