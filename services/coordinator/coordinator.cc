#include "services/coordinator/coordinator.h"

#include <algorithm>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/job_spec.h"
#include "rpc/metrics.h"
#include "rpc/rpc_util.h"

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
