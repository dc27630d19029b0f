#include "services/coordinator/coordinator.h"

#include <algorithm>
#include <cmath>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/job_spec.h"
#include "common/model_layout.h"
#include "services/coordinator/placement.h"
#include "services/optimizer/lr_schedule.h"
#include "services/server/metrics.h"
#include "services/server/rpc_util.h"
#include "trainer/checkpoint.h"

namespace muonps {
namespace {

constexpr size_t kMaxEvents = 256;
constexpr size_t kEndedRemembered = 32;

double UnixNow() { return absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch()); }

bool Ended(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}


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
    grpc::Status st = c_->Register(true, request->address(), 0, &id);
    response->set_member_id(id);
    response->set_heartbeat_seconds(c_->options_.heartbeat_seconds);
    response->set_lease_seconds(c_->options_.lease_seconds);
    return st;
  }
  grpc::Status RegisterWorker(grpc::ServerContext*, const v1::RegisterWorkerRequest* request,
                              v1::RegisterWorkerResponse* response) override {
    std::string id;
    grpc::Status st = c_->Register(false, request->address(), request->threads(), &id);
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
      step(NewGauge(r, "muonps_job_step", "Optimizer steps completed by the running (or last) job")),
      total_steps(NewGauge(r, "muonps_job_total_steps", "schedule.total_steps of the running (or last) job")),
      train_loss(NewGauge(r, "muonps_job_train_loss", "Mean training cross-entropy of the latest step (nats/token)")),
      val_loss(NewGauge(r, "muonps_job_validation_loss", "Latest validation loss (nats/token)")),
      tokens_per_second(NewGauge(r, "muonps_job_tokens_per_second", "Training tokens per second since the job started")),
      grad_norm(NewGauge(r, "muonps_job_grad_norm", "Global gradient norm of the latest step, before clipping")),
      learning_rate(NewGauge(r, "muonps_job_learning_rate", "Learning rate of the latest step")),
      load_ratio(NewGauge(r, "muonps_job_expert_load_max_ratio",
                          "Max over MoE layers of the most loaded expert's tokens over the mean, latest step")),
      workers(NewGauge(r, "muonps_cluster_workers", "Workers with a live lease")),
      shards(NewGauge(r, "muonps_cluster_shards", "Optimizer shards with a live lease")),
      step_workers(NewGauge(r, "muonps_job_step_workers", "Workers that computed slots of the latest step")),
      tokens(NewCounter(r, "muonps_job_tokens_total", "Training tokens consumed by completed steps")),
      steps(NewCounter(r, "muonps_job_steps_total", "Optimizer steps completed")),
      reassignments(NewCounter(r, "muonps_coordinator_task_reassignments_total",
                               "Tasks taken from a worker (lease expired or abandoned) and offered again")),
      step_seconds(NewHistogram(r, "muonps_job_step_duration_seconds",
                                "Wall time of an optimizer step, including its evaluation")),
      global_seconds(NewHistogram(r, "muonps_job_global_step_duration_seconds",
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
    return Refuse(absl::StatusCode::kNotFound, absl::StrCat("job_id: no job \"", request.job_id(), "\""));
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
    return Refuse(absl::StatusCode::kNotFound, absl::StrCat("job_id: no job \"", request.job_id(), "\""));
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
      return Refuse(absl::StatusCode::kNotFound,
                    absl::StrCat("job_id: no job \"", request.job_id(), "\""));
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
                                   std::string* member_id) {
  if (shard && address.empty()) {
    return Refuse(absl::StatusCode::kInvalidArgument, "address: a shard must give the address it serves on");
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
    return Refuse(absl::StatusCode::kNotFound,
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
    return Refuse(absl::StatusCode::kNotFound, absl::StrCat("job_id: no job \"", request.job_id(), "\""));
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
    return Refuse(absl::StatusCode::kNotFound, absl::StrCat("job_id: no job \"", request.job_id(), "\""));
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
                  absl::StrCat("total_batches: ", request.total_batches(), ", another worker reported ",
                               step_->eval_total_batches));
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
  std::sort(out.begin(), out.end(), [](const Member* a, const Member* b) { return a->order < b->order; });
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

// ---------------------------------------------------------------------------
// Running a job

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
    absl::Status st = FromGrpcStatus(stubs[i]->LoadJob(&context, request, &response),
                                     shard_call(i, "LoadJob"));
    versions[i] = response.version();
    return st;
  });
  if (!loaded.ok()) return finish(v1::JOB_STATE_FAILED, std::string(loaded.message()));
  const int64_t start_step = versions[0];
  for (int i = 1; i < n; ++i) {
    if (versions[i] != start_step) {
      return finish(v1::JOB_STATE_FAILED,
                    absl::StrCat("shards resumed at different steps (", start_step, " and ",
                                 versions[i], ")"));
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
  const int64_t global_tokens =
      static_cast<int64_t>(slots) * spec.batch().micro_batch() * spec.model().max_position_embeddings();
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
          return absl::UnavailableError(absl::StrCat(
              "shard ", s.id, " (", s.address, ") stopped heartbeating; resume from the last checkpoint"));
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
        for (int s = k * slots / count; s < (k + 1) * slots / count; ++s) t.task.add_slots(s);
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
    st = WriteCheckpointIndex(*staging, n, layout, spec.optimizer().name(), placement.owner, trainer);
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
    std::vector<std::vector<int64_t>> loads;
    for (const v1::SlotStats& s : stats) {
      loss_sum += s.loss_sum();
      if (loads.empty()) loads.resize(s.expert_load_size());
      for (int l = 0; l < s.expert_load_size() && l < static_cast<int>(loads.size()); ++l) {
        const auto& counts = s.expert_load(l).tokens();
        if (loads[l].empty()) loads[l].assign(counts.size(), 0);
        for (int e = 0; e < counts.size() && e < static_cast<int>(loads[l].size()); ++e) {
          loads[l][e] += counts[e];
        }
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
        return stop(absl::InternalError(absl::StrCat("no shard reported the gradient of ", t.name)), step);
      }
      sq += it->second;
    }
    const double norm = std::sqrt(sq);
    if (!std::isfinite(norm)) {
      return stop(absl::InternalError(absl::StrCat("gradient is not finite at step ", step + 1)), step);
    }
    const double max_norm = spec.optimizer().max_grad_norm();
    const double coef = max_norm > 0.0 ? max_norm / (norm + 1e-6) : 1.0;
    const double lr = ScheduledLr(spec.optimizer().lr(), step, total,
                                  spec.schedule().warmup_steps(), spec.schedule().min_lr_ratio());
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
      for (const auto& layer : loads) {
        v1::ExpertLoad* out = request.add_expert_load();
        for (int64_t x : layer) out->add_tokens(x);
      }
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
      double ratio = 0.0;
      for (const auto& layer : loads) {
        int64_t sum = 0, peak = 0;
        for (int64_t x : layer) {
          sum += x;
          peak = std::max(peak, x);
        }
        if (sum > 0) ratio = std::max(ratio, static_cast<double>(peak) * layer.size() / sum);
      }
      p->set_max_load_ratio(ratio);
      p->set_workers(workers_used);
      EmitLocked(record, v1::JOB_EVENT_KIND_STEP);
      metrics_.step.Set(static_cast<double>(done));
      metrics_.total_steps.Set(static_cast<double>(total));
      metrics_.train_loss.Set(loss);
      if (last_val.has_value()) metrics_.val_loss.Set(*last_val);
      metrics_.tokens_per_second.Set(p->tokens_per_second());
      metrics_.grad_norm.Set(norm);
      metrics_.learning_rate.Set(lr);
      metrics_.load_ratio.Set(ratio);
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
