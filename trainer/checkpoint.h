// Checkpoint directories:
//   model.safetensors      parameters and buffers under their HF names
//   optimizer.safetensors  <name>.momentum_buffer (Muon), <name>.exp_avg and
//                          <name>.exp_avg_sq (AdamW)
//   config.json            the model config (HF-style keys)
//   trainer_state.json     step, tokens seen, the full job spec
// A directory is written under a temporary name and renamed into place, and
// every file in it is fsynced, so a crash never leaves a half checkpoint
// under the final name.
#ifndef MUONPS_TRAINER_CHECKPOINT_H_
#define MUONPS_TRAINER_CHECKPOINT_H_

#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/model_layout.h"
#include "trainer/training_state.h"

namespace muonps {

// Writes `state` to `dir` (created; an existing checkpoint there is replaced).
absl::Status WriteCheckpoint(const std::string& dir, const ModelLayout& layout,
                             const TrainingState& state);

// Resolves what `--resume PATH` names: PATH itself when it holds
// trainer_state.json, else its newest `step-NNNNNNNN` subdirectory.
absl::StatusOr<std::string> ResolveCheckpointDir(const std::string& path);

// Reads the checkpoint in `dir` into `state`, whose buffers must already be
// sized for `layout`. Refuses (naming the tensor) a missing tensor or a wrong
// shape or dtype, and a config.json different from `model`.
absl::Status ReadCheckpoint(const std::string& dir, const ModelLayout& layout,
                            const v1::ModelConfig& model, const std::string& optimizer_name,
                            TrainingState* state);

// Name of the checkpoint directory for `step` ("step-00000120").
std::string CheckpointName(int64_t step);

}  // namespace muonps

#endif  // MUONPS_TRAINER_CHECKPOINT_H_
