// Coordinator::JobRun: one job from placement to its end (the step described
// in coordinator.h). Its stages are in job_run.cc; recovering from a lost
// shard or a restarted coordinator, and the loop that ties the stages
// together, in job_recovery.cc. Private to the coordinator's sources.
#ifndef MUONPS_SERVICES_COORDINATOR_JOB_RUN_H_
#define MUONPS_SERVICES_COORDINATOR_JOB_RUN_H_

#include <atomic>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "common/model_layout.h"
#include "rpc/auth.h"
#include "rpc/rpc_util.h"
#include "services/coordinator/coordinator.h"
#include "services/coordinator/placement.h"
#include "step/step.h"

namespace muonps {

// Runs fn(i) for i in [0, n) on n threads; the first error by index wins.
absl::Status ForEachShard(int n, const std::function<absl::Status(int)>& fn);

class Coordinator::JobRun {
 public:
  JobRun(Coordinator* c, std::string job_id) : c_(c), job_id_(std::move(job_id)) {}
  ~JobRun() { AwaitCheckpoint().IgnoreError(); }
  JobRun(const JobRun&) = delete;
  JobRun& operator=(const JobRun&) = delete;

  // Runs the job to its end, or puts it back at the head of the queue when a
  // shard left between dequeuing and placement. A lost shard (or a restarted
  // coordinator) is recovered from without a person: the tensors are placed
  // on the live shards again and loaded from the last checkpoint, or kept
  // where every shard still holds the same step.
  void Run();

 private:
  // What the slots of one step add up to.
  struct SlotSums {
    double loss = 0.0;
    std::unique_ptr<ExpertLoads> loads;
    std::unique_ptr<AttentionLogits> logits;  // max over the slots (QK-Clip)
    int workers_used = 0;
  };

  // Snapshot of the job and the live shards; false when too few shards.
  bool Prepare();
  // Places the tensors and connects to the shards.
  void Place();
  // Runs steps start_step_.. to the end (the final checkpoint included);
  // `reached` is the last step whose update every shard applied.
  absl::Status Steps(int64_t* reached);
  absl::Status RunSteps(int64_t* reached);
  // After a loss: waits for enough live shards (false when the job was
  // cancelled or the coordinator shuts down meanwhile), then takes them as
  // the job's shards with a new job key, to be placed and loaded again.
  bool AwaitShards();
  // Whether `st` stopped the run because a shard went away (its lease
  // expired, or a call to it failed as a lost or restarted process does).
  bool ShardLost(const absl::Status& st) const;
  // A shard call's status; marks the shard lost for the codes a lost or
  // restarted shard answers with.
  absl::Status ShardStatus(const grpc::Status& status, int i, const char* rpc);
  bool ShuttingDown() const;
  // Leaves the job to the next coordinator when there is a job store (the
  // shards keep its state), else ends it as failed.
  void Interrupted();
  // The first of the job's shards that is leaving (draining), described;
  // empty when none.
  std::string Leaving() const;
  // Drops the job on the shards that are leaving: their tensors are in the
  // checkpoint the others load.
  void DropLeaving();
  // Records a recovery: event, job fields, metrics, log.
  void Recovered(const std::string& role, const std::string& why, int64_t lost_step,
                 absl::Time lost_at);
  std::string ShardCall(int i, const char* rpc) const {
    return absl::StrCat("shard ", shards_[i].id, " (", shards_[i].address, "): ", rpc);
  }
  // A call to shard i: its deadline, and the shard's member secret, without
  // which it accepts no call from the coordinator.
  void SetUp(grpc::ClientContext* context, int i) const {
    context->set_deadline(DeadlineIn(c_->options_.shard_rpc_seconds));
    context->AddMetadata(kMemberSecretHeader, shards_[i].secret);
  }
  // Drops the job on shard i (best effort, 10 s deadline).
  void DropOn(int i);
  void DropAll();
  // Ends the job: drops it on the shards, frees the members, sets `state`.
  void Finish(v1::JobState state, const std::string& error);
  // Loads the tensors (from the checkpoint when resuming); sets start_step_.
  // With `adopt`, shards that still hold the job keep their state; if they
  // do not all hold the same step, their state is refused and every shard
  // loads afresh.
  absl::Status Load(bool adopt);
  // Marks the job running, with its placement and numerics.
  void Started();
  // Waits until `done` holds, the job is cancelled (when `cancellable`), a
  // task failed, a shard lost its lease, or the coordinator shuts down.
  // Returns the reason to stop, or OK.
  absl::Status WaitFor(const std::function<bool()>& done, bool cancellable = true);
  // Plans `count_hint` tasks (at most one per live worker, at least one).
  void Plan(int64_t version, bool eval, int count_hint) ABSL_EXCLUSIVE_LOCKS_REQUIRED(c_->mu_);
  // 2. Every slot of step `step`, reported, summed in slot order; its tasks
  // are planned first unless `planned` (already handed out).
  absl::StatusOr<SlotSums> CollectSlots(int64_t step, bool planned = false);
  // 3. The global gradient norm: per-tensor sums of squares in layout order.
  absl::StatusOr<double> GlobalNorm(int64_t step);
  absl::Status Apply(int64_t step, double lr, double coef, const SlotSums& sums);
  // 4. The validation loss after step `done`.
  absl::Status Evaluate(int64_t done);
  // Progress, events and metrics of a completed step.
  void Publish(int64_t done, absl::Time step_start, absl::Time reported, absl::Time applied,
               double loss, double norm, double lr, const SlotSums& sums);
  // Writes and publishes the checkpoint of step `version` (after waiting for
  // the one in the background, if any). With `background`, returns once every
  // shard holds a snapshot of `version`; the parts are written while the next
  // steps run, and the directory published when all are durable
  // (AwaitCheckpoint).
  absl::Status Checkpoint(int64_t version, bool background = false);
  // Who writes which part of a checkpoint: part k by shard `shards[k]`, the
  // tensors `tensors[k]` (empty: the ones it owns); `owner` maps each tensor
  // to its part.
  struct CheckpointParts {
    std::vector<int> shards;
    std::vector<std::vector<std::string>> tensors;
    std::map<std::string, int> owner;
  };
  absl::Status Checkpoint(int64_t version, bool background, CheckpointParts parts);
  // After a shard loss, with recovery.replicas > 1: the shards still alive
  // write a checkpoint of the step they hold, each tensor from one of its
  // surviving copies, so the recovery loses no step. Returns that step; an
  // error when some tensor lost every copy, the survivors hold different
  // steps, or the write failed (a survivor lost meanwhile: tried again
  // without it, twice).
  absl::StatusOr<int64_t> SaveFromSurvivors();
  // Waits for the checkpoint written in the background, if any: its outcome.
  absl::Status AwaitCheckpoint();
  // Ends the job after a stop at `version`: a checkpoint first when cancelled
  // after steps were run.
  void Stop(const absl::Status& why, int64_t version);

