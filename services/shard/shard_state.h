// What an optimizer shard holds for one job, independent of transport: whole
// tensors (parameters or buffers, with their Muon / AdamW state), the slot
// gradients of the step in progress, and the version (completed steps). The
// gRPC service wraps it; the arithmetic is the single-process trainer's, so a
// job split over any number of shards ends bit-identical to `muonps train`.
//
// Thread safety: all methods are safe to call concurrently.
#ifndef MUONPS_SERVICES_SHARD_SHARD_STATE_H_
#define MUONPS_SERVICES_SHARD_SHARD_STATE_H_

#include <cstdint>
#include <map>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/model_layout.h"
#include "muonps/v1/job.pb.h"

namespace muonps {

class ShardState {
 public:
  // Takes ownership of the named tensors of the job's model (validated job,
  // defaults filled), initialised from (seed, name). NOT_FOUND for a name the
  // model does not have, INVALID_ARGUMENT for a repeated one.
  static absl::StatusOr<std::unique_ptr<ShardState>> Create(const v1::JobSpec& job,
                                                             const std::vector<std::string>& owned);

  // Completed optimizer steps; gradients are accepted for step == version().
  int64_t version() const;
  bool Owns(const std::string& name) const;
  // A copy of an owned tensor's current values; NOT_FOUND otherwise.
  absl::StatusOr<std::vector<float>> Parameter(const std::string& name) const;

  // Records one slot's gradient of one tensor for `step`. Returns true when
  // counted, false when this (step, slot, tensor) was already counted (the
  // repeat is ignored). Refusals leave the state untouched:
  //   NOT_FOUND           a tensor this shard does not own
  //   FAILED_PRECONDITION a step other than version(), or a buffer tensor
  //   INVALID_ARGUMENT    slot out of range, wrong element count, NaN / Inf
  absl::StatusOr<bool> AddSlotGradient(int64_t step, int slot, const std::string& name,
                                       const float* grad, int64_t numel);
  // Whether every slot of every owned trainable tensor is in.
  bool GradientsComplete() const;

  // For global clipping: (name, sum of squares of the step's gradient) of
  // every owned trainable tensor, in layout order. The gradient is the sum
  // of the slot gradients in slot order. FAILED_PRECONDITION until complete.
  absl::StatusOr<std::vector<std::pair<std::string, double>>> GradientSquares();

  // Applies step `step` (== version()): gradients scaled by clip_coef when it
  // is below 1, the update at learning rate lr, then the aux-free bias rule on
  // owned bias tensors from `loads` (per MoE layer in layer order, summed over
  // all slots). Advances the version and clears the slot gradients.
  absl::Status ApplyStep(int64_t step, double lr, double clip_coef,
                         const std::vector<std::vector<int64_t>>& loads);

 private:
  struct Tensor {
    const TensorInfo* info;
    std::vector<float> value, momentum, exp_avg, exp_avg_sq;
    std::vector<std::vector<float>> slot_grads;  // (slots, numel), empty until received
    std::vector<float> grad;                     // summed, once complete
  };
  ShardState(const v1::JobSpec& job);
  absl::Status SumSlotsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const v1::JobSpec job_;
  const ModelLayout layout_;
  mutable absl::Mutex mu_;
  std::map<std::string, Tensor> tensors_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> order_;  // owned names in layout order
  int64_t version_ ABSL_GUARDED_BY(mu_) = 0;
  bool summed_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace muonps

#endif  // MUONPS_SERVICES_SHARD_SHARD_STATE_H_
