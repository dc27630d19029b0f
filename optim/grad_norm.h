// Reductions and scaling over flat float32 tensors, for gradient-norm
// clipping and Newton-Schulz normalisation.
//
// Both functions give bit-identical results for any thread count.
#ifndef MUONPS_OPTIM_GRAD_NORM_H_
#define MUONPS_OPTIM_GRAD_NORM_H_

#include <cstdint>

namespace muonps {

// Sum of x[i]^2 over [0, n), accumulated in double. The reduction order is
// fixed by n alone (fixed-size chunks summed in index order, then the chunk
// sums in index order), never by the thread count. Returns 0 for n <= 0.
double SumOfSquares(const float* x, int64_t n);

// x[i] *= s for i in [0, n).
void Scale(float* x, int64_t n, float s);

}  // namespace muonps

#endif  // MUONPS_OPTIM_GRAD_NORM_H_
