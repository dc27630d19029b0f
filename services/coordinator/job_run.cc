// Coordinator::JobRun: one job from placement to its end (see the step
// described in coordinator.h). Each method is one stage of the run; the
// quantities of the step itself come from step/step.h.
#include <algorithm>
#include <cmath>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "checkpoint/checkpoint.h"
#include "common/model_layout.h"
#include "common/numerics.h"
#include "common/status_macros.h"
#include "rpc/auth.h"
#include "rpc/rpc_util.h"
#include "services/coordinator/coordinator.h"
#include "services/coordinator/placement.h"
#include "step/step.h"

namespace muonps {
namespace {

// Runs fn(i) for i in [0, n) on n threads; the first error by index wins.
absl::Status ForEachShard(int n, const std::function<absl::Status(int)>& fn) {
  std::vector<absl::Status> status(static_cast<size_t>(n));
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) threads.emplace_back([&, i] { status[i] = fn(i); });
  for (std::thread& t : threads) t.join();
  for (const absl::Status& st : status) {
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

}  // namespace

class Coordinator::JobRun {
 public:
  JobRun(Coordinator* c, std::string job_id) : c_(c), job_id_(std::move(job_id)) {}

  // Runs the job to its end, or puts it back at the head of the queue when a
  // shard left between dequeuing and placement.
  void Run();

 private:
  // What the slots of one step add up to.
  struct SlotSums {
    double loss = 0.0;
    std::unique_ptr<ExpertLoads> loads;
    int workers_used = 0;
  };

  // Snapshot of the job and the live shards; false when too few shards.
  bool Prepare();
  // Places the tensors and connects to the shards.
  void Place();
  std::string ShardCall(int i, const char* rpc) const {
    return absl::StrCat("shard ", shards_[i].id, " (", shards_[i].address, "): ", rpc);
  }
  // A call to shard i: its deadline, and the shard's member secret, without
  // which it accepts no call from the coordinator.
  void SetUp(grpc::ClientContext* context, int i) const {
    context->set_deadline(DeadlineIn(c_->options_.shard_rpc_seconds));
    context->AddMetadata(kMemberSecretHeader, shards_[i].secret);
  }
  void DropAll();
  // Ends the job: drops it on the shards, frees the members, sets `state`.
  void Finish(v1::JobState state, const std::string& error);
  // Loads the tensors (from the checkpoint when resuming); sets start_step_.
  absl::Status Load();
  // Marks the job running, with its placement and numerics.
  void Started();
  // Waits until `done` holds, the job is cancelled (when `cancellable`), a
  // task failed, a shard lost its lease, or the coordinator shuts down.
  // Returns the reason to stop, or OK.
  absl::Status WaitFor(const std::function<bool()>& done, bool cancellable = true);
  // Plans `count_hint` tasks (at most one per live worker, at least one).
  void Plan(int64_t version, bool eval, int count_hint) ABSL_EXCLUSIVE_LOCKS_REQUIRED(c_->mu_);
  // 2. Every slot of step `step`, reported, summed in slot order.
  absl::StatusOr<SlotSums> CollectSlots(int64_t step);
  // 3. The global gradient norm: per-tensor sums of squares in layout order.
  absl::StatusOr<double> GlobalNorm(int64_t step);
  absl::Status Apply(int64_t step, double lr, double coef, const ExpertLoads& loads);
  // 4. The validation loss after step `done`.
  absl::Status Evaluate(int64_t done);
  // Progress, events and metrics of a completed step.
  void Publish(int64_t done, absl::Time step_start, absl::Time reported, absl::Time applied,
               double loss, double norm, double lr, const SlotSums& sums);
  absl::Status Checkpoint(int64_t version);
  // Ends the job after a stop at `version`: a checkpoint first when cancelled
  // after steps were run.
  void Stop(const absl::Status& why, int64_t version);

