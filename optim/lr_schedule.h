// The learning-rate schedule: linear warmup, then cosine decay to a floor.
#ifndef MUONPS_OPTIM_LR_SCHEDULE_H_
#define MUONPS_OPTIM_LR_SCHEDULE_H_

#include <cstdint>

namespace muonps {

// The learning rate for the 0-based optimizer step `step`.
//   step < warmup_steps:  peak_lr * (step + 1) / warmup_steps
//   otherwise:            min + (peak_lr - min) * 0.5 * (1 + cos(pi * progress)),
//                         min = min_lr_ratio * peak_lr,
//                         progress = (step - warmup_steps) / max(1, total_steps - warmup_steps),
//                         clamped to [0, 1].
// So the peak is reached at step warmup_steps - 1 (and again at warmup_steps),
// and min is returned from step total_steps on. warmup_steps <= 0 means no warmup.
double ScheduledLr(double peak_lr, int64_t step, int64_t total_steps, int64_t warmup_steps,
                   double min_lr_ratio);

}  // namespace muonps

#endif  // MUONPS_OPTIM_LR_SCHEDULE_H_
