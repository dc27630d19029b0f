// AdamW with decoupled weight decay, matching torch.optim.AdamW
// (amsgrad=False, maximize=False).
//
// Used for the parameters Muon does not handle: embeddings, the LM head,
// norms, router biases.
#ifndef MUONPS_OPTIM_ADAMW_H_
#define MUONPS_OPTIM_ADAMW_H_

#include <cstdint>

namespace muonps {

struct AdamWHyper {
  double lr;
  double beta1;
  double beta2;
  double eps;
  double weight_decay;
};

// One AdamW update of n parameters, in place on w, exp_avg and exp_avg_sq.
// `step` is the 1-based index of this update (bias correction uses it); the
// state starts at zero before step 1. Per element, in double, stored as float:
//   w  *= 1 - lr * weight_decay
//   m   = beta1 * m + (1 - beta1) * g
//   v   = beta2 * v + (1 - beta2) * g^2
//   w  -= (lr / (1 - beta1^step)) * m / (sqrt(v) / sqrt(1 - beta2^step) + eps)
// w, exp_avg, exp_avg_sq, grad: (n); none may alias another.
// Bit-identical for any thread count.
void AdamWStep(float* w, float* exp_avg, float* exp_avg_sq, const float* grad, int64_t n,
               int64_t step, const AdamWHyper& h);

}  // namespace muonps

#endif  // MUONPS_OPTIM_ADAMW_H_
