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

#include "common/elementwise.h"
#include "common/gemm.h"
#include "common/parallel.h"

namespace muonps {
namespace {

// Channels per iteration when reducing over rows into a per-channel buffer.
constexpr int kChannelBlock = 64;

int NumChannelBlocks(int C) { return (C + kChannelBlock - 1) / kChannelBlock; }

using elementwise::Sigmoid;

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
    const float r = elementwise::RmsnormInverse(ss, C, eps);
    for (int c = 0; c < C; ++c) o[c] = elementwise::RmsnormOut(x[c], r, weight[c]);
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
      for (int c = 0; c < C; ++c)
        dx[c] += elementwise::RmsnormInputGrad(g[c], weight[c], x[c], r, coef);
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
        for (int c = c0; c < c1; ++c) dweight[c] += elementwise::RmsnormWeightGrad(g[c], x[c], r);
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
        elementwise::RopeRotate(x[i], x[i + half], c[i], s[i], &o[i], &o[i + half]);
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
        float d1, d2;
        elementwise::RopeRotateBack(g[i], g[i + half], c[i], s[i], &d1, &d2);
        dx[i] += d1;
        dx[i + half] += d2;
      }
    }
  });
}

// ---- SwiGLU -----------------------------------------------------------------

void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int F) {
  ParallelFor(N, [&](int64_t n) {
    const int64_t o = n * F;
    for (int f = 0; f < F; ++f) {
      out[o + f] = elementwise::SwigluForward(gate[o + f], up[o + f]);
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
      const float g = dout[o + f];
      if (dgate != nullptr) dgate[o + f] += elementwise::SwigluGateGrad(g, x, up[o + f]);
      if (dup != nullptr) dup[o + f] += elementwise::SwigluUpGrad(g, x);
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
    elementwise::SoftmaxRow(s, l, E);
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
      for (int e = 0; e < E; ++e) dl[e] += elementwise::SigmoidGrad(g[e], s[e]);
      return;
    }
    elementwise::SoftmaxRowBackward(dl, g, s, E);
  });
}

void router_topk(int32_t* idx, const float* scores, const float* bias, int N, int E, int K) {
  if (K <= 0) return;
  ParallelFor(
      N, [&](int64_t n) { elementwise::RouterTopkRow(idx + n * K, scores + n * E, bias, E, K); });
}

void topk_weights_forward(float* weights, const float* scores, const int32_t* idx, int N, int E,
                          int K, bool norm, float scale) {
  ParallelFor(N, [&](int64_t n) {
    elementwise::TopkWeightsRow(weights + n * K, scores + n * E, idx + n * K, K, norm, scale);
  });
}

void topk_weights_backward(float* dscores, const float* dweights, const float* scores,
                           const int32_t* idx, int N, int E, int K, bool norm, float scale) {
  if (dscores == nullptr) return;
  ParallelFor(N, [&](int64_t n) {
    elementwise::TopkWeightsRowBackward(dscores + n * E, dweights + n * K, scores + n * E,
                                        idx + n * K, K, norm, scale);
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
    elementwise::AuxLossRowBackward(dscores + n * E, scores + n * E, f.data(), daux, N, E);
  });
}

}  // namespace muonps
