#include "services/coordinator/coordinator.h"

#include <algorithm>
#include <cmath>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/job_spec.h"
#include "common/numerics.h"
#include "rpc/metrics.h"
#include "rpc/rpc_util.h"
#include "step/step.h"

namespace muonps {
namespace {

constexpr size_t kMaxEvents = 256;
constexpr size_t kEndedRemembered = 32;

double UnixNow() { return absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch()); }

grpc::Status UnknownJob(const std::string& job_id) {
  return Refuse(absl::StatusCode::kNotFound, absl::StrCat("job_id: no job \"", job_id, "\""));
}

bool Ended(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

}  // namespace

// ---------------------------------------------------------------------------
// The generated service classes, forwarding to the coordinator.

class Coordinator::JobServiceImpl final : public v1::JobService::Service {
 public:
  explicit JobServiceImpl(Coordinator* c) : c_(c) {}
  grpc::Status SubmitJob(grpc::ServerContext*, const v1::SubmitJobRequest* request,
                         v1::SubmitJobResponse* response) override {
    return c_->SubmitJob(*request, response);
  }
  grpc::Status GetJob(grpc::ServerContext*, const v1::GetJobRequest* request,
                      v1::GetJobResponse* response) override {
    return c_->GetJob(*request, response);
  }
  grpc::Status ListJobs(grpc::ServerContext*, const v1::ListJobsRequest*,
                        v1::ListJobsResponse* response) override {
    return c_->ListJobs(response);
  }
  grpc::Status CancelJob(grpc::ServerContext*, const v1::CancelJobRequest* request,
                         v1::CancelJobResponse* response) override {
    return c_->CancelJob(*request, response);
  }
  grpc::Status WatchJob(grpc::ServerContext* context, const v1::WatchJobRequest* request,
                        grpc::ServerWriter<v1::WatchJobResponse>* writer) override {
    return c_->WatchJob(context, *request, writer);
  }
  grpc::Status GetCluster(grpc::ServerContext*, const v1::GetClusterRequest*,
                          v1::GetClusterResponse* response) override {
    return c_->GetCluster(response);
  }

 private:
  Coordinator* c_;
};

class Coordinator::ClusterServiceImpl final : public v1::ClusterService::Service {
 public:
  explicit ClusterServiceImpl(Coordinator* c) : c_(c) {}
  grpc::Status RegisterShard(grpc::ServerContext*, const v1::RegisterShardRequest* request,
                             v1::RegisterShardResponse* response) override {
    std::string id;
    grpc::Status st = c_->Register(true, request->address(), 0, request->numerics(), &id);
    response->set_member_id(id);
    response->set_heartbeat_seconds(c_->options_.heartbeat_seconds);
    response->set_lease_seconds(c_->options_.lease_seconds);
    return st;
  }
  grpc::Status RegisterWorker(grpc::ServerContext*, const v1::RegisterWorkerRequest* request,
                              v1::RegisterWorkerResponse* response) override {
    std::string id;
    grpc::Status st =
        c_->Register(false, request->address(), request->threads(), request->numerics(), &id);
    response->set_member_id(id);
    response->set_heartbeat_seconds(c_->options_.heartbeat_seconds);
    response->set_lease_seconds(c_->options_.lease_seconds);
    return st;
  }
  grpc::Status Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* request,
                         v1::HeartbeatResponse* response) override {
    return c_->Heartbeat(*request, response);
  }
  grpc::Status GetTask(grpc::ServerContext* context, const v1::GetTaskRequest* request,
                       v1::GetTaskResponse* response) override {
    return c_->GetTask(context, *request, response);
  }
  grpc::Status ReportSlots(grpc::ServerContext*, const v1::ReportSlotsRequest* request,
                           v1::ReportSlotsResponse* response) override {
    return c_->ReportSlots(*request, response);
  }
  grpc::Status ReportEval(grpc::ServerContext*, const v1::ReportEvalRequest* request,
                          v1::ReportEvalResponse*) override {
    return c_->ReportEval(*request);
  }
  grpc::Status FailTask(grpc::ServerContext*, const v1::FailTaskRequest* request,
                        v1::FailTaskResponse*) override {
    return c_->FailTask(*request);
  }

