// Coordinator::JobRun, continued: the loop over the stages of job_run.cc,
// and recovery without a person. A shard found lost (a call failing as a
// dead or restarted process does, or its lease lapsing) sends the run back
// to placement on the live shards, every tensor loaded from the job's last
// checkpoint; a coordinator restarted on its job store first asks the
// shards that held the job to keep their state (LoadJob without reload), and
// continues from their step when they all hold the same one.
#include <algorithm>
#include <map>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoint/checkpoint.h"
#include "common/status_macros.h"
#include "rpc/rpc_util.h"
#include "services/coordinator/job_run.h"

namespace muonps {

absl::Status Coordinator::JobRun::ShardStatus(const grpc::Status& status, int i, const char* rpc) {
  switch (status.error_code()) {
    case grpc::StatusCode::UNAVAILABLE:        // gone, or restarted and not registered yet
    case grpc::StatusCode::DEADLINE_EXCEEDED:  // hung
    case grpc::StatusCode::UNAUTHENTICATED:    // restarted: registered with a new secret
    case grpc::StatusCode::NOT_FOUND:          // restarted: no longer holds the job
    case grpc::StatusCode::ABORTED:
      shard_lost_ = true;
      break;
    default:
      return FromGrpcStatus(status, ShardCall(i, rpc));
  }
  {
    absl::MutexLock lock(&lost_mu_);
    lost_ids_.emplace(shards_[i].id, absl::Now());
  }
  return FromGrpcStatus(status, ShardCall(i, rpc));
}

bool Coordinator::JobRun::ShardLost(const absl::Status& st) const {
  return !st.ok() && !absl::IsCancelled(st) && shard_lost_;
}

bool Coordinator::JobRun::ShuttingDown() const {
  absl::MutexLock lock(&c_->mu_);
  return c_->shutdown_;
}

void Coordinator::JobRun::Interrupted() {
  // With a job store the job stays RUNNING there, and the shards keep its
  // state: the next coordinator continues it. Without, it ends here.
  if (c_->options_.store != nullptr) {
    c_->Log(absl::StrCat(job_id_, " interrupted by the shutdown; the next coordinator on ",
                         c_->options_.store->path(), " continues it"));
    return;
  }
  Finish(v1::JOB_STATE_FAILED, "coordinator shut down");
}

std::string Coordinator::JobRun::Leaving() const {
  absl::MutexLock lock(&c_->mu_);
  for (const Member& s : shards_) {
    auto it = c_->members_.find(s.id);
    if (it != c_->members_.end() && it->second.draining) {
      return absl::StrCat("shard ", s.id, " (", s.address, ")");
    }
  }
  return "";
}

void Coordinator::JobRun::DropLeaving() {
  std::vector<bool> leaving(shards_.size(), false);
  {
    absl::MutexLock lock(&c_->mu_);
    for (size_t i = 0; i < shards_.size(); ++i) {
      auto it = c_->members_.find(shards_[i].id);
      leaving[i] = it != c_->members_.end() && it->second.draining;
    }
  }
  for (size_t i = 0; i < shards_.size() && i < stubs_.size(); ++i) {
    if (leaving[i]) DropOn(static_cast<int>(i));
  }
}

bool Coordinator::JobRun::AwaitShards() {
  absl::MutexLock lock(&c_->mu_);
  c_->step_.reset();  // the step in flight is planned again
  const int need = std::max(1, c_->options_.min_shards);
  // A shard that failed is left out until it heartbeats again (a passing
  // fault); a dead one never does: its lease expires, and its restarted
  // process registers anew.
  std::map<std::string, absl::Time> lost;
  {
    absl::MutexLock lost_lock(&lost_mu_);
    lost.swap(lost_ids_);
  }
  std::vector<const Member*> usable;
  auto ready = [&]() ABSL_SHARED_LOCKS_REQUIRED(c_->mu_) {
    usable.clear();
    for (const Member* m : c_->PlaceableShardsLocked()) {
      auto it = lost.find(m->id);
      if (it == lost.end() || m->last_seen > it->second) usable.push_back(m);
    }
    return c_->shutdown_ || c_->jobs_.at(job_id_).cancel_requested ||
           static_cast<int>(usable.size()) >= need;
  };
  while (!ready()) c_->mu_.AwaitWithTimeout(absl::Condition(&ready), absl::Milliseconds(200));
  if (c_->shutdown_ || c_->jobs_.at(job_id_).cancel_requested) return false;
  shards_.clear();
  for (const Member* m : usable) shards_.push_back(*m);
  stubs_.clear();
  routes_.clear();
  job_key_ = RandomHex(16);
  const JobRecord& record = c_->jobs_.at(job_id_);
  resume_ = record.job.last_checkpoint().empty() ? record.job.resume_from()
                                                 : record.job.last_checkpoint();
  shard_lost_ = false;
  return true;
}

absl::StatusOr<int64_t> Coordinator::JobRun::SaveFromSurvivors() {
  absl::Status last;
  for (int attempt = 0; attempt < 3; ++attempt) {
    std::vector<bool> alive(static_cast<size_t>(n_), false);
    {
      absl::MutexLock lock(&c_->mu_);
      absl::MutexLock lost(&lost_mu_);
      for (int i = 0; i < n_; ++i) {
        alive[i] = lost_ids_.count(shards_[i].id) == 0 && c_->members_.count(shards_[i].id) != 0;
      }
    }
    CheckpointParts parts;
    std::vector<int> part_of(static_cast<size_t>(n_), -1);
    for (const TensorInfo& t : layout_->tensors()) {
      int from = -1;
      for (int h : placement_.holders.at(t.name)) {
        if (alive[h]) {
          from = h;
          break;
        }
      }
      if (from < 0) {
        return absl::FailedPreconditionError(
            absl::StrCat("every copy of ", t.name, " was on a lost shard"));
      }
      if (part_of[from] < 0) {
        part_of[from] = static_cast<int>(parts.shards.size());
        parts.shards.push_back(from);
        parts.tensors.emplace_back();
      }
      parts.tensors[part_of[from]].push_back(t.name);
      parts.owner[t.name] = part_of[from];
    }
    const int64_t version = at_version_[parts.shards[0]];
    for (int i : parts.shards) {
      if (at_version_[i] != version) {
        return absl::FailedPreconditionError(absl::StrCat("the survivors hold different steps (",
                                                          version, " and ", at_version_[i], ")"));
      }
    }
    {
      // Nothing to write when the last checkpoint already holds this step.
      absl::MutexLock lock(&c_->mu_);
      const std::string& last_checkpoint = c_->jobs_.at(job_id_).job.last_checkpoint();
      if (!last_checkpoint.empty() &&
          last_checkpoint == absl::StrCat(spec_.checkpoint().dir(), "/", CheckpointName(version))) {
        return version;
      }
    }
    last = Checkpoint(version, /*background=*/false, std::move(parts));
    if (last.ok()) return version;
    if (!ShardLost(last)) return last;
  }
  return last;
}

void Coordinator::JobRun::Recovered(const std::string& role, const std::string& why,
                                    int64_t lost_step, absl::Time lost_at) {
  const int64_t lost = std::max<int64_t>(0, lost_step - start_step_);
  const double seconds = absl::ToDoubleSeconds(absl::Now() - lost_at);
  const std::string how = absl::StrCat(why, "; recovered in ", absl::StrFormat("%.1f", seconds),
                                       " s on ", n_, " shard(s), continuing from step ",
                                       start_step_, ", ", lost, " step(s) to compute again");
  {
    absl::MutexLock lock(&c_->mu_);
    JobRecord& record = c_->jobs_.at(job_id_);
    record.job.set_recoveries(record.job.recoveries() + 1);
    record.job.set_steps_lost(record.job.steps_lost() + lost);
    record.job.set_last_recovery(how);
    record.job.set_last_recovery_seconds(seconds);
    c_->EmitLocked(record, v1::JOB_EVENT_KIND_RECOVERY);
  }
  Metrics& m = c_->metrics_;
  m.recoveries.Add({{"role", role}}).Increment();
  m.steps_lost.Increment(static_cast<double>(lost));
  m.recovery_seconds.Observe(seconds);
  c_->Log(absl::StrCat(job_id_, " recovered (", role, "): ", how));
}

absl::Status Coordinator::JobRun::Steps(int64_t* reached) {
  absl::Status st = RunSteps(reached);
  // The placement changes only after the checkpoint in the background is done.
  absl::Status written = AwaitCheckpoint();
  if (st.ok() && !written.ok()) {
    return absl::Status(written.code(), absl::StrCat("checkpoint: ", written.message()));
  }
  return st;
}

absl::Status Coordinator::JobRun::RunSteps(int64_t* reached) {
  *reached = start_step_;
  // Whether this step's tasks went out before the last apply (plan_ahead),
  // and when that apply returned: the step's time starts there.
  bool planned = false;
  absl::Time last_applied;
  for (int64_t step = start_step_; step < total_; ++step) {
    const absl::Time step_start = planned ? last_applied : absl::Now();
    // 2. Slot gradients.
    absl::StatusOr<SlotSums> sums = CollectSlots(step, planned);
    if (!sums.ok()) return sums.status();
    // 3. Global quantities, in the trainer's order.
    const absl::Time reported = absl::Now();
    absl::StatusOr<double> norm = GlobalNorm(step);
    if (!norm.ok()) return norm.status();
    const double coef = ClipCoefficient(spec_.optimizer().max_grad_norm(), *norm);
    const double lr = StepLearningRate(spec_, step);
    {
      absl::MutexLock lock(&c_->mu_);
      if (c_->jobs_.at(job_id_).cancel_requested) return absl::CancelledError("cancelled");
    }
    const int64_t done = step + 1;
    const int eval_every = spec_.data().eval_every();
    const bool eval_due = (eval_every > 0 && done % eval_every == 0) || done == total_;
    // The next step's tasks go out now when nothing comes in between: the
    // workers' pulls of version `done` then stream each tensor as its
    // update ends. A stop before that step (an error, a cancel, a shard
    // lost) drops them with the step; their pushes are never applied.
    planned = c_->options_.plan_ahead && done < total_ && !eval_due && Leaving().empty();
    if (planned) {
      absl::MutexLock lock(&c_->mu_);
      Plan(done, false, slots_);
    }
    // A failed apply may have updated some shards: the job cannot go on
    // from them (a recovery loads every shard again).
    MUONPS_RETURN_IF_ERROR(Apply(step, lr, coef, *sums));
    *reached = done;
    const absl::Time applied = absl::Now();
    last_applied = applied;
    // 4. Validation.
    if (eval_due) MUONPS_RETURN_IF_ERROR(Evaluate(done));
    Publish(done, step_start, reported, applied, sums->loss, *norm, lr, *sums);
    const int every = spec_.checkpoint().every_steps();
    const bool due = every > 0 && done % every == 0 && done < total_;
    const std::string leaving = done < total_ ? Leaving() : std::string();
    // A shard that is leaving hands its tensors over through a checkpoint
    // of this step: nothing is computed again.
    if (due || (!leaving.empty() && !spec_.checkpoint().dir().empty())) {
      const bool background = leaving.empty() && spec_.checkpoint().background();
      if (absl::Status st = Checkpoint(done, background); !st.ok()) {
        return absl::Status(st.code(), absl::StrCat("checkpoint: ", st.message()));
      }
    }
    if (!leaving.empty()) {
      shard_lost_ = true;
      return absl::UnavailableError(absl::StrCat(leaving, " is leaving"));
    }
  }
  if (total_ > start_step_) {
    if (absl::Status st = Checkpoint(total_); !st.ok()) {
      return absl::Status(st.code(), absl::StrCat("checkpoint: ", st.message()));
    }
  }
  return absl::OkStatus();
}

void Coordinator::JobRun::Run() {
  if (!Prepare()) return;
  // What is being recovered from, if anything.
  std::string role, why;
  absl::Time lost_at = c_->started_;
  int64_t lost_step = 0;
  if (interrupted_) {
    role = "coordinator";
    why = "the coordinator restarted";
    absl::MutexLock lock(&c_->mu_);
    lost_step = c_->jobs_.at(job_id_).job.progress().step();
  }
  bool adopt = interrupted_;
  int attempts = 0;
  while (true) {
    Place();
    // 1. Load the tensors on the shards.
    absl::Status st = Load(adopt);
    int64_t reached = lost_step;
    // Whether the shards held the job's state when it was lost.
    const bool started = st.ok();
    if (st.ok()) {
      if (!role.empty()) Recovered(role, why, lost_step, lost_at);
      Started();
      st = Steps(&reached);
      if (st.ok()) return Finish(v1::JOB_STATE_SUCCEEDED, "");
      if (ShuttingDown()) return Interrupted();
      if (!ShardLost(st)) return Stop(st, reached);
      if (reached > start_step_) attempts = 0;
    } else if (ShuttingDown()) {
      return Interrupted();
    } else if (!ShardLost(st)) {
      return Finish(v1::JOB_STATE_FAILED, std::string(st.message()));
    }
    // A shard went away: place the job on the live shards again.
    if (++attempts > c_->options_.max_recoveries_without_progress) {
      return Finish(v1::JOB_STATE_FAILED,
                    absl::StrCat("gave up after ", attempts - 1,
                                 " recoveries without a completed step: ", st.message()));
    }
    role = "shard";
    why = std::string(st.message());
    lost_at = absl::Now();
    lost_step = std::max(lost_step, reached);
    c_->Log(absl::StrCat(job_id_, ": ", why, "; recovering"));
    if (spec_.recovery().replicas() > 1 && started) {
      // The survivors' copies hold every tensor of the step they reached:
      // the job continues from there, through a checkpoint of it.
      absl::StatusOr<int64_t> saved = SaveFromSurvivors();
      if (saved.ok()) {
        lost_step = std::max(lost_step, *saved);
        absl::StrAppend(&why, "; the surviving copies hold step ", *saved);
      } else {
        absl::StrAppend(&why, "; no recovery from the copies (", saved.status().message(), ")");
      }
      c_->Log(absl::StrCat(job_id_, ": ", why));
    }
    DropLeaving();
    if (!AwaitShards()) {
      if (ShuttingDown()) return Interrupted();
      return Stop(absl::CancelledError("cancelled"), start_step_);
    }
    adopt = false;
    // Not a busy loop when shards fail again at once.
    absl::SleepFor(absl::Milliseconds(100) * std::min(attempts, 10));
  }
}

}  // namespace muonps
