#include "optim/lr_schedule.h"

#include <algorithm>
#include <cmath>
#include <numbers>

namespace muonps {

double ScheduledLr(double peak_lr, int64_t step, int64_t total_steps, int64_t warmup_steps,
                   double min_lr_ratio) {
  if (step < warmup_steps) {
    return peak_lr * static_cast<double>(step + 1) / static_cast<double>(warmup_steps);
  }
  const int64_t warmup = std::max<int64_t>(warmup_steps, 0);
  const double decay_steps = static_cast<double>(std::max<int64_t>(1, total_steps - warmup));
  const double progress = std::clamp(static_cast<double>(step - warmup) / decay_steps, 0.0, 1.0);
  const double min_lr = min_lr_ratio * peak_lr;
  return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + std::cos(std::numbers::pi * progress));
}

}  // namespace muonps
