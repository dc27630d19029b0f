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

// SumOfSquares of a buffer that fills front to back (a gradient arriving
// chunk by chunk), computed as it fills: each fixed-size chunk of
// SumOfSquares is summed once complete, while it is likely still in cache,
// and the chunk sums are added in index order. Total() equals
// SumOfSquares(base, n) bit for bit, however the buffer was filled.
class SumOfSquaresStream {
 public:
  // `base` holds the n values once all have arrived; it must outlive the
  // stream.
  SumOfSquaresStream(const float* base, int64_t n) : base_(base), n_(n) {}
  // The first `filled` values are in place (never fewer than before).
  void Filled(int64_t filled);
  // Once all n values are in place.
  double Total();

 private:
  const float* base_;
  int64_t n_;
  int64_t done_ = 0;  // values summed so far: whole chunks
  double total_ = 0.0;
};

// x[i] *= s for i in [0, n).
void Scale(float* x, int64_t n, float s);

}  // namespace muonps

#endif  // MUONPS_OPTIM_GRAD_NORM_H_
