// The algebra of one optimizer step, written once. `muonps train`, the
// worker, the coordinator and the shard all call these functions, so a
// distributed step is bit-identical to the trainer's by construction rather
// than by copies kept in sync.
//
// Step s (0-based) of job J:
//   1. Slots 0..S-1 (batch.slots), each micro_batch windows of T tokens, are
//      computed in waves of concurrent slots (ForEachWave, RunWave).
//   2. Every token's cross-entropy is multiplied by loss_scale and the aux
//      loss by aux_scale (StepScalesOf); slot gradients are summed in slot
//      order; the step's loss is the summed loss_sum / global_tokens.
//   3. Expert loads are summed over the slots (ExpertLoads).
//   4. The global norm is the square root of the per-tensor sums of squares
//      added in layout order; gradients are multiplied by ClipCoefficient
//      when ClipApplies.
//   5. The update runs at StepLearningRate(J, s); the router bias moves by
//      the summed loads.
#ifndef MUONPS_STEP_STEP_H_
#define MUONPS_STEP_STEP_H_

#include <cstdint>
#include <vector>

#include "absl/status/status.h"
#include "common/parallel.h"
#include "muonps/v1/coordinator.pb.h"
#include "muonps/v1/job.pb.h"

namespace muonps {

struct StepScales {
  int64_t global_tokens = 0;  // slots * micro_batch * T: the tokens of one step
  float loss_scale = 0.0f;    // on each token's cross-entropy: 1 / global_tokens
  float aux_scale = 0.0f;     // on each slot's aux loss: aux_loss_alpha / slots
                              // under balancing "aux_loss", else 0
};

// The scales of `job` (defaults filled).
StepScales StepScalesOf(const v1::JobSpec& job);

// The learning rate of step `step_index` (0-based): linear warmup, then
// cosine decay to min_lr_ratio * lr (optim/lr_schedule.h).
double StepLearningRate(const v1::JobSpec& job, int64_t step_index);

// max_grad_norm / (norm + 1e-6) when max_grad_norm > 0, else 1. Gradients are
// multiplied by it only when ClipApplies.
double ClipCoefficient(double max_grad_norm, double norm);
inline bool ClipApplies(double coef) { return coef < 1.0; }

// Slots [begin, end) of task k when a step's `slots` are split into `tasks`
// contiguous ranges of nearly equal size (the first k * slots / tasks slots
// go to the tasks before k). Contiguous ranges let a worker sum its slots
// from 0 in order before one push.
struct SlotRange {
  int begin = 0, end = 0;
};
SlotRange PlanSlots(int slots, int tasks, int k);

// Calls fn(base, wave) for base = 0, lanes, 2 lanes, ... below count, with
// wave = min(lanes, count - base): the waves in which `count` slots (or
// evaluation batches) run on `lanes` lanes.
template <typename Fn>
void ForEachWave(int64_t count, int lanes, Fn&& fn) {
  for (int64_t base = 0; base < count; base += lanes) {
    fn(base, static_cast<int>(std::min<int64_t>(lanes, count - base)));
  }
}

// Runs fn(i) for the lanes i in [0, wave) of one wave: concurrently, one
// lane per thread, or, for a single slot, on the calling thread so that its
// ops use every thread instead.
template <typename Fn>
void RunWave(int wave, Fn&& fn) {
  if (wave == 1) {
    fn(int64_t{0});
  } else {
    ParallelFor(wave, fn);
  }
}

// Tokens routed to each expert, per MoE layer, summed over a step's slots.
// Shaped by the model: (num_hidden_layers - first_k_dense_replace) layers of
// n_routed_experts counts; loads of another shape are refused, so nothing
// from the network can index past the router biases.
class ExpertLoads {
 public:
  explicit ExpertLoads(const v1::ModelConfig& model);

  // Adds one slot's loads (or a sum of slots'). InvalidArgument naming the
  // mismatch, with nothing added, for another shape or a negative count.
  absl::Status Add(const std::vector<std::vector<int64_t>>& loads);
  absl::Status Add(const google::protobuf::RepeatedPtrField<v1::ExpertLoad>& loads);

  const std::vector<std::vector<int64_t>>& layers() const { return layers_; }
  // Writes the sums into `out` (one ExpertLoad per layer).
  void ToProto(google::protobuf::RepeatedPtrField<v1::ExpertLoad>* out) const;
  // Max over layers of the most loaded expert's tokens over the mean; 0
  // when no token was routed.
  double MaxLoadRatio() const;

 private:
  std::vector<std::vector<int64_t>> layers_;
};

}  // namespace muonps

#endif  // MUONPS_STEP_STEP_H_
