// Per-element and per-row arithmetic shared by the CPU ops (model/ops.h)
// and their CUDA twins (workers/cuda/): one definition of each formula,
// compiled for the host by the C++ compiler and for the device by nvcc, so
// the CPU tests exercise exactly the expressions the GPU kernels run. A
// per-row function is what one CPU loop iteration, or one GPU thread, does
// for one token.
//
// The host build contracts nothing (no FMA on the x86-64 baseline), so CPU
// bits do not depend on how these inline; nvcc fuses multiply-adds and its
// expf differs from libm's in the last bits, which is why CPU and GPU agree
// within tolerances, not bit for bit (docs/design.md, GPU numerics).
#ifndef MUONPS_COMMON_ELEMENTWISE_H_
#define MUONPS_COMMON_ELEMENTWISE_H_

#if defined(__CUDACC__)
#define MUONPS_HD __host__ __device__ __forceinline__
#else
#define MUONPS_HD inline
#endif

#include <cmath>
#include <cstdint>

namespace muonps::elementwise {

MUONPS_HD float Exp(float x) {
#if defined(__CUDA_ARCH__)
  return expf(x);
#else
  return std::exp(x);
#endif
}

MUONPS_HD float Sqrt(float x) {
#if defined(__CUDA_ARCH__)
  return sqrtf(x);
#else
  return std::sqrt(x);
#endif
}

// 1 / (1 + exp(-x)) without overflow in the intermediate exp.
MUONPS_HD float Sigmoid(float x) {
  if (x >= 0.0f) return 1.0f / (1.0f + Exp(-x));
  const float e = Exp(x);
  return e / (1.0f + e);
}

// SwiGLU: silu(gate) * up, and its two partial derivatives times dy
// (d silu / dx = s (1 + x (1 - s)) with s = sigmoid(x)).
MUONPS_HD float SwigluForward(float gate, float up) { return gate * Sigmoid(gate) * up; }
MUONPS_HD float SwigluGateGrad(float dy, float gate, float up) {
  const float s = Sigmoid(gate);
  return dy * up * s * (1.0f + gate * (1.0f - s));
}
MUONPS_HD float SwigluUpGrad(float dy, float gate) { return dy * gate * Sigmoid(gate); }

// RMSNorm: the inverse root mean square of a row from its sum of squares
// over C channels, the normalised output, and the input gradient of one
// channel given coef = r^2 <dy w, x> / C.
MUONPS_HD float RmsnormInverse(float sum_of_squares, int C, float eps) {
  return 1.0f / Sqrt(sum_of_squares / static_cast<float>(C) + eps);
}
MUONPS_HD float RmsnormOut(float x, float r, float w) { return x * r * w; }
MUONPS_HD float RmsnormInputGrad(float dy, float w, float x, float r, float coef) {
  return r * (dy * w - x * coef);
}
MUONPS_HD float RmsnormWeightGrad(float dy, float x, float r) { return dy * x * r; }

// Rotary embedding of one pair (x1, x2) at angle (c = cos, s = sin), and the
// gradient of the pair from the output gradient (g1, g2): the transpose
// rotation.
MUONPS_HD void RopeRotate(float x1, float x2, float c, float s, float* o1, float* o2) {
  *o1 = x1 * c - x2 * s;
  *o2 = x2 * c + x1 * s;
}
MUONPS_HD void RopeRotateBack(float g1, float g2, float c, float s, float* d1, float* d2) {
  *d1 = g1 * c + g2 * s;
  *d2 = g2 * c - g1 * s;
}

// The larger of a and b (a unless b is larger: std::max's choice).
MUONPS_HD float Max(float a, float b) { return a < b ? b : a; }

// ---- router rows (E experts; K chosen) ----
// s = softmax(l) over one row.
MUONPS_HD void SoftmaxRow(float* s, const float* l, int E) {
  float mx = -INFINITY;
  for (int e = 0; e < E; ++e) mx = Max(mx, l[e]);
  float sum = 0.0f;
  for (int e = 0; e < E; ++e) {
    s[e] = Exp(l[e] - mx);
    sum += s[e];
  }
  const float inv = 1.0f / sum;
  for (int e = 0; e < E; ++e) s[e] *= inv;
}
// dl += the softmax's input gradient for output gradient g.
MUONPS_HD void SoftmaxRowBackward(float* dl, const float* g, const float* s, int E) {
  float dot = 0.0f;
  for (int e = 0; e < E; ++e) dot += s[e] * g[e];
  for (int e = 0; e < E; ++e) dl[e] += s[e] * (g[e] - dot);
}
// d sigmoid(x) for output s = sigmoid(x) and output gradient g.
MUONPS_HD float SigmoidGrad(float g, float s) { return g * s * (1.0f - s); }

// out[0, K) = the K experts of largest s[e] + bias[e] (bias may be null),
// decreasing, ties to the lower index: insertion into a sorted list of at
// most K, a strict comparison keeping the earlier expert ahead.
MUONPS_HD void RouterTopkRow(int32_t* out, const float* s, const float* bias, int E, int K) {
  int count = 0;
  for (int e = 0; e < E; ++e) {
    const float val = bias != nullptr ? s[e] + bias[e] : s[e];
    if (count == K) {
      const int last = out[K - 1];
      if (!(val > (bias != nullptr ? s[last] + bias[last] : s[last]))) continue;
    }
    int i = count < K ? count : K - 1;
    while (i > 0) {
      const int prev = out[i - 1];
      if (!(val > (bias != nullptr ? s[prev] + bias[prev] : s[prev]))) break;
      out[i] = out[i - 1];
      --i;
    }
    out[i] = e;
    if (count < K) ++count;
  }
}

// w[j] = s[ix[j]] (divided by their sum when norm) * scale.
MUONPS_HD void TopkWeightsRow(float* w, const float* s, const int32_t* ix, int K, bool norm,
                              float scale) {
  if (!norm) {
    for (int j = 0; j < K; ++j) w[j] = s[ix[j]] * scale;
    return;
  }
  float sum = 0.0f;
  for (int j = 0; j < K; ++j) sum += s[ix[j]];
  for (int j = 0; j < K; ++j) w[j] = s[ix[j]] / sum * scale;
}
// ds[ix[j]] += d w / d s for weight gradient g: w_j = scale s_j / S gives
// d w_j / d s_m = scale (delta_jm / S - s_j / S^2).
MUONPS_HD void TopkWeightsRowBackward(float* ds, const float* g, const float* s, const int32_t* ix,
                                      int K, bool norm, float scale) {
  if (!norm) {
    for (int j = 0; j < K; ++j) ds[ix[j]] += g[j] * scale;
    return;
  }
  float sum = 0.0f;
  float dot = 0.0f;
  for (int j = 0; j < K; ++j) {
    sum += s[ix[j]];
    dot += g[j] * s[ix[j]];
  }
  const float inv = 1.0f / sum;
  const float mean = dot * inv;
  for (int j = 0; j < K; ++j) ds[ix[j]] += scale * inv * (g[j] - mean);
}

// The aux balance loss's gradient for one token's scores s (E experts),
// given the load fractions f: ds[e] += daux (f_e - <f, s> / S) / (N S),
// S = sum(s), accumulated in double.
MUONPS_HD void AuxLossRowBackward(float* ds, const float* s, const float* f, float daux, int N,
                                  int E) {
  double dot = 0.0;
  double sum = 0.0;
  for (int e = 0; e < E; ++e) {
    dot += static_cast<double>(f[e]) * s[e];
    sum += s[e];
  }
  const double mean = dot / sum;
  const double coef = static_cast<double>(daux) / (static_cast<double>(N) * sum);
  for (int e = 0; e < E; ++e) ds[e] += static_cast<float>(coef * (f[e] - mean));
}

}  // namespace muonps::elementwise

#endif  // MUONPS_COMMON_ELEMENTWISE_H_
