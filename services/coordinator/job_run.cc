// Coordinator::RunJob: one job from placement to its end (see the step
// described in coordinator.h).
#include <algorithm>
#include <cmath>
#include <thread>

#include "absl/strings/str_cat.h"
#include "checkpoint/checkpoint.h"
#include "common/model_layout.h"
#include "common/numerics.h"
#include "common/status_macros.h"
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
  for (int i = 0; i < n; ++i) threads.emplace_back([&, i] { status[i] = fn(i); });
  for (std::thread& t : threads) t.join();
  for (const absl::Status& st : status) {
    if (!st.ok()) return st;
  }
  return absl::OkStatus();
}

}  // namespace

void Coordinator::RunJob(const std::string& job_id) {
  v1::JobSpec spec;
  std::string resume;
  std::vector<Member> shard_members;
  {
    absl::MutexLock lock(&mu_);
    const JobRecord& record = jobs_.at(job_id);
    spec = record.job.spec();
    resume = record.job.resume_from();
    for (const Member* m : LiveLocked(true)) shard_members.push_back(*m);
    if (static_cast<int>(shard_members.size()) < std::max(1, options_.min_shards)) {
      queue_.push_front(job_id);  // a shard left meanwhile: wait for it again
      return;
    }
  }
  const ModelLayout layout(spec.model());
  const int n = static_cast<int>(shard_members.size());
  Placement placement = PlaceTensors(layout, spec.optimizer(), n);
  std::vector<std::unique_ptr<v1::ShardService::Stub>> stubs;
  std::vector<v1::ShardRoute> routes;
  for (int i = 0; i < n; ++i) {
    placement.shards[i].set_shard_id(shard_members[i].id);
    placement.shards[i].set_address(shard_members[i].address);
    stubs.push_back(v1::ShardService::NewStub(MakeChannel(shard_members[i].address)));
    v1::ShardRoute route;
    route.set_shard_id(shard_members[i].id);
    route.set_address(shard_members[i].address);
    *route.mutable_tensors() = placement.shards[i].tensors();
    routes.push_back(std::move(route));
  }
  auto shard_call = [&](int i, const char* rpc) {
    return absl::StrCat("shard ", shard_members[i].id, " (", shard_members[i].address, "): ", rpc);
  };
  auto context_for = [&](grpc::ClientContext* context) {
    context->set_deadline(DeadlineIn(options_.shard_rpc_seconds));
  };
  auto drop_all = [&] {
    (void)ForEachShard(n, [&](int i) {
      grpc::ClientContext context;
      context.set_deadline(DeadlineIn(10.0));
      v1::DropJobRequest request;
      request.set_job_id(job_id);
      v1::DropJobResponse response;
      (void)stubs[i]->DropJob(&context, request, &response);
      return absl::OkStatus();
    });
  };
  auto finish = [&](v1::JobState state, const std::string& error) {
    drop_all();
    absl::MutexLock lock(&mu_);
    step_.reset();
    for (auto& [id, m] : members_) {
      if (m.job_id == job_id) m.job_id.clear();
    }
    JobRecord& record = jobs_.at(job_id);
    SetStateLocked(record, state, error);
    Log(absl::StrCat(job_id, " ", v1::JobState_Name(state), error.empty() ? "" : ": ", error));
  };

  // 1. Load the tensors on the shards.
  std::vector<int64_t> versions(static_cast<size_t>(n), 0);
  std::vector<v1::NumericsProfile> checkpoint_numerics(static_cast<size_t>(n));
  absl::Status loaded = ForEachShard(n, [&](int i) {
    grpc::ClientContext context;
    context_for(&context);
    v1::LoadJobRequest request;
    request.set_job_id(job_id);
    *request.mutable_spec() = spec;
    *request.mutable_tensors() = placement.shards[i].tensors();
    request.set_resume_from(resume);
    request.set_replace(true);
    v1::LoadJobResponse response;
    absl::Status st =
        FromGrpcStatus(stubs[i]->LoadJob(&context, request, &response), shard_call(i, "LoadJob"));
    versions[i] = response.version();
    checkpoint_numerics[i] = response.checkpoint_numerics();
    return st;
  });
  if (!loaded.ok()) return finish(v1::JOB_STATE_FAILED, std::string(loaded.message()));
  const int64_t start_step = versions[0];
  for (int i = 1; i < n; ++i) {
    if (versions[i] != start_step) {
      return finish(v1::JOB_STATE_FAILED, absl::StrCat("shards resumed at different steps (",
                                                       start_step, " and ", versions[i], ")"));
    }
  }
  const int64_t total = spec.schedule().total_steps();
  if (start_step > total) {
    return finish(v1::JOB_STATE_FAILED,
                  absl::StrCat("checkpoint is at step ", start_step,
                               ", beyond the job's schedule.total_steps ", total));
  }
  {
    absl::MutexLock lock(&mu_);
    JobRecord& record = jobs_.at(job_id);
    *record.job.mutable_placement() = {placement.shards.begin(), placement.shards.end()};
    record.job.set_start_step(start_step);
    *record.job.mutable_numerics() = LocalNumerics();
    const v1::NumericsProfile& saved = checkpoint_numerics[0];
    if (!resume.empty() && !SameNumerics(saved, LocalNumerics())) {
      const std::string note = ResumeNumericsNote(saved);
      record.job.add_notes(note);
      Log(absl::StrCat(job_id, ": ", note));
    }
    record.job.mutable_progress()->set_step(start_step);
    for (auto& [id, m] : members_) {
      if (m.shard) m.job_id = job_id;
    }
    SetStateLocked(record, v1::JOB_STATE_RUNNING, "");
    EmitLocked(record, v1::JOB_EVENT_KIND_PLACEMENT);
  }
  Log(absl::StrCat(job_id, " (", spec.name(), ") running from step ", start_step, " of ", total,
                   " on ", n, " shard(s):\n", FormatPlacement(placement.shards)));

  const int slots = spec.batch().slots();
  const int64_t global_tokens = StepScalesOf(spec).global_tokens;
  const absl::Time started = absl::Now();
  std::optional<double> last_val;
  int64_t val_step = 0;

  // Waits until `done` holds, the job is cancelled (when `cancellable`), a
  // task failed, a shard lost its lease, or the coordinator shuts down.
  // Returns the reason to stop, or OK.
  auto wait_for = [&](const std::function<bool()>& done, bool cancellable = true) -> absl::Status {
    absl::MutexLock lock(&mu_);
    while (true) {
      if (shutdown_) return absl::UnavailableError("coordinator shut down");
      if (cancellable && jobs_.at(job_id).cancel_requested) {
        return absl::CancelledError("cancelled");
      }
      if (!step_->failure.empty()) return absl::InternalError(step_->failure);
      for (const Member& s : shard_members) {
        if (members_.count(s.id) == 0) {
          return absl::UnavailableError(
              absl::StrCat("shard ", s.id, " (", s.address,
                           ") stopped heartbeating; resume from the last checkpoint"));
        }
      }
      if (done()) return absl::OkStatus();
      auto changed = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
        return shutdown_ || done() || !step_->failure.empty() ||
               (cancellable && jobs_.at(job_id).cancel_requested);
      };
      mu_.AwaitWithTimeout(absl::Condition(&changed), absl::Milliseconds(200));
    }
  };
  // Plans `count` tasks over the live workers (task k to worker k).
  auto plan = [&](int64_t version, bool eval, int count_hint) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    step_ = std::make_unique<StepRun>();
    step_->job_id = job_id;
    step_->version = version;
    step_->eval = eval;
    const std::vector<const Member*> workers = LiveLocked(false);
    const int w = static_cast<int>(workers.size());
    const int count = std::max(1, std::min(std::max(w, 1), count_hint));
    if (eval) {
      step_->eval_parts_done.assign(count, false);
    } else {
      step_->slots.assign(slots, std::nullopt);
    }
    for (int k = 0; k < count; ++k) {
      TaskRecord t;
      t.task.set_task_id(absl::StrCat("task-", next_task_++));
      t.task.set_job_id(job_id);
      *t.task.mutable_spec() = spec;
      t.task.set_kind(eval ? v1::TASK_KIND_EVAL : v1::TASK_KIND_TRAIN);
      t.task.set_version(version);
      if (eval) {
        t.task.set_eval_part(k);
        t.task.set_eval_parts(count);
      } else {
        const SlotRange range = PlanSlots(slots, count, k);
        for (int s = range.begin; s < range.end; ++s) t.task.add_slots(s);
      }
      *t.task.mutable_shards() = {routes.begin(), routes.end()};
      if (k < w) t.worker = workers[k]->id;
      step_->tasks.push_back(std::move(t));
    }
  };
  auto checkpoint = [&](int64_t version) -> absl::Status {
    const std::string& root = spec.checkpoint().dir();
    if (root.empty()) return absl::OkStatus();
    const std::string final_dir = absl::StrCat(root, "/", CheckpointName(version));
    absl::StatusOr<std::string> staging = CreateStagingDir(final_dir);
    if (!staging.ok()) return staging.status();
    absl::Status st = ForEachShard(n, [&](int i) {
      grpc::ClientContext context;
      context_for(&context);
      v1::SaveCheckpointRequest request;
      request.set_job_id(job_id);
      request.set_dir(*staging);
      request.set_shard_index(i);
      request.set_shard_count(n);
      request.set_version(version);
      v1::SaveCheckpointResponse response;
      return FromGrpcStatus(stubs[i]->SaveCheckpoint(&context, request, &response),
                            shard_call(i, "SaveCheckpoint"));
    });
    if (!st.ok()) return st;
    v1::TrainerState trainer;
    trainer.set_step(version);
    *trainer.mutable_job() = spec;
    trainer.set_tokens_seen(version * global_tokens);
    trainer.set_last_val_loss(last_val.value_or(std::nan("")));
    *trainer.mutable_numerics() = LocalNumerics();
    st = WriteCheckpointIndex(*staging, n, layout, spec.optimizer().name(), placement.owner,
                              trainer);
    if (!st.ok()) return st;
    st = PublishStagingDir(*staging, final_dir);
    if (!st.ok()) return st;
    PruneCheckpoints(root, spec.checkpoint().keep_last());
    absl::MutexLock lock(&mu_);
    JobRecord& record = jobs_.at(job_id);
    record.job.set_last_checkpoint(final_dir);
    EmitLocked(record, v1::JOB_EVENT_KIND_CHECKPOINT);
    return absl::OkStatus();
  };
  // Ends the job after a stop: a checkpoint when steps were run.
  auto stop = [&](const absl::Status& why, int64_t version) {
    {
      // Stopped during an evaluation: the update of `version` is applied.
      absl::MutexLock lock(&mu_);
      v1::JobProgress* p = jobs_.at(job_id).job.mutable_progress();
      if (version > p->step()) {
        p->set_step(version);
        p->set_tokens_seen(version * global_tokens);
      }
    }
    if (why.code() == absl::StatusCode::kCancelled) {
      absl::Status st = version > start_step ? checkpoint(version) : absl::OkStatus();
      return finish(v1::JOB_STATE_CANCELLED,
                    st.ok() ? std::string("cancelled")
                            : absl::StrCat("cancelled; the checkpoint failed: ", st.message()));
    }
    return finish(v1::JOB_STATE_FAILED, std::string(why.message()));
  };

  for (int64_t step = start_step; step < total; ++step) {
    const absl::Time step_start = absl::Now();
    // 2. Slot gradients.
    std::vector<v1::SlotStats> stats;
    int workers_used = 0;
    {
      absl::MutexLock lock(&mu_);
      plan(step, false, slots);
    }
    absl::Status st = wait_for([&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
      for (const auto& s : step_->slots) {
        if (!s.has_value()) return false;
      }
      return true;
    });
    if (!st.ok()) return stop(st, step);
    {
      absl::MutexLock lock(&mu_);
      for (const auto& s : step_->slots) stats.push_back(*s);
      std::vector<std::string> seen;
      for (const TaskRecord& t : step_->tasks) {
        if (std::find(seen.begin(), seen.end(), t.worker) == seen.end()) seen.push_back(t.worker);
      }
      workers_used = static_cast<int>(seen.size());
      step_->tasks.clear();
    }
    // 3. Global quantities, in the trainer's order.
    const absl::Time reported = absl::Now();
    double loss_sum = 0.0;
    ExpertLoads loads(spec.model());
    for (const v1::SlotStats& s : stats) {
      loss_sum += s.loss_sum();
      if (absl::Status bad = loads.Add(s.expert_load()); !bad.ok()) {
        return stop(absl::InternalError(absl::StrCat("slot ", s.slot(), ": ", bad.message())),
                    step);
      }
    }
    const double loss = loss_sum / static_cast<double>(global_tokens);
    if (!std::isfinite(loss)) {
      return stop(absl::InternalError(absl::StrCat("loss is not finite at step ", step + 1,
                                                   " (diverged: lower optimizer.lr?)")),
                  step);
    }
    std::map<std::string, double> squares;
    absl::Mutex squares_mu;
    st = ForEachShard(n, [&](int i) {
      grpc::ClientContext context;
      context_for(&context);
      v1::GetGradientSquaresRequest request;
      request.set_job_id(job_id);
      request.set_step(step);
      v1::GetGradientSquaresResponse response;
      absl::Status s = FromGrpcStatus(stubs[i]->GetGradientSquares(&context, request, &response),
                                      shard_call(i, "GetGradientSquares"));
      absl::MutexLock lock(&squares_mu);
      for (const v1::TensorSquares& t : response.tensors()) squares[t.name()] = t.sum_of_squares();
      return s;
    });
    if (!st.ok()) return stop(st, step);
    double sq = 0.0;
    for (const TensorInfo& t : layout.tensors()) {
      if (!t.trainable()) continue;
      auto it = squares.find(t.name);
      if (it == squares.end()) {
        return stop(absl::InternalError(absl::StrCat("no shard reported the gradient of ", t.name)),
                    step);
      }
      sq += it->second;
    }
    const double norm = std::sqrt(sq);
    if (!std::isfinite(norm)) {
      return stop(absl::InternalError(absl::StrCat("gradient is not finite at step ", step + 1)),
                  step);
    }
    const double coef = ClipCoefficient(spec.optimizer().max_grad_norm(), norm);
    const double lr = StepLearningRate(spec, step);
    bool cancel_now = false;
    {
      absl::MutexLock lock(&mu_);
      cancel_now = jobs_.at(job_id).cancel_requested;
    }
    if (cancel_now) return stop(absl::CancelledError("cancelled"), step);
    st = ForEachShard(n, [&](int i) {
      grpc::ClientContext context;
      context_for(&context);
      v1::ApplyStepRequest request;
      request.set_job_id(job_id);
      request.set_step(step);
      request.set_lr(lr);
      request.set_clip_coef(coef);
      loads.ToProto(request.mutable_expert_load());
      v1::ApplyStepResponse response;
      return FromGrpcStatus(stubs[i]->ApplyStep(&context, request, &response),
                            shard_call(i, "ApplyStep"));
    });
    // A failed apply may have updated some shards: the job cannot go on.
    if (!st.ok()) return finish(v1::JOB_STATE_FAILED, std::string(st.message()));
    const int64_t done = step + 1;
    const absl::Time applied = absl::Now();

    // 4. Validation.
    const int eval_every = spec.data().eval_every();
    if ((eval_every > 0 && done % eval_every == 0) || done == total) {
      {
        absl::MutexLock lock(&mu_);
        plan(done, true, 1 << 20);
      }
      // A cancel waits for this evaluation (it is part of step `done`, as in
      // `muonps train`) and stops the job before the next step, so that the
      // job's progress names the step its checkpoint holds and the
      // checkpoint carries this validation loss, like `train --until done`.
      st = wait_for(
          [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
            for (bool d : step_->eval_parts_done) {
              if (!d) return false;
            }
            return true;
          },
          /*cancellable=*/false);
      if (!st.ok()) return stop(st, done);
      double val_sum = 0.0;
      int64_t val_tokens = 0;
      {
        absl::MutexLock lock(&mu_);
        int64_t expect = 0;
        for (const auto& [index, b] : step_->eval_batches) {
          if (index != expect++) break;
          val_sum += b.loss_sum();
          val_tokens += b.tokens();
        }
        if (expect != step_->eval_total_batches ||
            static_cast<int64_t>(step_->eval_batches.size()) != step_->eval_total_batches) {
          st = absl::InternalError(absl::StrCat("validation batches reported do not cover 0..",
                                                step_->eval_total_batches - 1));
        }
        step_->tasks.clear();
      }
      if (!st.ok()) return stop(st, done);
      last_val = val_tokens > 0 ? val_sum / static_cast<double>(val_tokens) : std::nan("");
      val_step = done;
    }

    // Progress.
    {
      absl::MutexLock lock(&mu_);
      JobRecord& record = jobs_.at(job_id);
      v1::JobProgress* p = record.job.mutable_progress();
      const double elapsed = absl::ToDoubleSeconds(absl::Now() - started);
      const int64_t run = done - start_step;
      p->set_step(done);
      p->set_total_steps(total);
      p->set_loss(loss);
      if (last_val.has_value()) {
        p->set_val_loss(*last_val);
        p->set_val_step(val_step);
      }
      p->set_grad_norm(norm);
      p->set_lr(lr);
      p->set_step_seconds(absl::ToDoubleSeconds(absl::Now() - step_start));
      p->set_tokens_per_second(elapsed > 0 ? run * global_tokens / elapsed : 0.0);
      p->set_eta_seconds(run > 0 ? elapsed / run * (total - done) : 0.0);
      p->set_tokens_seen(done * global_tokens);
      p->set_max_load_ratio(loads.MaxLoadRatio());
      p->set_workers(workers_used);
      EmitLocked(record, v1::JOB_EVENT_KIND_STEP);
      metrics_.step.Set(static_cast<double>(done));
      metrics_.total_steps.Set(static_cast<double>(total));
      metrics_.train_loss.Set(loss);
      if (last_val.has_value()) metrics_.val_loss.Set(*last_val);
      metrics_.tokens_per_second.Set(p->tokens_per_second());
      metrics_.grad_norm.Set(norm);
      metrics_.learning_rate.Set(lr);
      metrics_.load_ratio.Set(p->max_load_ratio());
      metrics_.step_workers.Set(workers_used);
      metrics_.tokens.Increment(static_cast<double>(global_tokens));
      metrics_.steps.Increment();
      metrics_.step_seconds.Observe(p->step_seconds());
      metrics_.global_seconds.Observe(absl::ToDoubleSeconds(applied - reported));
    }
    const int every = spec.checkpoint().every_steps();
    if (every > 0 && done % every == 0 && done < total) {
      st = checkpoint(done);
      if (!st.ok()) return finish(v1::JOB_STATE_FAILED, absl::StrCat("checkpoint: ", st.message()));
    }
  }
  if (total > start_step) {
    absl::Status st = checkpoint(total);
    if (!st.ok()) return finish(v1::JOB_STATE_FAILED, absl::StrCat("checkpoint: ", st.message()));
  }
  finish(v1::JOB_STATE_SUCCEEDED, "");
}

}  // namespace muonps
