// The single-process trainer: `muonps train`. It is the reference that every
// distributed layout must match bit for bit, so the step is spelled out in the
// order the distributed system reproduces:
//   1. each slot s = 0..slots-1 computes its gradient on its own (mean-scaled
//      by the global token count); the global gradient is the left-to-right
//      sum ((g0 + g1) + g2) + ...
//   2. global gradient-norm clipping (sum of per-tensor squares in layout order)
//   3. per tensor: Muon for 2-D matrices, AdamW for embedding, head and norms
//   4. aux-free bias update from the expert loads summed over all slots
//   5. validation every eval_every steps on fixed held-out windows
#ifndef MUONPS_TRAINER_TRAINER_H_
#define MUONPS_TRAINER_TRAINER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "checkpoint/training_state.h"
#include "data/batch_sampler.h"
#include "data/token_source.h"
#include "model/moe_model.h"
#include "muonps/v1/job.pb.h"

namespace muonps {

// What one optimizer step reports.
struct StepReport {
  int64_t step = 0;  // steps completed after this one (1-based)
  int64_t total_steps = 0;
  double loss = 0.0;       // mean cross-entropy over the global batch (nats/token)
  double aux_loss = 0.0;   // mean over slots of the summed aux losses (0 unless aux_loss)
  double grad_norm = 0.0;  // before clipping
  double lr = 0.0;
  std::optional<double> val_loss;  // when evaluated at this step
  int64_t tokens = 0;              // tokens in this step
  double step_seconds = 0.0;
  double forward_backward_seconds = 0.0;
  // forward_backward_seconds split in proportion to the slots' measured
  // forward and backward times (slots may run concurrently).
  double forward_seconds = 0.0;
  double backward_seconds = 0.0;
  double optimizer_seconds = 0.0;
  double max_load_ratio = 0.0;  // max over MoE layers of (max expert load / mean load)
  // The largest pre-softmax attention logit over layers and heads (before
  // this step's QK-Clip), and the heads QK-Clip rescaled.
  double max_attention_logit = 0.0;
  int qk_clipped_heads = 0;
};

struct TrainOptions {
  std::string resume;      // checkpoint dir (or a dir of step-* checkpoints); empty = fresh
  int64_t until_step = 0;  // stop once this many steps are done (0 = the job's total)
  // Called after every step (progress display, logs, tests).
  std::function<void(const StepReport&)> on_step;
  // Polled between steps; when it returns true, Run stops after the current
  // step and writes a checkpoint (when the job has a checkpoint dir).
  std::function<bool()> stop_requested;
};

struct TrainSummary {
  int64_t steps_run = 0;  // in this invocation
  int64_t final_step = 0;
  double final_loss = 0.0;
  std::optional<double> final_val_loss;
  double tokens_per_second = 0.0;
  double seconds = 0.0;
  std::string last_checkpoint;  // empty when none written
  bool interrupted = false;     // stopped early by TrainOptions::stop_requested
};

class Trainer {
 public:
  // Loads data, builds the model, initialises (or resumes) the state.
  static absl::StatusOr<std::unique_ptr<Trainer>> Create(const v1::JobSpec& job,
                                                         const TrainOptions& options);

  // Runs steps until the job's total (or options.until_step); writes
  // checkpoints as the job asks and one at the end when a dir is set.
  absl::StatusOr<TrainSummary> Run();

  // One optimizer step.
  absl::StatusOr<StepReport> Step();
  // Mean cross-entropy over the fixed validation windows.
  double EvaluateValidation();
  absl::Status SaveCheckpoint();

  const TrainingState& state() const { return state_; }
  const MoeModel& model() const { return *lanes_[0].model; }
  // Bytes of every lane's activations (one slot in flight per lane).
  int64_t ActivationBytes() const;
  const TokenCorpus& corpus() const { return corpus_; }
  // After a resume from a checkpoint computed with other numerics (another
  // BLAS kernel): what the user should be told; empty otherwise.
  const std::string& resume_note() const { return resume_note_; }
  int64_t step() const { return state_.trainer.step(); }

 private:
  std::string resume_note_;
  Trainer(const v1::JobSpec& job, const TrainOptions& options);
  absl::Status Init();
  // Clips and applies the update; returns the gradient norm before clipping.
  // A non-finite gradient is refused before anything changes.
  absl::StatusOr<double> ApplyOptimizer(double lr, int64_t step_index);
  void UpdateRouterBias(const std::vector<std::vector<int64_t>>& loads);
  // The parameters the model computes with, as a worker pulls them: the
  // master values themselves, or (transfer.dtype bf16) a copy rounded to bf16.
  const float* ComputeParameters();

  // One lane per thread: slots of a step run concurrently, one per lane, each
  // single-threaded inside; their gradients are then summed in slot order.
  struct Lane {
    std::unique_ptr<MoeModel> model;
    std::vector<float> grads;
    std::vector<int32_t> inputs, targets;
    SlotStats stats;
  };

  v1::JobSpec job_;
  std::vector<Lane> lanes_;
  TrainOptions options_;
  TokenCorpus corpus_;
  std::unique_ptr<BatchSampler> sampler_;
  std::vector<int32_t> val_inputs_, val_targets_;
  int64_t val_windows_ = 0;
  TrainingState state_;
  std::vector<float> grads_;
  std::vector<float> wire_params_;  // ComputeParameters' bf16 copy
  std::string last_checkpoint_;
};

}  // namespace muonps

#endif  // MUONPS_TRAINER_TRAINER_H_