  Coordinator* const c_;
  const std::string job_id_;
  v1::JobSpec spec_;
  std::string resume_;
  std::string owner_;  // the user the job runs for
  // Given to the shards and the workers of this run only: pushes and pulls
  // carry it. A new one after each recovery, so no push of a task planned
  // before it is accepted.
  std::string job_key_ = RandomHex(16);
  // The job was running when the coordinator stopped (JobRecord).
  bool interrupted_ = false;
  // Set by ShardStatus and WaitFor; cleared when a recovery begins.
  std::atomic<bool> shard_lost_{false};
  // The shards found lost since the last recovery (ShardStatus runs on the
  // ForEachShard threads).
  absl::Mutex lost_mu_ ABSL_ACQUIRED_AFTER(c_->mu_);
  // Member id -> when it was found lost.
  std::map<std::string, absl::Time> lost_ids_ ABSL_GUARDED_BY(lost_mu_);
  bool started_once_ = false;
  std::vector<Member> shards_;
  std::unique_ptr<ModelLayout> layout_;
  int n_ = 0;
  Placement placement_;
  std::vector<std::unique_ptr<v1::ShardService::Stub>> stubs_;
  std::vector<v1::ShardRoute> routes_;
  // The version each shard is known to hold: loaded, then advanced by each
  // ApplyStep it answered (a shard lost inside an apply leaves the others
  // one step ahead of `reached`).
  std::vector<int64_t> at_version_;
  v1::NumericsProfile checkpoint_numerics_;
  int64_t start_step_ = 0, total_ = 0, global_tokens_ = 0;
  int slots_ = 0;
  absl::Time started_;
  std::optional<double> last_val_;
  int64_t val_step_ = 0;
  // Publishes the checkpoint written in the background; reads the placement,
  // which stays as it is until it is joined (AwaitCheckpoint).
  std::thread checkpoint_thread_;
  absl::Status checkpoint_status_;  // its outcome, read after the join
};

}  // namespace muonps

#endif  // MUONPS_SERVICES_COORDINATOR_JOB_RUN_H_