 private:
  Coordinator* c_;
};

// ---------------------------------------------------------------------------

Coordinator::Metrics::Metrics(prometheus::Registry& r)
    : jobs(prometheus::BuildGauge()
               .Name("muonps_coordinator_jobs")
               .Help("Jobs known to the coordinator, by state")
               .Register(r)),
      step(
          NewGauge(r, "muonps_job_step", "Optimizer steps completed by the running (or last) job")),
      total_steps(NewGauge(r, "muonps_job_total_steps",
                           "schedule.total_steps of the running (or last) job")),
      train_loss(NewGauge(r, "muonps_job_train_loss",
                          "Mean training cross-entropy of the latest step (nats/token)")),
      val_loss(NewGauge(r, "muonps_job_validation_loss", "Latest validation loss (nats/token)")),
      tokens_per_second(NewGauge(r, "muonps_job_tokens_per_second",
                                 "Training tokens per second since the job started")),
      grad_norm(NewGauge(r, "muonps_job_grad_norm",
                         "Global gradient norm of the latest step, before clipping")),
      learning_rate(NewGauge(r, "muonps_job_learning_rate", "Learning rate of the latest step")),
      load_ratio(NewGauge(
          r, "muonps_job_expert_load_max_ratio",
          "Max over MoE layers of the most loaded expert's tokens over the mean, latest step")),
      workers(NewGauge(r, "muonps_cluster_workers", "Workers with a live lease")),
      shards(NewGauge(r, "muonps_cluster_shards", "Optimizer shards with a live lease")),
      step_workers(
          NewGauge(r, "muonps_job_step_workers", "Workers that computed slots of the latest step")),
      tokens(
          NewCounter(r, "muonps_job_tokens_total", "Training tokens consumed by completed steps")),
      steps(NewCounter(r, "muonps_job_steps_total", "Optimizer steps completed")),
      reassignments(
          NewCounter(r, "muonps_coordinator_task_reassignments_total",
                     "Tasks taken from a worker (lease expired or abandoned) and offered again")),
      refused_members(NewCounter(
          r, "muonps_coordinator_members_refused_total",
          "Registrations refused because the member's numerics differ from the cluster's")),
      step_seconds(NewHistogram(r, "muonps_job_step_duration_seconds",
                                "Wall time of an optimizer step, including its evaluation")),
      global_seconds(NewHistogram(
          r, "muonps_job_global_step_duration_seconds",
          "Time from the last slot report to every shard having applied the update")) {}

void Coordinator::UpdateJobGaugesLocked() {
  std::map<v1::JobState, int> counts;
  for (const auto& [id, record] : jobs_) ++counts[record.job.state()];
  for (v1::JobState state : {v1::JOB_STATE_QUEUED, v1::JOB_STATE_RUNNING, v1::JOB_STATE_SUCCEEDED,
                             v1::JOB_STATE_FAILED, v1::JOB_STATE_CANCELLED}) {
    std::string name = v1::JobState_Name(state).substr(std::string("JOB_STATE_").size());
    for (char& c : name) c = static_cast<char>(std::tolower(static_cast<unsigned char>(c)));
    metrics_.jobs.Add({{"state", name}}).Set(counts[state]);
  }
  int workers = 0, shards = 0;
  for (const auto& [id, m] : members_) (m.shard ? shards : workers)++;
  metrics_.workers.Set(workers);
  metrics_.shards.Set(shards);
}

Coordinator::Coordinator(const CoordinatorOptions& options)
    : options_(options),
      registry_(options.metrics != nullptr ? options.metrics
                                           : std::make_shared<prometheus::Registry>()),
      metrics_(*registry_),
      job_service_(std::make_unique<JobServiceImpl>(this)),
      cluster_service_(std::make_unique<ClusterServiceImpl>(this)) {
  {
    absl::MutexLock lock(&mu_);
    UpdateJobGaugesLocked();
  }
  runner_ = std::thread([this] { RunnerLoop(); });
  reaper_ = std::thread([this] { ReaperLoop(); });
}

Coordinator::~Coordinator() { Shutdown(); }

