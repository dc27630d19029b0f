// Per-element arithmetic shared by the CPU ops (model/ops.h) and their CUDA
// twins (workers/cuda/): one definition of each formula, compiled for the
// host by the C++ compiler and for the device by nvcc, so the CPU tests
// exercise exactly the expressions the GPU kernels run.
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

#if !defined(__CUDA_ARCH__)
#include <cmath>
#endif

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

}  // namespace muonps::elementwise

#endif  // MUONPS_COMMON_ELEMENTWISE_H_
