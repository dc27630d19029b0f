// Coordinator::JobRun: one job from placement to its end (see the step
// described in coordinator.h). Each method is one stage of the run; the
// quantities of the step itself come from step/step.h.
#include "services/coordinator/job_run.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "checkpoint/checkpoint.h"
#include "common/model_layout.h"
#include "common/numerics.h"
#include "common/status_macros.h"
#include "rpc/auth.h"
#include "rpc/rpc_util.h"
#include "services/coordinator/placement.h"
#include "step/step.h"

namespace muonps {

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

void Coordinator::RunJob(const std::string& job_id) { JobRun(this, job_id).Run(); }

bool Coordinator::JobRun::Prepare() {
  absl::MutexLock lock(&c_->mu_);
  const JobRecord& record = c_->jobs_.at(job_id_);
  spec_ = record.job.spec();
  resume_ = record.job.last_checkpoint().empty() ? record.job.resume_from()
                                                 : record.job.last_checkpoint();
  owner_ = record.job.owner();
  interrupted_ = record.interrupted;
  if (interrupted_ && record.job.placement_size() > 0) {
    // The shards that held the job register again at their next heartbeat:
    // wait for them (a while) to continue from their state, in their order.
    std::vector<std::string> addresses;
    for (const v1::ShardPlacement& p : record.job.placement()) addresses.push_back(p.address());
    auto all_back = [&]() ABSL_SHARED_LOCKS_REQUIRED(c_->mu_) {
      if (c_->shutdown_) return true;
      for (const std::string& a : addresses) {
        bool found = false;
        for (const Member* m : c_->PlaceableShardsLocked()) found = found || m->address == a;
        if (!found) return false;
      }
      return true;
    };
    c_->mu_.AwaitWithDeadline(absl::Condition(&all_back),
                              c_->started_ + absl::Seconds(2 * c_->options_.lease_seconds));
    if (all_back()) {
      for (const std::string& a : addresses) {
        for (const Member* m : c_->PlaceableShardsLocked()) {
          if (m->address == a) shards_.push_back(*m);
        }
      }
      return !c_->shutdown_;
    }
  }
  for (const Member* m : c_->PlaceableShardsLocked()) shards_.push_back(*m);
  if (static_cast<int>(shards_.size()) < std::max(1, c_->options_.min_shards)) {
    c_->queue_.push_front(job_id_);  // a shard left meanwhile: wait for it again
    return false;
  }
  return true;
}

void Coordinator::JobRun::Place() {
  layout_ = std::make_unique<ModelLayout>(spec_.model());
  n_ = static_cast<int>(shards_.size());
  placement_ = PlaceTensors(*layout_, spec_.optimizer(), n_, spec_.recovery().replicas());
  at_version_.assign(static_cast<size_t>(n_), -1);
  for (int i = 0; i < n_; ++i) {
    placement_.shards[i].set_shard_id(shards_[i].id);
    placement_.shards[i].set_address(shards_[i].address);
    stubs_.push_back(v1::ShardService::NewStub(MakeChannel(shards_[i].address)));
    v1::ShardRoute route;
    route.set_shard_id(shards_[i].id);
    route.set_address(shards_[i].address);
    *route.mutable_tensors() = placement_.shards[i].tensors();
    *route.mutable_replicas() = placement_.shards[i].replicas();
    routes_.push_back(std::move(route));
  }
  total_ = spec_.schedule().total_steps();
  slots_ = spec_.batch().slots();
  global_tokens_ = StepScalesOf(spec_).global_tokens;
}

void Coordinator::JobRun::DropOn(int i) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(10.0));
  context.AddMetadata(kMemberSecretHeader, shards_[i].secret);
  v1::DropJobRequest request;
  request.set_job_id(job_id_);
  v1::DropJobResponse response;
  (void)stubs_[i]->DropJob(&context, request, &response);
}