grpc::Service* Coordinator::job_service() { return job_service_.get(); }
grpc::Service* Coordinator::cluster_service() { return cluster_service_.get(); }

void Coordinator::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;
  }
  if (runner_.joinable()) runner_.join();
  if (reaper_.joinable()) reaper_.join();
}

void Coordinator::Log(const std::string& line) {
  if (options_.log) options_.log(line);
}

void Coordinator::EmitLocked(JobRecord& record, v1::JobEventKind kind) {
  v1::WatchJobResponse event;
  event.set_kind(kind);
  *event.mutable_job() = record.job;
  record.events.push_back(std::move(event));
  while (record.events.size() > kMaxEvents) record.events.pop_front();
  ++record.events_total;
}

void Coordinator::SetStateLocked(JobRecord& record, v1::JobState state, const std::string& error) {
  record.job.set_state(state);
  if (!error.empty()) record.job.set_error(error);
  if (state == v1::JOB_STATE_RUNNING) record.job.set_started_at(UnixNow());
  if (Ended(state)) {
    record.job.set_ended_at(UnixNow());
    ended_recently_.push_back(record.job.job_id());
    while (ended_recently_.size() > kEndedRemembered) ended_recently_.pop_front();
  }
  EmitLocked(record, v1::JOB_EVENT_KIND_STATE);
  UpdateJobGaugesLocked();
}

// ---------------------------------------------------------------------------
// JobService

grpc::Status Coordinator::SubmitJob(const v1::SubmitJobRequest& request,
                                    v1::SubmitJobResponse* response) {
  v1::JobSpec spec = request.spec();
  FillJobDefaults(&spec);
  if (absl::Status st = ValidateJobSpec(spec); !st.ok()) {
    return Refuse(absl::StatusCode::kInvalidArgument, absl::StrCat("spec.", st.message()));
  }
  absl::MutexLock lock(&mu_);
  if (shutdown_) return Refuse(absl::StatusCode::kUnavailable, "coordinator is shutting down");
  const std::string id = absl::StrFormat("job-%06d", next_job_++);
  JobRecord& record = jobs_[id];
  record.job.set_job_id(id);
  record.job.set_name(spec.name());
  *record.job.mutable_spec() = spec;
  record.job.set_submitted_at(UnixNow());
  record.job.set_resume_from(request.resume_from());
  record.job.mutable_progress()->set_total_steps(spec.schedule().total_steps());
  job_order_.push_back(id);
  queue_.push_back(id);
  SetStateLocked(record, v1::JOB_STATE_QUEUED, "");
  response->set_job_id(id);
  *response->mutable_spec() = spec;
  return grpc::Status::OK;
}

grpc::Status Coordinator::GetJob(const v1::GetJobRequest& request, v1::GetJobResponse* response) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(request.job_id());
  if (it == jobs_.end()) {
    return UnknownJob(request.job_id());
  }
  *response->mutable_job() = it->second.job;
  return grpc::Status::OK;
}

