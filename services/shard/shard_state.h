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
#include <functional>
#include <future>
#include <map>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "common/bf16.h"
#include "common/model_layout.h"
#include "muonps/v1/job.pb.h"
#include "optim/orthogonalizer.h"

namespace muonps {

class ShardState {
 public:
  // Takes ownership of the named tensors of the job's model (validated job,
  // defaults filled), initialised from (seed, name). NOT_FOUND for a name the
  // model does not have, INVALID_ARGUMENT for a repeated one.
  // `replicas` are held like owned tensors, but their updates run after
  // ApplyStep returns (ApplyStep).
  static absl::StatusOr<std::unique_ptr<ShardState>> Create(
      const v1::JobSpec& job, const std::vector<std::string>& owned,
      const std::vector<std::string>& replicas = {});
  // Muon's Newton-Schulz runs on `o` (null: the CPU). Set before the first
  // ApplyStep; `o` must outlive the state.
  void set_orthogonalizer(Orthogonalizer* o) { orthogonalizer_ = o; }
  // Called (from the applying threads, with no lock of the caller's held
  // and none of this state's that the callee may take) each time a tensor's
  // new version is published (ServedTensor). Set before the first ApplyStep.
  void set_on_publish(std::function<void()> f) { on_publish_ = std::move(f); }
  // Waits for the replicas' update in flight, if any.
  ~ShardState();
  ShardState(const ShardState&) = delete;
  ShardState& operator=(const ShardState&) = delete;

  // Replaces an owned tensor's values and optimizer state (from a
  // checkpoint); a state vector must be empty or hold numel values, as the
  // optimizer keeps it. Only before the first gradient arrives.
  absl::Status Restore(const std::string& name, std::vector<float> value,
                       std::vector<float> momentum, std::vector<float> exp_avg,
                       std::vector<float> exp_avg_sq);
  void set_version(int64_t version);

  // Completed optimizer steps; gradients are accepted for step == version().
  int64_t version() const;
  bool Owns(const std::string& name) const;
  // Owned tensors in layout order.
  const std::vector<std::string>& owned() const { return order_; }
  // Owned trainable tensors (those that take gradients), in layout order.
  std::vector<const TensorInfo*> Trainable() const;
  const ModelLayout& layout() const { return layout_; }
  const v1::JobSpec& job() const { return job_; }
  // A copy of an owned tensor's current values; NOT_FOUND otherwise.
  absl::StatusOr<std::vector<float>> Parameter(const std::string& name) const;
  using Snapshot = std::shared_ptr<const std::vector<float>>;
  // Calls `visit` on every owned tensor in layout order with its values and
  // optimizer state (empty vectors where the optimizer keeps none); returns
  // the version they belong to.
  int64_t Visit(
      const std::function<void(
          const TensorInfo&, const std::vector<float>& value, const std::vector<float>& momentum,
          const std::vector<float>& exp_avg, const std::vector<float>& exp_avg_sq)>& visit) const;

  // For a pull that streams version `version` tensor by tensor while the
  // step that makes it is applied: the values of held tensor `name` once it
  // has reached that version. Each tensor is published as soon as its update
  // is done (ApplyStep), in layout order as far as the threads allow, so the
  // first layers of a version are served while the last ones are still
  // being updated. Never waits for the step in progress:
  //   a snapshot       the tensor is at `version` (shared, copy on write)
  //   nullopt          not yet (at an earlier version, or being updated)
  //   FAILED_PRECONDITION  the tensor is past `version` (the version is gone)
  //   NOT_FOUND        a tensor this shard does not hold
  absl::StatusOr<std::optional<Snapshot>> ServedTensor(const std::string& name,
                                                       int64_t version) const;
  // The last version every held tensor has been published at (version()
  // without waiting for an ApplyStep in progress).
  int64_t served_version() const;
  // Whether `name` is held (owned or a replica), without waiting for an
  // ApplyStep in progress.
  bool Holds(const std::string& name) const;

