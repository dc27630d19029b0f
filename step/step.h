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
#include "common/model_layout.h"
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

// QK-Clip (Kimi K2's MuonClip): the largest pre-softmax attention logit
// S_max = max q.k / sqrt(Dqk) of every layer and head over a step's slots,
// and the rescaling of the query and key weights of each head whose S_max
// exceeds optimizer.qk_clip_tau, applied after the optimizer update.
//
// Shaped by the model: num_hidden_layers x num_attention_heads maxima,
// carried flat and layer-major on the wire. The maximum is exact and does
// not depend on the order slots arrive in.
class AttentionLogits {
 public:
  explicit AttentionLogits(const v1::ModelConfig& model);

  // Takes the elementwise maximum with one slot's maxima (or a maximum over
  // slots): `per_layer` has a vector of heads per layer; `flat` is
  // layer-major. InvalidArgument naming the mismatch, with nothing changed,
  // for another shape or a non-finite value.
  absl::Status Add(const std::vector<std::vector<float>>& per_layer);
  absl::Status Add(const google::protobuf::RepeatedField<float>& flat);

  // Whether any slot has been added.
  bool empty() const { return empty_; }
  int layers() const { return layers_; }
  int heads() const { return heads_; }
  // S_max of layer l, head h (-inf before any Add).
  float max(int l, int h) const { return max_[static_cast<size_t>(l) * heads_ + h]; }
  // The largest S_max of layer l over its heads.
  float LayerMax(int l) const;
  // Heads of layer l with S_max > tau.
  int ClippedHeads(int l, double tau) const;
  void ToProto(google::protobuf::RepeatedField<float>* flat) const;

 private:
  int layers_ = 0, heads_ = 0;
  bool empty_ = true;
  std::vector<float> max_;
};

// gamma = min(1, tau / s_max): the factor by which the clip scales the
// head's logits; 1 when tau is 0 (off) or s_max <= tau.
double QkClipGamma(double tau, double s_max);

// Whether `tensor` holds query or key weights QK-Clip rescales: q_proj and
// k_proj under MHA; q_proj or q_b_proj and kv_b_proj under MLA.
bool QkClipTouches(const TensorInfo& tensor, const v1::ModelConfig& model);

// Rescales the rows of `value` (the tensor's values) that belong to heads
// with gamma < 1, by the factors of Kimi K2's MuonClip: under MHA the head's
// rows of W_q and W_k by sqrt(gamma) each; under MLA the head's q^C rows
// (nope) and k^C rows of kv_b_proj by sqrt(gamma), its q^R rows (rope) by
// gamma, its value rows and the shared k^R (kv_a_proj_with_mqa) not at all.
// Factors are computed in double and applied as float multiplications.
// Returns the number of heads rescaled in this tensor.
int ApplyQkClip(const TensorInfo& tensor, const v1::ModelConfig& model, double tau,
                const AttentionLogits& logits, float* value);

}  // namespace muonps

#endif  // MUONPS_STEP_STEP_H_