grpc::Status Coordinator::ListJobs(v1::ListJobsResponse* response) {
  absl::MutexLock lock(&mu_);
  for (const std::string& id : job_order_) {
    v1::Job* job = response->add_jobs();
    *job = jobs_.at(id).job;
    job->clear_spec();
    job->clear_placement();
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::CancelJob(const v1::CancelJobRequest& request,
                                    v1::CancelJobResponse* response) {
  absl::MutexLock lock(&mu_);
  auto it = jobs_.find(request.job_id());
  if (it == jobs_.end()) {
    return UnknownJob(request.job_id());
  }
  JobRecord& record = it->second;
  if (Ended(record.job.state())) {
    return Refuse(absl::StatusCode::kFailedPrecondition,
                  absl::StrCat("job ", request.job_id(), " already ended (",
                               v1::JobState_Name(record.job.state()), ")"));
  }
  if (record.job.state() == v1::JOB_STATE_QUEUED) {
    queue_.erase(std::remove(queue_.begin(), queue_.end(), request.job_id()), queue_.end());
    SetStateLocked(record, v1::JOB_STATE_CANCELLED, "cancelled while queued");
  } else {
    record.cancel_requested = true;
  }
  *response->mutable_job() = record.job;
  return grpc::Status::OK;
}

grpc::Status Coordinator::WatchJob(grpc::ServerContext* context, const v1::WatchJobRequest& request,
                                   grpc::ServerWriter<v1::WatchJobResponse>* writer) {
  int64_t next = 0;
  v1::WatchJobResponse first;
  {
    absl::MutexLock lock(&mu_);
    auto it = jobs_.find(request.job_id());
    if (it == jobs_.end()) {
      return UnknownJob(request.job_id());
    }
    first.set_kind(v1::JOB_EVENT_KIND_SNAPSHOT);
    *first.mutable_job() = it->second.job;
    next = it->second.events_total;
  }
  if (!writer->Write(first)) return grpc::Status::OK;
  if (Ended(first.job().state())) return grpc::Status::OK;
  while (true) {
    std::vector<v1::WatchJobResponse> batch;
    bool ended = false;
    {
      absl::MutexLock lock(&mu_);
      const JobRecord& record = jobs_.at(request.job_id());
      auto ready = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
        return record.events_total > next || shutdown_;
      };
      mu_.AwaitWithTimeout(absl::Condition(&ready), absl::Seconds(0.5));
      if (shutdown_) return Refuse(absl::StatusCode::kUnavailable, "coordinator is shutting down");
      const int64_t oldest = record.events_total - static_cast<int64_t>(record.events.size());
      for (int64_t e = std::max(next, oldest); e < record.events_total; ++e) {
        batch.push_back(record.events[static_cast<size_t>(e - oldest)]);
      }
      next = record.events_total;
      ended = Ended(record.job.state());
    }
    if (context->IsCancelled()) return grpc::Status::CANCELLED;
    for (const v1::WatchJobResponse& event : batch) {
      if (!writer->Write(event)) return grpc::Status::OK;
    }
    if (ended) return grpc::Status::OK;
  }
}

grpc::Status Coordinator::GetCluster(v1::GetClusterResponse* response) {
  absl::MutexLock lock(&mu_);
  ExpireMembersLocked();
  for (bool shards : {true, false}) {
    for (const Member* m : LiveLocked(shards)) {
      v1::Member* out = shards ? response->add_shards() : response->add_workers();
      out->set_member_id(m->id);
      out->set_address(m->address);
      out->set_last_seen_seconds_ago(absl::ToDoubleSeconds(absl::Now() - m->last_seen));
      out->set_job_id(m->job_id);
    }
  }
  return grpc::Status::OK;
}

// ---------------------------------------------------------------------------
// ClusterService

grpc::Status Coordinator::Register(bool shard, const std::string& address, int threads,
                                   const v1::NumericsProfile& numerics, std::string* member_id) {
  if (shard && address.empty()) {
    return Refuse(absl::StatusCode::kInvalidArgument,
                  "address: a shard must give the address it serves on");
  }
  const std::string who = absl::StrCat(shard ? "the shard at " : "the worker at ",
                                       address.empty() ? "?" : address.substr(0, 256));
  if (absl::Status st = CheckSameNumerics(numerics, who, LocalNumerics(), "the coordinator");
      !st.ok()) {
    metrics_.refused_members.Increment();
    Log(std::string(st.message()));
    return Refuse(absl::StatusCode::kFailedPrecondition, std::string(st.message()));
  }
  absl::MutexLock lock(&mu_);
  const std::string id =
      shard ? absl::StrCat("shard-", next_shard_++) : absl::StrCat("worker-", next_worker_++);
  Member& m = members_[id];
  m.id = id;
  m.address = address;
  m.shard = shard;
  m.threads = threads;
  m.last_seen = absl::Now();
  m.order = next_order_++;
  *member_id = id;
  UpdateJobGaugesLocked();
  return grpc::Status::OK;
}

grpc::Status Coordinator::Heartbeat(const v1::HeartbeatRequest& request,
                                    v1::HeartbeatResponse* response) {
  absl::MutexLock lock(&mu_);
  auto it = members_.find(request.member_id());
  if (it == members_.end()) {
    return Refuse(
        absl::StatusCode::kNotFound,
        absl::StrCat("member_id: \"", request.member_id(), "\" is not registered; register again"));
  }
  it->second.last_seen = absl::Now();
  for (const std::string& id : ended_recently_) response->add_ended_job_ids(id);
  return grpc::Status::OK;
}

grpc::Status Coordinator::GetTask(grpc::ServerContext* context, const v1::GetTaskRequest& request,
                                  v1::GetTaskResponse* response) {
  const std::string& id = request.worker_id();
  const double wait = std::min(30.0, std::max(0.0, request.wait_seconds()));
  const absl::Time deadline = absl::Now() + absl::Seconds(wait);
  absl::MutexLock lock(&mu_);
  auto known = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    auto it = members_.find(id);
    return it != members_.end() && !it->second.shard;
  };
  if (!known()) {
    return Refuse(absl::StatusCode::kNotFound,
                  absl::StrCat("worker_id: \"", id, "\" is not registered; register again"));
  }
  members_[id].last_seen = absl::Now();
  // A worker asking for work has finished or abandoned what it was given.
  if (step_ != nullptr) {
    for (TaskRecord& t : step_->tasks) {
      if (t.worker == id && t.delivered && !t.done) {
        t.worker.clear();
        t.delivered = false;
        metrics_.reassignments.Increment();
      }
    }
  }
  TaskRecord* pick = nullptr;
  auto available = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    pick = nullptr;
    if (shutdown_ || !known()) return true;
    if (step_ == nullptr) return false;
    for (TaskRecord& t : step_->tasks) {
      if (!t.done && !t.delivered && t.worker == id) {
        pick = &t;
        return true;
      }
    }
    for (TaskRecord& t : step_->tasks) {
      if (!t.done && t.worker.empty()) {
        pick = &t;
        return true;
      }
    }
    return false;
  };
  while (!available() && absl::Now() < deadline && !context->IsCancelled()) {
    mu_.AwaitWithDeadline(absl::Condition(&available),
                          std::min(deadline, absl::Now() + absl::Milliseconds(250)));
  }
  if (!known()) {
    return Refuse(absl::StatusCode::kNotFound,
                  absl::StrCat("worker_id: \"", id, "\" is not registered; register again"));
  }
  if (pick != nullptr && available()) {
    pick->worker = id;
    pick->delivered = true;
    *response->mutable_task() = pick->task;
    members_[id].job_id = pick->task.job_id();
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::ReportSlots(const v1::ReportSlotsRequest& request,
                                      v1::ReportSlotsResponse* response) {
  absl::MutexLock lock(&mu_);
  if (jobs_.count(request.job_id()) == 0) {
    return UnknownJob(request.job_id());
  }
  if (step_ == nullptr || step_->job_id != request.job_id() || step_->eval ||
      step_->version != request.step()) {
    return Refuse(absl::StatusCode::kFailedPrecondition,
                  absl::StrCat("step: ", request.step(), " of ", request.job_id(),
                               " is not the step in progress"));
  }
  const int slots = static_cast<int>(step_->slots.size());
  for (const v1::SlotStats& s : request.slots()) {
    if (s.slot() < 0 || s.slot() >= slots) {
      return Refuse(absl::StatusCode::kInvalidArgument,
                    absl::StrCat("slots.slot: ", s.slot(), " out of [0, ", slots, ")"));
    }
    if (!std::isfinite(s.loss_sum()) || s.tokens() <= 0) {
      return Refuse(absl::StatusCode::kInvalidArgument,
                    absl::StrCat("slots.loss_sum: slot ", s.slot(), " reports loss_sum ",
                                 s.loss_sum(), " over ", s.tokens(), " tokens"));
    }
    // The loads go to every shard's router-bias update: their shape must be
    // the model's.
    ExpertLoads check(jobs_.at(request.job_id()).job.spec().model());
    if (absl::Status st = check.Add(s.expert_load()); !st.ok()) {
      return Refuse(absl::StatusCode::kInvalidArgument,
                    absl::StrCat("slots.", st.message(), " (slot ", s.slot(), ")"));
    }
  }
  int accepted = 0;
  for (const v1::SlotStats& s : request.slots()) {
    if (!step_->slots[s.slot()].has_value()) {
      step_->slots[s.slot()] = s;
      ++accepted;
    }
  }
  for (TaskRecord& t : step_->tasks) {
    bool all = true;
    for (int s : t.task.slots()) all = all && step_->slots[s].has_value();
    if (all) t.done = true;
  }
  response->set_accepted(accepted);
  return grpc::Status::OK;
}

grpc::Status Coordinator::ReportEval(const v1::ReportEvalRequest& request) {
  absl::MutexLock lock(&mu_);
  if (jobs_.count(request.job_id()) == 0) {
    return UnknownJob(request.job_id());
  }
  if (step_ == nullptr || step_->job_id != request.job_id() || !step_->eval ||
      step_->version != request.version()) {
    return Refuse(absl::StatusCode::kFailedPrecondition,
                  absl::StrCat("version: evaluation of version ", request.version(), " of ",
                               request.job_id(), " is not in progress"));
  }
  const int parts = static_cast<int>(step_->eval_parts_done.size());
  if (request.eval_part() < 0 || request.eval_part() >= parts) {
    return Refuse(absl::StatusCode::kInvalidArgument,
                  absl::StrCat("eval_part: ", request.eval_part(), " out of [0, ", parts, ")"));
  }
  if (step_->eval_total_batches >= 0 && request.total_batches() != step_->eval_total_batches) {
    return Refuse(absl::StatusCode::kInvalidArgument,
                  absl::StrCat("total_batches: ", request.total_batches(),
                               ", another worker reported ", step_->eval_total_batches));
  }
  if (step_->eval_parts_done[request.eval_part()]) return grpc::Status::OK;  // a repeat
  step_->eval_total_batches = request.total_batches();
  for (const v1::EvalBatch& b : request.batches()) step_->eval_batches[b.batch()] = b;
  step_->eval_parts_done[request.eval_part()] = true;
  for (TaskRecord& t : step_->tasks) {
    if (t.task.eval_part() == request.eval_part()) t.done = true;
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::FailTask(const v1::FailTaskRequest& request) {
  absl::MutexLock lock(&mu_);
  if (step_ != nullptr && step_->job_id == request.job_id() && step_->failure.empty()) {
    step_->failure = absl::StrCat("worker ", request.worker_id(), ": ", request.error());
  }
  return grpc::Status::OK;
}

// ---------------------------------------------------------------------------
// Membership

std::vector<const Coordinator::Member*> Coordinator::LiveLocked(bool shards) const {
  std::vector<const Member*> out;
  for (const auto& [id, m] : members_) {
    if (m.shard == shards) out.push_back(&m);
  }
  std::sort(out.begin(), out.end(),
            [](const Member* a, const Member* b) { return a->order < b->order; });
  return out;
}

void Coordinator::ExpireMembersLocked() {
  const absl::Time now = absl::Now();
  for (auto it = members_.begin(); it != members_.end();) {
    if (now - it->second.last_seen > absl::Seconds(options_.lease_seconds)) {
      Log(absl::StrCat(it->first, " (", it->second.address, ") lease expired"));
      if (step_ != nullptr) {
        for (TaskRecord& t : step_->tasks) {
          if (t.worker == it->first && !t.done) {
            t.worker.clear();
            t.delivered = false;
            metrics_.reassignments.Increment();
          }
        }
      }
      it = members_.erase(it);
      UpdateJobGaugesLocked();
    } else {
      ++it;
    }
  }
}

void Coordinator::ReaperLoop() {
  absl::MutexLock lock(&mu_);
  while (!shutdown_) {
    mu_.AwaitWithTimeout(absl::Condition(&shutdown_), absl::Milliseconds(100));
    ExpireMembersLocked();
  }
}

void Coordinator::RunnerLoop() {
  while (true) {
    std::string job_id;
    {
      absl::MutexLock lock(&mu_);
      auto ready = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
        if (shutdown_) return true;
        if (queue_.empty()) return false;
        int shards = 0;
        for (const auto& [id, m] : members_) shards += m.shard ? 1 : 0;
        return shards >= std::max(1, options_.min_shards);
      };
      mu_.Await(absl::Condition(&ready));
      if (shutdown_) return;
      job_id = queue_.front();
      queue_.pop_front();
    }
    RunJob(job_id);
  }
}

}  // namespace muonps