  // Every owned tensor's values and optimizer state at one version, shared,
  // not copied: an update while the snapshot is held writes new buffers
  // (copy on write), so a checkpoint is written from it while the next steps
  // run. Taking one costs a few pointer copies under the lock.
  struct StateSnapshot {
    struct Entry {
      const TensorInfo* info = nullptr;
      Snapshot value, momentum, exp_avg, exp_avg_sq;  // never null; empty if not kept
    };
    int64_t version = 0;
    std::vector<Entry> tensors;  // layout order
    // Bytes of values and state together.
    int64_t bytes() const;
  };
  StateSnapshot TakeSnapshot() const;
  // The same for the held tensors among `only` (waiting for the replicas'
  // update only when it names one).
  StateSnapshot TakeSnapshot(const std::set<std::string>& only) const;

  // One gradient of one tensor for `step`: of slot `first_slot` alone
  // (slot_count 1), or the left-to-right float32 sum of slots
  // 0..slot_count-1 (only from slot 0: that sum is exactly the prefix the
  // shard would form).
  struct Gradient {
    std::string name;
    const float* data = nullptr;
    int64_t numel = 0;
    // When set (holding `data`), the shard keeps this buffer instead of a copy.
    std::vector<float>* movable = nullptr;
    // The caller already refused NaN / Inf in `data` (e.g. chunk by chunk as
    // it arrived, while in cache).
    bool finite_checked = false;
    // When set, the caller made every -0 in `data` +0 and this is
    // SumOfSquares(data) (computed as it arrived): a gradient of every slot
    // is then kept as the step's sum itself, with this share of the norm,
    // and nothing is summed again.
    std::optional<double> sum_of_squares = std::nullopt;
  };
  // Records the gradients of slot range [first_slot, first_slot+slot_count)
  // for `step`, all or nothing. Returns true when counted, false when this
  // exact range was already counted for every tensor (the repeat is
  // ignored). Refusals leave the state untouched:
  //   NOT_FOUND           a tensor this shard does not own
  //   FAILED_PRECONDITION a step other than version(), a buffer tensor, or a
  //                       range overlapping a different one already counted
  //   INVALID_ARGUMENT    slot range out of bounds or multi-slot not from 0,
  //                       wrong element count, NaN / Inf, a tensor twice
  //   ABORTED             `generation` (>= 0) is not the current one: the
  //                       push began in an earlier run of the job
  absl::StatusOr<bool> AddGradients(int64_t step, int first_slot, int slot_count,
                                    const std::vector<Gradient>& grads, int64_t generation = -1);
  // One tensor, one slot (AddGradients with a single entry).
  absl::StatusOr<bool> AddSlotGradient(int64_t step, int slot, const std::string& name,
                                       const float* grad, int64_t numel) {
    return AddGradients(step, slot, 1, {Gradient{name, grad, numel}});
  }
  // A buffer of `numel` floats for an incoming gradient (its contents are
  // unspecified): one kept from an earlier step when there is one, so the
  // steady state allocates, zero-fills and page-faults nothing.
  std::vector<float> TakeBuffer(int64_t numel);

  // Begins run `generation` of the job (the shard service numbers each load
  // of a job, a coordinator taking over a job it holds included): the
  // gradients received for the current step are forgotten, since the new
  // run plans its slots afresh (perhaps split otherwise).
  void StartGeneration(int64_t generation);

  // Whether every slot of every owned trainable tensor is in.
  bool GradientsComplete() const;
  // How many slots of `name`'s gradient are summed so far (0 for a tensor
  // this shard does not own). Each push is added to the step's sum as it
  // arrives, as soon as every slot before it is in: the sum keeps slot
  // order, and once the last slot is in the tensor's sum of squares is known.
  int SummedSlots(const std::string& name) const;

  // For global clipping: (name, sum of squares of the step's gradient) of
  // every owned trainable tensor, in layout order. The gradient is the sum
  // of the slot gradients in slot order. FAILED_PRECONDITION until complete.
  absl::StatusOr<std::vector<std::pair<std::string, double>>> GradientSquares();