  Coordinator* const c_;
  const std::string job_id_;
  v1::JobSpec spec_;
  std::string resume_;
  std::string owner_;  // the user the job runs for
  // Given to the shards and the workers of this run only: pushes and pulls
  // carry it.
  const std::string job_key_ = RandomHex(16);
  std::vector<Member> shards_;
  std::unique_ptr<ModelLayout> layout_;
  int n_ = 0;
  Placement placement_;
  std::vector<std::unique_ptr<v1::ShardService::Stub>> stubs_;
  std::vector<v1::ShardRoute> routes_;
  v1::NumericsProfile checkpoint_numerics_;
  int64_t start_step_ = 0, total_ = 0, global_tokens_ = 0;
  int slots_ = 0;
  absl::Time started_;
  std::optional<double> last_val_;
  int64_t val_step_ = 0;
};

void Coordinator::RunJob(const std::string& job_id) { JobRun(this, job_id).Run(); }

bool Coordinator::JobRun::Prepare() {
  absl::MutexLock lock(&c_->mu_);
  const JobRecord& record = c_->jobs_.at(job_id_);
  spec_ = record.job.spec();
  resume_ = record.job.resume_from();
  owner_ = record.job.owner();
  for (const Member* m : c_->LiveLocked(true)) shards_.push_back(*m);
  if (static_cast<int>(shards_.size()) < std::max(1, c_->options_.min_shards)) {
    c_->queue_.push_front(job_id_);  // a shard left meanwhile: wait for it again
    return false;
  }
  return true;
}

void Coordinator::JobRun::Place() {
  layout_ = std::make_unique<ModelLayout>(spec_.model());
  n_ = static_cast<int>(shards_.size());
  placement_ = PlaceTensors(*layout_, spec_.optimizer(), n_);
  for (int i = 0; i < n_; ++i) {
    placement_.shards[i].set_shard_id(shards_[i].id);
    placement_.shards[i].set_address(shards_[i].address);
    stubs_.push_back(v1::ShardService::NewStub(MakeChannel(shards_[i].address)));
    v1::ShardRoute route;
    route.set_shard_id(shards_[i].id);
    route.set_address(shards_[i].address);
    *route.mutable_tensors() = placement_.shards[i].tensors();
    routes_.push_back(std::move(route));
  }
  total_ = spec_.schedule().total_steps();
  slots_ = spec_.batch().slots();
  global_tokens_ = StepScalesOf(spec_).global_tokens;
}

void Coordinator::JobRun::DropAll() {
  (void)ForEachShard(n_, [&](int i) {
    grpc::ClientContext context;
    context.set_deadline(DeadlineIn(10.0));
    context.AddMetadata(kMemberSecretHeader, shards_[i].secret);
    v1::DropJobRequest request;
    request.set_job_id(job_id_);
    v1::DropJobResponse response;
    (void)stubs_[i]->DropJob(&context, request, &response);
    return absl::OkStatus();
  });
}

void Coordinator::JobRun::Finish(v1::JobState state, const std::string& error) {
  DropAll();
  absl::MutexLock lock(&c_->mu_);
  c_->step_.reset();
  for (auto& [id, m] : c_->members_) {
    if (m.job_id == job_id_) m.job_id.clear();
  }
  JobRecord& record = c_->jobs_.at(job_id_);
  c_->SetStateLocked(record, state, error);
  c_->Log(absl::StrCat(job_id_, " ", v1::JobState_Name(state), error.empty() ? "" : ": ", error));
}

absl::Status Coordinator::JobRun::Load() {
  std::vector<int64_t> versions(static_cast<size_t>(n_), 0);
  std::vector<v1::NumericsProfile> numerics(static_cast<size_t>(n_));
  MUONPS_RETURN_IF_ERROR(ForEachShard(n_, [&](int i) {
    grpc::ClientContext context;
    SetUp(&context, i);
    v1::LoadJobRequest request;
    request.set_job_id(job_id_);
    *request.mutable_spec() = spec_;
    *request.mutable_tensors() = placement_.shards[i].tensors();
    request.set_resume_from(resume_);
    request.set_replace(true);
    request.set_job_key(job_key_);
    v1::LoadJobResponse response;
    absl::Status st =
        FromGrpcStatus(stubs_[i]->LoadJob(&context, request, &response), ShardCall(i, "LoadJob"));
    versions[i] = response.version();
    numerics[i] = response.checkpoint_numerics();
    return st;
  }));
  start_step_ = versions[0];
  checkpoint_numerics_ = numerics[0];
  for (int i = 1; i < n_; ++i) {
    if (versions[i] != start_step_) {
      return absl::FailedPreconditionError(absl::StrCat("shards resumed at different steps (",
                                                        start_step_, " and ", versions[i], ")"));
    }
  }
  if (start_step_ > total_) {
    return absl::FailedPreconditionError(absl::StrCat(
        "checkpoint is at step ", start_step_, ", beyond the job's schedule.total_steps ", total_));
  }
  return absl::OkStatus();
}

void Coordinator::JobRun::Started() {
  {
    absl::MutexLock lock(&c_->mu_);
    JobRecord& record = c_->jobs_.at(job_id_);
    *record.job.mutable_placement() = {placement_.shards.begin(), placement_.shards.end()};
    record.job.set_start_step(start_step_);
    *record.job.mutable_numerics() = LocalNumerics();
    if (!resume_.empty() && !SameNumerics(checkpoint_numerics_, LocalNumerics())) {
      const std::string note = ResumeNumericsNote(checkpoint_numerics_);
      record.job.add_notes(note);
      c_->Log(absl::StrCat(job_id_, ": ", note));
    }
    record.job.mutable_progress()->set_step(start_step_);
    for (auto& [id, m] : c_->members_) {
      if (m.shard) m.job_id = job_id_;
    }
    c_->SetStateLocked(record, v1::JOB_STATE_RUNNING, "");
    c_->EmitLocked(record, v1::JOB_EVENT_KIND_PLACEMENT);
  }
  c_->Log(absl::StrCat(job_id_, " (", spec_.name(), ") running from step ", start_step_, " of ",
                       total_, " on ", n_, " shard(s):\n", FormatPlacement(placement_.shards)));
  started_ = absl::Now();
}

absl::Status Coordinator::JobRun::WaitFor(const std::function<bool()>& done, bool cancellable) {
  absl::MutexLock lock(&c_->mu_);
  while (true) {
    if (c_->shutdown_) return absl::UnavailableError("coordinator shut down");
    if (cancellable && c_->jobs_.at(job_id_).cancel_requested) {
      return absl::CancelledError("cancelled");
    }
    if (!c_->step_->failure.empty()) return absl::InternalError(c_->step_->failure);
    for (const Member& s : shards_) {
      if (c_->members_.count(s.id) == 0) {
        return absl::UnavailableError(
            absl::StrCat("shard ", s.id, " (", s.address,
                         ") stopped heartbeating; resume from the last checkpoint"));
      }
    }
    if (done()) return absl::OkStatus();
    auto changed = [&]() ABSL_SHARED_LOCKS_REQUIRED(c_->mu_) {
      return c_->shutdown_ || done() || !c_->step_->failure.empty() ||
             (cancellable && c_->jobs_.at(job_id_).cancel_requested);
    };
    c_->mu_.AwaitWithTimeout(absl::Condition(&changed), absl::Milliseconds(200));
  }
}

void Coordinator::JobRun::Plan(int64_t version, bool eval, int count_hint) {
  c_->step_ = std::make_unique<StepRun>();
  StepRun& run = *c_->step_;
  run.job_id = job_id_;
  run.version = version;
  run.eval = eval;
  const std::vector<const Member*> workers = c_->LiveLocked(false);
  const int w = static_cast<int>(workers.size());
  const int count = std::max(1, std::min(std::max(w, 1), count_hint));
  if (eval) {
    run.eval_parts_done.assign(count, false);
  } else {
    run.slots.assign(slots_, std::nullopt);
  }
  for (int k = 0; k < count; ++k) {
    TaskRecord t;
    t.task.set_task_id(absl::StrCat("task-", c_->next_task_++));
    t.task.set_job_id(job_id_);
    *t.task.mutable_spec() = spec_;
    t.task.set_kind(eval ? v1::TASK_KIND_EVAL : v1::TASK_KIND_TRAIN);
    t.task.set_version(version);
    if (eval) {
      t.task.set_eval_part(k);
      t.task.set_eval_parts(count);
    } else {
      const SlotRange range = PlanSlots(slots_, count, k);
      for (int s = range.begin; s < range.end; ++s) t.task.add_slots(s);
    }
    *t.task.mutable_shards() = {routes_.begin(), routes_.end()};
    t.task.set_job_key(job_key_);
    if (k < w) t.worker = workers[k]->id;
    run.tasks.push_back(std::move(t));
  }
}

absl::StatusOr<Coordinator::JobRun::SlotSums> Coordinator::JobRun::CollectSlots(int64_t step) {
  {
    absl::MutexLock lock(&c_->mu_);
    Plan(step, false, slots_);
  }
  MUONPS_RETURN_IF_ERROR(WaitFor([&]() ABSL_SHARED_LOCKS_REQUIRED(c_->mu_) {
    for (const auto& s : c_->step_->slots) {
      if (!s.has_value()) return false;
    }
    return true;
  }));
  std::vector<v1::SlotStats> stats;
  SlotSums sums;
  {
    absl::MutexLock lock(&c_->mu_);
    for (const auto& s : c_->step_->slots) stats.push_back(*s);
    std::vector<std::string> seen;
    for (const TaskRecord& t : c_->step_->tasks) {
      if (std::find(seen.begin(), seen.end(), t.worker) == seen.end()) seen.push_back(t.worker);
    }
    sums.workers_used = static_cast<int>(seen.size());
    c_->step_->tasks.clear();
  }
  // In slot order, as the trainer sums them.
  double loss_sum = 0.0;
  sums.loads = std::make_unique<ExpertLoads>(spec_.model());
  for (const v1::SlotStats& s : stats) {
    loss_sum += s.loss_sum();
    if (absl::Status bad = sums.loads->Add(s.expert_load()); !bad.ok()) {
      return absl::InternalError(absl::StrCat("slot ", s.slot(), ": ", bad.message()));
    }
  }
  sums.loss = loss_sum / static_cast<double>(global_tokens_);
  if (!std::isfinite(sums.loss)) {
    return absl::InternalError(
        absl::StrCat("loss is not finite at step ", step + 1, " (diverged: lower optimizer.lr?)"));
  }
  return sums;
}

absl::StatusOr<double> Coordinator::JobRun::GlobalNorm(int64_t step) {
  std::map<std::string, double> squares;
  absl::Mutex squares_mu;
  MUONPS_RETURN_IF_ERROR(ForEachShard(n_, [&](int i) {
    grpc::ClientContext context;
    SetUp(&context, i);
    v1::GetGradientSquaresRequest request;
    request.set_job_id(job_id_);
    request.set_step(step);
    v1::GetGradientSquaresResponse response;
    absl::Status s = FromGrpcStatus(stubs_[i]->GetGradientSquares(&context, request, &response),
                                    ShardCall(i, "GetGradientSquares"));
    absl::MutexLock lock(&squares_mu);
    for (const v1::TensorSquares& t : response.tensors()) squares[t.name()] = t.sum_of_squares();
    return s;
  }));
  double sq = 0.0;
  for (const TensorInfo& t : layout_->tensors()) {
    if (!t.trainable()) continue;
    auto it = squares.find(t.name);
    if (it == squares.end()) {
      return absl::InternalError(absl::StrCat("no shard reported the gradient of ", t.name));
    }
    sq += it->second;
  }
  const double norm = std::sqrt(sq);
  if (!std::isfinite(norm)) {
    return absl::InternalError(absl::StrCat("gradient is not finite at step ", step + 1));
  }
  return norm;
}

absl::Status Coordinator::JobRun::Apply(int64_t step, double lr, double coef,
                                        const ExpertLoads& loads) {
  return ForEachShard(n_, [&](int i) {
    grpc::ClientContext context;
    SetUp(&context, i);
    v1::ApplyStepRequest request;
    request.set_job_id(job_id_);
    request.set_step(step);
    request.set_lr(lr);
    request.set_clip_coef(coef);
    loads.ToProto(request.mutable_expert_load());
    v1::ApplyStepResponse response;
    return FromGrpcStatus(stubs_[i]->ApplyStep(&context, request, &response),
                          ShardCall(i, "ApplyStep"));
  });
}

absl::Status Coordinator::JobRun::Evaluate(int64_t done) {
  {
    absl::MutexLock lock(&c_->mu_);
    Plan(done, true, 1 << 20);
  }
  // A cancel waits for this evaluation (it is part of step `done`, as in
  // `muonps train`) and stops the job before the next step, so that the
  // job's progress names the step its checkpoint holds and the checkpoint
  // carries this validation loss, like `train --until done`.
  MUONPS_RETURN_IF_ERROR(WaitFor(
      [&]() ABSL_SHARED_LOCKS_REQUIRED(c_->mu_) {
        for (bool d : c_->step_->eval_parts_done) {
          if (!d) return false;
        }
        return true;
      },
      /*cancellable=*/false));
  double val_sum = 0.0;
  int64_t val_tokens = 0;
  {
    absl::MutexLock lock(&c_->mu_);
    StepRun& run = *c_->step_;
    int64_t expect = 0;
    for (const auto& [index, b] : run.eval_batches) {
      if (index != expect++) break;
      val_sum += b.loss_sum();
      val_tokens += b.tokens();
    }
    const bool covered = expect == run.eval_total_batches &&
                         static_cast<int64_t>(run.eval_batches.size()) == run.eval_total_batches;
    const int64_t total_batches = run.eval_total_batches;
    run.tasks.clear();
    if (!covered) {
      return absl::InternalError(
          absl::StrCat("validation batches reported do not cover 0..", total_batches - 1));
    }
  }
  last_val_ = val_tokens > 0 ? val_sum / static_cast<double>(val_tokens) : std::nan("");
  val_step_ = done;
  return absl::OkStatus();
}

void Coordinator::JobRun::Publish(int64_t done, absl::Time step_start, absl::Time reported,
                                  absl::Time applied, double loss, double norm, double lr,
                                  const SlotSums& sums) {
  absl::MutexLock lock(&c_->mu_);
  JobRecord& record = c_->jobs_.at(job_id_);
  v1::JobProgress* p = record.job.mutable_progress();
  const double elapsed = absl::ToDoubleSeconds(absl::Now() - started_);
  const int64_t run = done - start_step_;
  p->set_step(done);
  p->set_total_steps(total_);
  p->set_loss(loss);
  if (last_val_.has_value()) {
    p->set_val_loss(*last_val_);
    p->set_val_step(val_step_);
  }
  p->set_grad_norm(norm);
  p->set_lr(lr);
  p->set_step_seconds(absl::ToDoubleSeconds(absl::Now() - step_start));
  p->set_tokens_per_second(elapsed > 0 ? run * global_tokens_ / elapsed : 0.0);
  p->set_eta_seconds(run > 0 ? elapsed / run * (total_ - done) : 0.0);
  p->set_tokens_seen(done * global_tokens_);
  p->set_max_load_ratio(sums.loads->MaxLoadRatio());
  p->set_workers(sums.workers_used);
  c_->EmitLocked(record, v1::JOB_EVENT_KIND_STEP);
  Metrics& m = c_->metrics_;
  m.step.Set(static_cast<double>(done));
  m.total_steps.Set(static_cast<double>(total_));
  m.train_loss.Set(loss);
  if (last_val_.has_value()) m.val_loss.Set(*last_val_);
  m.tokens_per_second.Set(p->tokens_per_second());
  m.grad_norm.Set(norm);
  m.learning_rate.Set(lr);
  m.load_ratio.Set(p->max_load_ratio());
  m.step_workers.Set(sums.workers_used);
  m.tokens.Increment(static_cast<double>(global_tokens_));
  m.steps.Increment();
  m.step_seconds.Observe(p->step_seconds());
  m.global_seconds.Observe(absl::ToDoubleSeconds(applied - reported));
}

absl::Status Coordinator::JobRun::Checkpoint(int64_t version) {
  const std::string& root = spec_.checkpoint().dir();
  if (root.empty()) return absl::OkStatus();
  const std::string final_dir = absl::StrCat(root, "/", CheckpointName(version));
  const CheckpointWriter writer{owner_, job_id_};
  MUONPS_ASSIGN_OR_RETURN(const std::string staging, CreateStagingDir(final_dir, writer));
  MUONPS_RETURN_IF_ERROR(ForEachShard(n_, [&](int i) {
    grpc::ClientContext context;
    SetUp(&context, i);
    v1::SaveCheckpointRequest request;
    request.set_job_id(job_id_);
    request.set_dir(staging);
    request.set_shard_index(i);
    request.set_shard_count(n_);
    request.set_version(version);
    v1::SaveCheckpointResponse response;
    return FromGrpcStatus(stubs_[i]->SaveCheckpoint(&context, request, &response),
                          ShardCall(i, "SaveCheckpoint"));
  }));
  v1::TrainerState trainer;
  trainer.set_step(version);
  *trainer.mutable_job() = spec_;
  trainer.set_tokens_seen(version * global_tokens_);
  trainer.set_last_val_loss(last_val_.value_or(std::nan("")));
  *trainer.mutable_numerics() = LocalNumerics();
  MUONPS_RETURN_IF_ERROR(WriteCheckpointIndex(staging, n_, *layout_, spec_.optimizer().name(),
                                              placement_.owner, trainer));
  MUONPS_RETURN_IF_ERROR(PublishStagingDir(staging, final_dir, writer));
  PruneCheckpoints(root, spec_.checkpoint().keep_last(), owner_);
  absl::MutexLock lock(&c_->mu_);
  JobRecord& record = c_->jobs_.at(job_id_);
  record.job.set_last_checkpoint(final_dir);
  c_->EmitLocked(record, v1::JOB_EVENT_KIND_CHECKPOINT);
  return absl::OkStatus();
}

void Coordinator::JobRun::Stop(const absl::Status& why, int64_t version) {
  {
    // Stopped during an evaluation: the update of `version` is applied.
    absl::MutexLock lock(&c_->mu_);
    v1::JobProgress* p = c_->jobs_.at(job_id_).job.mutable_progress();
    if (version > p->step()) {
      p->set_step(version);
      p->set_tokens_seen(version * global_tokens_);
    }
  }
  if (why.code() == absl::StatusCode::kCancelled) {
    absl::Status st = version > start_step_ ? Checkpoint(version) : absl::OkStatus();
    return Finish(v1::JOB_STATE_CANCELLED,
                  st.ok() ? std::string("cancelled")
                          : absl::StrCat("cancelled; the checkpoint failed: ", st.message()));
  }
  return Finish(v1::JOB_STATE_FAILED, std::string(why.message()));
}

void Coordinator::JobRun::Run() {
  if (!Prepare()) return;
  Place();
  // 1. Load the tensors on the shards.
  if (absl::Status st = Load(); !st.ok())
    return Finish(v1::JOB_STATE_FAILED, std::string(st.message()));
  Started();
  for (int64_t step = start_step_; step < total_; ++step) {
    const absl::Time step_start = absl::Now();
    // 2. Slot gradients.
    absl::StatusOr<SlotSums> sums = CollectSlots(step);
    if (!sums.ok()) return Stop(sums.status(), step);
    // 3. Global quantities, in the trainer's order.
    const absl::Time reported = absl::Now();
    absl::StatusOr<double> norm = GlobalNorm(step);
    if (!norm.ok()) return Stop(norm.status(), step);
    const double coef = ClipCoefficient(spec_.optimizer().max_grad_norm(), *norm);
    const double lr = StepLearningRate(spec_, step);
    bool cancel_now = false;
    {
      absl::MutexLock lock(&c_->mu_);
      cancel_now = c_->jobs_.at(job_id_).cancel_requested;
    }
    if (cancel_now) return Stop(absl::CancelledError("cancelled"), step);
    // A failed apply may have updated some shards: the job cannot go on.
    if (absl::Status st = Apply(step, lr, coef, *sums->loads); !st.ok()) {
      return Finish(v1::JOB_STATE_FAILED, std::string(st.message()));
    }
    const int64_t done = step + 1;
    const absl::Time applied = absl::Now();
    // 4. Validation.
    const int eval_every = spec_.data().eval_every();
    if ((eval_every > 0 && done % eval_every == 0) || done == total_) {
      if (absl::Status st = Evaluate(done); !st.ok()) return Stop(st, done);
    }
    Publish(done, step_start, reported, applied, sums->loss, *norm, lr, *sums);
    const int every = spec_.checkpoint().every_steps();
    if (every > 0 && done % every == 0 && done < total_) {
      if (absl::Status st = Checkpoint(done); !st.ok()) {
        return Finish(v1::JOB_STATE_FAILED, absl::StrCat("checkpoint: ", st.message()));
      }
    }
  }
  if (total_ > start_step_) {
    if (absl::Status st = Checkpoint(total_); !st.ok()) {
      return Finish(v1::JOB_STATE_FAILED, absl::StrCat("checkpoint: ", st.message()));
    }
  }
  Finish(v1::JOB_STATE_SUCCEEDED, "");
}

}  // namespace muonps
