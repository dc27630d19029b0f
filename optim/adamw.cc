#include "optim/adamw.h"

#include <cmath>

#include "common/parallel.h"

namespace muonps {

void AdamWStep(float* w, float* exp_avg, float* exp_avg_sq, const float* grad, int64_t n,
               int64_t step, const AdamWHyper& h) {
  const double t = static_cast<double>(step);
  const double decay = 1.0 - h.lr * h.weight_decay;
  const double step_size = h.lr / (1.0 - std::pow(h.beta1, t));
  const double bias_correction2_sqrt = std::sqrt(1.0 - std::pow(h.beta2, t));
  const double beta1 = h.beta1;
  const double beta2 = h.beta2;
  const double eps = h.eps;
  ParallelFor(n, [&](int64_t i) {
    const double g = grad[i];
    const double m = beta1 * exp_avg[i] + (1.0 - beta1) * g;
    const double v = beta2 * exp_avg_sq[i] + (1.0 - beta2) * g * g;
    const double denom = std::sqrt(v) / bias_correction2_sqrt + eps;
    w[i] = static_cast<float>(w[i] * decay - step_size * m / denom);
    exp_avg[i] = static_cast<float>(m);
    exp_avg_sq[i] = static_cast<float>(v);
  });
}

}  // namespace muonps
