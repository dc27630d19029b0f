// Quintic Newton-Schulz orthogonalisation, the core of the Muon optimizer.
//
// Size legend
//   m  min(rows, cols)      n  max(rows, cols)
//
// With X0 = G / (||G||_F + 1e-7), taken as (m, n) (transposed when rows > cols),
// each iteration computes
//   A = X X^T;   B = b A + c A A;   X = a X + B X,   (a, b, c) = (3.4445, -4.7750, 2.0315).
// The coefficients drive every singular value of X into roughly [0.7, 1.2]
// within five iterations, so the result approximates U V^T for G = U S V^T.
#ifndef MUONPS_OPTIM_NEWTON_SCHULZ_H_
#define MUONPS_OPTIM_NEWTON_SCHULZ_H_

#include <cstdint>

namespace muonps {

// out (rows, cols) = NewtonSchulz(in (rows, cols)) with `steps` iterations,
// float32, row-major. out may alias in. steps >= 0 (0 only normalises).
// The Frobenius norm is accumulated in double; the products run on BLAS.
//
// Scratch memory (about 2 m^2 + m n floats) is kept per calling thread and
// reused, so repeated calls with shapes no larger than before do not allocate.
// Safe to call from several threads at once on distinct buffers.
// Bit-identical for any thread count.
void NewtonSchulz(float* out, const float* in, int rows, int cols, int steps);

// Floating-point operations of NewtonSchulz(rows, cols, steps), counted as
// general matrix products: per iteration 2 m^2 n (X X^T) + 2 m^3 (A A) +
// 2 m^2 n (B X). The normalisation and elementwise work are not counted.
double NewtonSchulzFlops(int rows, int cols, int steps);

}  // namespace muonps

#endif  // MUONPS_OPTIM_NEWTON_SCHULZ_H_
