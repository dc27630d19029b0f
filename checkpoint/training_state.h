// Everything that a training run carries from one step to the next: the
// parameters (and buffers), the optimizer state, and where the run stands.
// All float buffers share the flat layout of ModelLayout.
#ifndef MUONPS_CHECKPOINT_TRAINING_STATE_H_
#define MUONPS_CHECKPOINT_TRAINING_STATE_H_

#include <cstdint>
#include <vector>

#include "muonps/v1/job.pb.h"

namespace muonps {

struct TrainingState {
  std::vector<float> params;      // parameters and buffers
  std::vector<float> momentum;    // Muon momentum buffers (Muon tensors only)
  std::vector<float> exp_avg;     // AdamW first moments (AdamW tensors only)
  std::vector<float> exp_avg_sq;  // AdamW second moments (AdamW tensors only)
  v1::TrainerState trainer;       // step, job, tokens seen, last validation loss
};

}  // namespace muonps

#endif  // MUONPS_CHECKPOINT_TRAINING_STATE_H_