void Coordinator::JobRun::DropAll() {
  (void)ForEachShard(n_, [&](int i) {
    DropOn(i);
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

absl::Status Coordinator::JobRun::Load(bool adopt) {
  std::vector<int64_t> versions(static_cast<size_t>(n_), 0);
  std::vector<v1::NumericsProfile> numerics(static_cast<size_t>(n_));
  MUONPS_RETURN_IF_ERROR(ForEachShard(n_, [&](int i) {
    grpc::ClientContext context;
    SetUp(&context, i);
    v1::LoadJobRequest request;
    request.set_job_id(job_id_);
    *request.mutable_spec() = spec_;
    *request.mutable_tensors() = placement_.shards[i].tensors();
    *request.mutable_replicas() = placement_.shards[i].replicas();
    request.set_resume_from(resume_);
    request.set_replace(true);
    request.set_reload(!adopt);
    request.set_job_key(job_key_);
    v1::LoadJobResponse response;
    absl::Status st = ShardStatus(stubs_[i]->LoadJob(&context, request, &response), i, "LoadJob");
    versions[i] = response.version();
    numerics[i] = response.checkpoint_numerics();
    return st;
  }));
  start_step_ = versions[0];
  checkpoint_numerics_ = numerics[0];
  at_version_ = versions;
  for (int i = 1; i < n_; ++i) {
    if (versions[i] != start_step_) {
      if (adopt) {
        // Never merge steps: a shard behind the others (restarted, or
        // stopped before the last update) makes every shard load afresh.
        c_->Log(absl::StrCat(job_id_, ": shard ", shards_[i].id, " holds step ", versions[i],
                             ", shard ", shards_[0].id, " step ", start_step_,
                             ": their state is refused; loading ",
                             resume_.empty() ? std::string("afresh") : resume_));
        return Load(false);
      }
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
    if (!started_once_ && !resume_.empty() &&
        !SameNumerics(checkpoint_numerics_, LocalNumerics())) {
      const std::string note = ResumeNumericsNote(checkpoint_numerics_);
      record.job.add_notes(note);
      c_->Log(absl::StrCat(job_id_, ": ", note));
    }
    record.job.mutable_progress()->set_step(start_step_);
    for (auto& [id, m] : c_->members_) {
      if (m.shard) m.job_id = job_id_;
    }
    record.interrupted = false;
    if (record.job.state() != v1::JOB_STATE_RUNNING) {
      c_->SetStateLocked(record, v1::JOB_STATE_RUNNING, "");
    }
    c_->EmitLocked(record, v1::JOB_EVENT_KIND_PLACEMENT);
  }
  started_once_ = true;
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
        shard_lost_ = true;
        absl::MutexLock lost(&lost_mu_);
        lost_ids_.emplace(s.id, absl::Now());
        return absl::UnavailableError(
            absl::StrCat("shard ", s.id, " (", s.address, ") stopped heartbeating"));
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

absl::StatusOr<Coordinator::JobRun::SlotSums> Coordinator::JobRun::CollectSlots(int64_t step,
                                                                                bool planned) {
  if (!planned) {
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
  sums.logits = std::make_unique<AttentionLogits>(spec_.model());
  for (const v1::SlotStats& s : stats) {
    loss_sum += s.loss_sum();
    if (absl::Status bad = sums.loads->Add(s.expert_load()); !bad.ok()) {
      return absl::InternalError(absl::StrCat("slot ", s.slot(), ": ", bad.message()));
    }
    if (s.attention_logit_max_size() > 0) {
      if (absl::Status bad = sums.logits->Add(s.attention_logit_max()); !bad.ok()) {
        return absl::InternalError(absl::StrCat("slot ", s.slot(), ": ", bad.message()));
      }
    } else if (spec_.optimizer().qk_clip_tau() > 0.0) {
      return absl::InternalError(
          absl::StrCat("slot ", s.slot(), ": no attention logits reported for QK-Clip"));
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
  std::string disagree;
  absl::Mutex squares_mu;
  MUONPS_RETURN_IF_ERROR(ForEachShard(n_, [&](int i) {
    grpc::ClientContext context;
    SetUp(&context, i);
    v1::GetGradientSquaresRequest request;
    request.set_job_id(job_id_);
    request.set_step(step);
    v1::GetGradientSquaresResponse response;
    absl::Status s = ShardStatus(stubs_[i]->GetGradientSquares(&context, request, &response), i,
                                 "GetGradientSquares");
    absl::MutexLock lock(&squares_mu);
    for (const v1::TensorSquares& t : response.tensors()) {
      // Every copy of a tensor sums the same slot gradients in the same
      // order: copies that differ in a bit are a fault, not a choice.
      const double sq = t.sum_of_squares();
      auto [it, first] = squares.emplace(t.name(), sq);
      if (!first && std::memcmp(&it->second, &sq, sizeof(double)) != 0) {
        disagree = t.name();
      }
    }
    return s;
  }));
  if (!disagree.empty()) {
    return absl::InternalError(
        absl::StrCat("the copies of ", disagree, " hold different gradients at step ", step + 1));
  }
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
                                        const SlotSums& sums) {
  return ForEachShard(n_, [&](int i) {
    grpc::ClientContext context;
    SetUp(&context, i);
    v1::ApplyStepRequest request;
    request.set_job_id(job_id_);
    request.set_step(step);
    request.set_lr(lr);
    request.set_clip_coef(coef);
    sums.loads->ToProto(request.mutable_expert_load());
    if (spec_.optimizer().qk_clip_tau() > 0.0) {
      sums.logits->ToProto(request.mutable_attention_logit_max());
    }
    v1::ApplyStepResponse response;
    const grpc::Status st = stubs_[i]->ApplyStep(&context, request, &response);
    if (st.ok()) at_version_[i] = step + 1;
    return ShardStatus(st, i, "ApplyStep");
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
  Metrics& m = c_->metrics_;
  // QK-Clip: the largest logit and the clipped heads, overall and per layer.
  const double tau = spec_.optimizer().qk_clip_tau();
  double logit_max = 0.0;
  int clipped = 0;
  if (!sums.logits->empty()) {
    logit_max = -INFINITY;
    for (int l = 0; l < sums.logits->layers(); ++l) {
      const std::string layer = std::to_string(l);
      const int heads = sums.logits->ClippedHeads(l, tau);
      logit_max = std::max<double>(logit_max, sums.logits->LayerMax(l));
      clipped += heads;
      m.attention_logit_max.Add({{"layer", layer}}).Set(sums.logits->LayerMax(l));
      m.qk_clipped_heads.Add({{"layer", layer}}).Set(heads);
    }
  }
  p->set_max_attention_logit(logit_max);
  p->set_qk_clipped_heads(clipped);
  c_->EmitLocked(record, v1::JOB_EVENT_KIND_STEP);
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

absl::Status Coordinator::JobRun::Checkpoint(int64_t version, bool background) {
  CheckpointParts parts;
  for (int i = 0; i < n_; ++i) parts.shards.push_back(i);
  parts.tensors.resize(static_cast<size_t>(n_));
  parts.owner = placement_.owner;
  return Checkpoint(version, background, std::move(parts));
}

absl::Status Coordinator::JobRun::Checkpoint(int64_t version, bool background,
                                             CheckpointParts parts) {
  MUONPS_RETURN_IF_ERROR(AwaitCheckpoint());
  const std::string& root = spec_.checkpoint().dir();
  if (root.empty()) return absl::OkStatus();
  const std::string final_dir = absl::StrCat(root, "/", CheckpointName(version));
  const CheckpointWriter writer{owner_, job_id_};
  MUONPS_ASSIGN_OR_RETURN(const std::string staging, CreateStagingDir(final_dir, writer));
  const int count = static_cast<int>(parts.shards.size());
  // Every shard writes its part; in the background, each answers once it
  // holds a snapshot of `version`, and a second call waits for the write.
  auto save = [this, staging, version, parts](bool in_background) {
    return ForEachShard(static_cast<int>(parts.shards.size()), [&](int k) {
      const int i = parts.shards[k];
      grpc::ClientContext context;
      SetUp(&context, i);
      v1::SaveCheckpointRequest request;
      request.set_job_id(job_id_);
      request.set_dir(staging);
      request.set_shard_index(k);
      request.set_shard_count(static_cast<int32_t>(parts.shards.size()));
      request.set_version(version);
      request.set_background(in_background);
      *request.mutable_tensors() = {parts.tensors[k].begin(), parts.tensors[k].end()};
      v1::SaveCheckpointResponse response;
      return ShardStatus(stubs_[i]->SaveCheckpoint(&context, request, &response), i,
                         "SaveCheckpoint");
    });
  };
  MUONPS_RETURN_IF_ERROR(save(background));
  v1::TrainerState trainer;
  trainer.set_step(version);
  *trainer.mutable_job() = spec_;
  trainer.set_tokens_seen(version * global_tokens_);
  trainer.set_last_val_loss(last_val_.value_or(std::nan("")));
  *trainer.mutable_numerics() = LocalNumerics();
  // The index, then the directory published under its final name.
  auto publish = [this, save, background, staging, final_dir, writer, count,
                  owner = std::move(parts.owner), trainer = std::move(trainer)]() -> absl::Status {
    if (background) MUONPS_RETURN_IF_ERROR(save(false));
    MUONPS_RETURN_IF_ERROR(
        WriteCheckpointIndex(staging, count, *layout_, spec_.optimizer().name(), owner, trainer));
    MUONPS_RETURN_IF_ERROR(PublishStagingDir(staging, final_dir, writer));
    PruneCheckpoints(spec_.checkpoint().dir(), spec_.checkpoint().keep_last(), owner_);
    absl::MutexLock lock(&c_->mu_);
    JobRecord& record = c_->jobs_.at(job_id_);
    record.job.set_last_checkpoint(final_dir);
    c_->EmitLocked(record, v1::JOB_EVENT_KIND_CHECKPOINT);
    return absl::OkStatus();
  };
  if (!background) return publish();
  checkpoint_thread_ =
      std::thread([this, publish = std::move(publish)] { checkpoint_status_ = publish(); });
  return absl::OkStatus();
}

absl::Status Coordinator::JobRun::AwaitCheckpoint() {
  if (!checkpoint_thread_.joinable()) return absl::OkStatus();
  checkpoint_thread_.join();
  return std::exchange(checkpoint_status_, absl::OkStatus());
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

}  // namespace muonps