  // Applies step `step` (== version()): gradients scaled by clip_coef when it
  // is below 1, the update at learning rate lr, then the aux-free bias rule on
  // owned bias tensors from `loads` (per MoE layer in layer order, summed over
  // all slots). Advances the version and clears the slot gradients.
  // When `stats` is given, it receives what the update did.
  struct ApplyStats {
    double muon_seconds = 0.0, adamw_seconds = 0.0;      // summed over tensors (thread time)
    double muon_update_sq = 0.0, adamw_update_sq = 0.0;  // sum of (new - old)^2
    int64_t muon_numel = 0, adamw_numel = 0;
    std::vector<std::pair<bool, double>> tensor_seconds;  // (uses Muon, seconds) per tensor
  };
  // Applies the step: clipping by clip_coef (when ClipApplies), the Muon or
  // AdamW update at lr, and the router-bias update by `loads` (empty: none).
  // InvalidArgument, with nothing changed, for loads of another shape than
  // the model's MoE layers x experts (step/step.h, ExpertLoads).
  // The replicas' updates run on a thread of their own after it returns,
  // off the step's critical path (nobody pulls a replica): every method
  // that reads a replica's values or state, or the next step's gradients,
  // waits for them first. `stats` covers the owned tensors.
  // `logits` (layer-major maxima over the step's slots, see AttentionLogits)
  // drive QK-Clip when the job's optimizer.qk_clip_tau > 0: required then,
  // refused with the model's shape otherwise.
  absl::Status ApplyStep(int64_t step, double lr, double clip_coef,
                         const std::vector<std::vector<int64_t>>& loads,
                         ApplyStats* stats = nullptr,
                         const google::protobuf::RepeatedField<float>* logits = nullptr);

 private:
  struct Tensor {
    const TensorInfo* info;
    // Shared with pulls and snapshots in flight (copy on write); never null.
    std::shared_ptr<std::vector<float>> value, momentum, exp_avg, exp_avg_sq;
    // Received gradients by first slot: a single slot, or the prefix sum of
    // slots [0, count) at key 0. `covered_by[s]` = key covering slot s, -1 none.
    std::map<int, std::pair<int, std::vector<float>>> received;
    std::vector<int> covered_by;
    std::vector<float> grad;  // the sum of slots [0, summed), in slot order
    int summed = 0;           // slots added to `grad` (Fold)
    // SumOfSquares of the received gradient of every slot, when its pusher
    // gave it (Gradient::sum_of_squares).
    std::optional<double> whole_sq;
    double grad_sq = 0.0;  // SumOfSquares(grad), once every slot is summed
    bool replica = false;  // held as a copy of another shard's tensor
  };
  // Waits for the replicas' update of the last step, if still running.
  void AwaitReplicasLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether any of `names` is a replica.
  bool AnyReplicaLocked(const std::vector<std::string>& names) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  ShardState(const v1::JobSpec& job);
  absl::Status SumSlotsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Adds to t.grad every received range that continues its summed prefix;
  // with the last slot, sets t.grad_sq. Touches only `t` (callers hold mu_).
  static void Fold(Tensor& t, TransferDtype dtype);
  // Serving: `name` is about to be updated (no pull takes its values until
  // Publish), and its values at `version` are ready.
  void Unpublish(const std::string& name);
  void Publish(const std::string& name, int64_t version, Snapshot value);
  void ClearGradientsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const v1::JobSpec job_;
  const ModelLayout layout_;
  Orthogonalizer* orthogonalizer_ = nullptr;
  mutable absl::Mutex mu_;
  std::map<std::string, Tensor> tensors_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> order_;  // owned names in layout order
  int64_t version_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t generation_ ABSL_GUARDED_BY(mu_) = 0;  // StartGeneration
  // Gradient buffers of applied steps, by size, for TakeBuffer.
  std::map<int64_t, std::vector<std::vector<float>>> spare_ ABSL_GUARDED_BY(mu_);
  bool summed_ ABSL_GUARDED_BY(mu_) = false;
  // The replicas' update of the last step (ApplyStep); it touches only
  // their values, state and summed gradients, which nothing else reads or
  // writes until it is done.
  std::shared_future<void> replicas_pending_ ABSL_GUARDED_BY(mu_);

  // What pulls read, apart from everything else: each held tensor's last
  // published version and values (null while it is being updated). Written
  // under mu_ as well by ApplyStep, Restore and set_version, or by the
  // replicas' thread for its own tensors; read under serve_mu_ alone.
  struct Served {
    int64_t version = 0;
    Snapshot value;
  };
  mutable absl::Mutex serve_mu_ ABSL_ACQUIRED_AFTER(mu_);
  std::map<std::string, Served> served_ ABSL_GUARDED_BY(serve_mu_);
  int64_t served_version_ ABSL_GUARDED_BY(serve_mu_) = 0;
  std::function<void()> on_publish_;
};

}  // namespace muonps

#endif  // MUONPS_SERVICES_SHARD_SHARD_STATE_H_
