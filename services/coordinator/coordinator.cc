#include "services/coordinator/coordinator.h"

#include <algorithm>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/confine.h"
#include "common/job_spec.h"
#include "rpc/metrics.h"
#include "rpc/rpc_util.h"
#include "services/coordinator/admission.h"

namespace muonps {
namespace {

constexpr size_t kMaxEvents = 256;
constexpr size_t kEndedRemembered = 32;

double UnixNow() { return absl::ToDoubleSeconds(absl::Now() - absl::UnixEpoch()); }

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
  grpc::Status SubmitJob(grpc::ServerContext* context, const v1::SubmitJobRequest* request,
                         v1::SubmitJobResponse* response) override {
    return c_->SubmitJob(*context, *request, response);
  }
  grpc::Status GetJob(grpc::ServerContext* context, const v1::GetJobRequest* request,
                      v1::GetJobResponse* response) override {
    return c_->GetJob(*context, *request, response);
  }
  grpc::Status ListJobs(grpc::ServerContext* context, const v1::ListJobsRequest*,
                        v1::ListJobsResponse* response) override {
    return c_->ListJobs(*context, response);
  }
  grpc::Status CancelJob(grpc::ServerContext* context, const v1::CancelJobRequest* request,
                         v1::CancelJobResponse* response) override {
    return c_->CancelJob(*context, *request, response);
  }
  grpc::Status WatchJob(grpc::ServerContext* context, const v1::WatchJobRequest* request,
                        grpc::ServerWriter<v1::WatchJobResponse>* writer) override {
    return c_->WatchJob(context, *request, writer);
  }
  grpc::Status GetCluster(grpc::ServerContext* context, const v1::GetClusterRequest*,
                          v1::GetClusterResponse* response) override {
    return c_->GetCluster(*context, response);
  }

 private:
  Coordinator* c_;
};

class Coordinator::ClusterServiceImpl final : public v1::ClusterService::Service {
 public:
  explicit ClusterServiceImpl(Coordinator* c) : c_(c) {}
  grpc::Status RegisterShard(grpc::ServerContext* context, const v1::RegisterShardRequest* request,
                             v1::RegisterShardResponse* response) override {
    std::string id, secret;
    grpc::Status st = c_->Register(*context, true, request->address(), 0, request->memory_bytes(),
                                   request->numerics(), &id, &secret);
    response->set_member_id(id);
    response->set_member_secret(secret);
    response->set_heartbeat_seconds(c_->options_.heartbeat_seconds);
    response->set_lease_seconds(c_->options_.lease_seconds);
    return st;
  }
  grpc::Status RegisterWorker(grpc::ServerContext* context,
                              const v1::RegisterWorkerRequest* request,
                              v1::RegisterWorkerResponse* response) override {
    std::string id, secret;
    grpc::Status st = c_->Register(*context, false, request->address(), request->threads(),
                                   request->memory_bytes(), request->numerics(), &id, &secret);
    response->set_member_id(id);
    response->set_member_secret(secret);
    response->set_heartbeat_seconds(c_->options_.heartbeat_seconds);
    response->set_lease_seconds(c_->options_.lease_seconds);
    return st;
  }
  grpc::Status Heartbeat(grpc::ServerContext* context, const v1::HeartbeatRequest* request,
                         v1::HeartbeatResponse* response) override {
    return c_->Heartbeat(*context, *request, response);
  }
  grpc::Status GetTask(grpc::ServerContext* context, const v1::GetTaskRequest* request,
                       v1::GetTaskResponse* response) override {
    return c_->GetTask(context, *request, response);
  }
  grpc::Status ReportSlots(grpc::ServerContext* context, const v1::ReportSlotsRequest* request,
                           v1::ReportSlotsResponse* response) override {
    return c_->ReportSlots(*context, *request, response);
  }
  grpc::Status ReportEval(grpc::ServerContext* context, const v1::ReportEvalRequest* request,
                          v1::ReportEvalResponse*) override {
    return c_->ReportEval(*context, *request);
  }
  grpc::Status FailTask(grpc::ServerContext* context, const v1::FailTaskRequest* request,
                        v1::FailTaskResponse*) override {
    return c_->FailTask(*context, *request);
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
      global_seconds(
          NewHistogram(r, "muonps_job_global_step_duration_seconds",
                       "Time from the last slot report to every shard having applied the update")),
      recoveries(prometheus::BuildCounter()
                     .Name("muonps_coordinator_recoveries_total")
                     .Help("Jobs recovered without a person, by the role whose loss caused it "
                           "(shard, coordinator)")
                     .Register(r)),
      steps_lost(NewCounter(r, "muonps_coordinator_steps_lost_total",
                            "Optimizer steps computed again because of a recovery")),
      recovery_seconds(NewHistogram(r, "muonps_coordinator_recovery_seconds",
                                    "Seconds from a loss being noticed to the job running again")),
      store_errors(NewCounter(r, "muonps_coordinator_store_errors_total",
                              "Writes to the job store (--state_dir) that failed")),
      attention_logit_max(prometheus::BuildGauge()
                              .Name("muonps_job_attention_logit_max")
                              .Help("Largest pre-softmax attention logit q.k/sqrt(d) over the "
                                    "heads of each layer in the latest step, before QK-Clip")
                              .Register(r)),
      qk_clipped_heads(prometheus::BuildGauge()
                           .Name("muonps_job_qk_clipped_heads")
                           .Help("Attention heads of each layer whose query and key weights "
                                 "QK-Clip rescaled in the latest step")
                           .Register(r)) {}

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
      job_prefix_(absl::StrCat("job-",
                               absl::FormatTime("%Y%m%d%H%M%S", absl::Now(), absl::UTCTimeZone()),
                               "-", RandomHex(2))),
      job_service_(std::make_unique<JobServiceImpl>(this)),
      cluster_service_(std::make_unique<ClusterServiceImpl>(this)) {
  {
    absl::MutexLock lock(&mu_);
    for (const char* role : {"shard", "coordinator"}) metrics_.recoveries.Add({{"role", role}});
    RestoreLocked();
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
  event.set_seq(record.events_total);
  PersistLocked(record, &event);
  record.events.push_back(std::move(event));
  while (record.events.size() > kMaxEvents) record.events.pop_front();
  ++record.events_total;
}

void Coordinator::PersistLocked(const JobRecord& record, const v1::WatchJobResponse* event) {
  if (options_.store == nullptr) return;
  absl::Status st = options_.store->Save(record.seq, record.job, record.cancel_requested, event,
                                         record.events_total, kMaxEvents);
  if (!st.ok()) {
    metrics_.store_errors.Increment();
    Log(absl::StrCat("job store: ", st.message()));
  }
}

void Coordinator::RestoreLocked() {
  if (options_.store == nullptr) return;
  absl::StatusOr<std::vector<StoredJob>> stored = options_.store->Load(kMaxEvents);
  if (!stored.ok()) {
    Log(absl::StrCat("job store: ", stored.status().message()));
    return;
  }
  std::string interrupted;
  for (StoredJob& s : *stored) {
    const std::string id = s.job.job_id();
    JobRecord& record = jobs_[id];
    record.seq = s.seq;
    record.job = std::move(s.job);
    record.cancel_requested = s.cancel_requested;
    record.events.assign(std::make_move_iterator(s.events.begin()),
                         std::make_move_iterator(s.events.end()));
    record.events_total = s.events_total;
    job_order_.push_back(id);
    next_job_ = std::max(next_job_, s.seq + 1);
    if (record.job.state() == v1::JOB_STATE_QUEUED) queue_.push_back(id);
    if (record.job.state() == v1::JOB_STATE_RUNNING) {
      // One job runs at a time; it goes first.
      record.interrupted = true;
      queue_.push_front(id);
      interrupted = id;
    }
  }
  Log(absl::StrCat("job store ", options_.store->path(), ": ", stored->size(), " job(s), ",
                   queue_.size(), " to run", interrupted.empty() ? "" : ", continuing ",
                   interrupted));
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

absl::StatusOr<User> Coordinator::Caller(const grpc::ServerContext& context) const {
  if (options_.users == nullptr) return User{"", /*admin=*/true};
  return options_.users->Authenticate(context);
}

absl::StatusOr<Coordinator::JobRecord*> Coordinator::VisibleJobLocked(const User& user,
                                                                      const std::string& job_id) {
  auto it = jobs_.find(job_id);
  if (it == jobs_.end()) {
    return absl::NotFoundError(absl::StrCat("job_id: no job \"", job_id.substr(0, 128), "\""));
  }
  if (!user.admin && it->second.job.owner() != user.name) {
    return absl::PermissionDeniedError(
        absl::StrCat("job ", job_id, " belongs to another user; only its owner or an admin may ",
                     "see or cancel it"));
  }
  return &it->second;
}

void Coordinator::ForgetOldJobsLocked() {
  size_t ended = 0;
  for (const std::string& id : job_order_) ended += Ended(jobs_.at(id).job.state()) ? 1 : 0;
  for (auto it = job_order_.begin();
       it != job_order_.end() && ended > static_cast<size_t>(options_.max_jobs_remembered);) {
    const JobRecord& record = jobs_.at(*it);
    if (Ended(record.job.state()) && record.watchers == 0) {
      if (options_.store != nullptr) {
        if (absl::Status st = options_.store->Forget(*it); !st.ok()) {
          metrics_.store_errors.Increment();
          Log(absl::StrCat("job store: ", st.message()));
        }
      }
      jobs_.erase(*it);
      it = job_order_.erase(it);
      --ended;
    } else {
      ++it;
    }
  }
}

grpc::Status Coordinator::SubmitJob(const grpc::ServerContext& context,
                                    const v1::SubmitJobRequest& request,
                                    v1::SubmitJobResponse* response) {
  absl::StatusOr<User> user = Caller(context);
  if (!user.ok()) return ToGrpcStatus(user.status());
  v1::JobSpec spec = request.spec();
  FillJobDefaults(&spec);
  if (absl::Status st = ValidateJobSpec(spec); !st.ok()) {
    return Refuse(absl::StatusCode::kInvalidArgument, absl::StrCat("spec.", st.message()));
  }
  if (request.resume_from().size() > kMaxPathBytes) {
    return Refuse(absl::StatusCode::kInvalidArgument, "resume_from: longer than 4096 bytes");
  }
  // Checkpoints are written and read only under the operator's root.
  const std::vector<std::string> roots = options_.checkpoint_root.empty()
                                             ? std::vector<std::string>{}
                                             : std::vector<std::string>{options_.checkpoint_root};
  if (!spec.checkpoint().dir().empty()) {
    absl::StatusOr<std::string> dir =
        ConfinedPath(spec.checkpoint().dir(), roots, "spec.checkpoint.dir");
    if (!dir.ok()) return ToGrpcStatus(dir.status());
  }
  if (!request.resume_from().empty()) {
    absl::StatusOr<std::string> dir = ConfinedPath(request.resume_from(), roots, "resume_from");
    if (!dir.ok()) return ToGrpcStatus(dir.status());
  }
  absl::MutexLock lock(&mu_);
  if (shutdown_) return Refuse(absl::StatusCode::kUnavailable, "coordinator is shutting down");
  // Members report what they may use; until some have, they are assumed to
  // be like the coordinator.
  MemoryLimits limits{options_.memory_limit_bytes, 0, 0};
  int shards = 0;
  for (const auto& [id, m] : members_) {
    int64_t& limit = m.shard ? limits.shard : limits.worker;
    if (m.memory_bytes > 0) limit = limit == 0 ? m.memory_bytes : std::min(limit, m.memory_bytes);
    shards += m.shard ? 1 : 0;
  }
  if (limits.shard == 0) limits.shard = options_.memory_limit_bytes;
  if (limits.worker == 0) limits.worker = options_.memory_limit_bytes;
  if (absl::Status st = AdmitBySize(spec, std::max(shards, options_.min_shards), limits);
      !st.ok()) {
    return ToGrpcStatus(st);
  }
  if (static_cast<int>(queue_.size()) >= options_.max_queued_jobs) {
    return Refuse(absl::StatusCode::kResourceExhausted,
                  absl::StrCat("the queue is full (", queue_.size(),
                               " jobs; --max_queued_jobs): submit again when one has started"));
  }
  const int64_t seq = next_job_++;
  const std::string id = absl::StrFormat("%s-%06d", job_prefix_, seq);
  JobRecord& record = jobs_[id];
  record.seq = seq;
  record.job.set_job_id(id);
  record.job.set_name(spec.name());
  record.job.set_owner(user->name);
  *record.job.mutable_spec() = spec;
  record.job.set_submitted_at(UnixNow());
  record.job.set_resume_from(request.resume_from());
  record.job.mutable_progress()->set_total_steps(spec.schedule().total_steps());
  job_order_.push_back(id);
  queue_.push_back(id);
  SetStateLocked(record, v1::JOB_STATE_QUEUED, "");
  ForgetOldJobsLocked();
  response->set_job_id(id);
  *response->mutable_spec() = spec;
  return grpc::Status::OK;
}

grpc::Status Coordinator::GetJob(const grpc::ServerContext& context,
                                 const v1::GetJobRequest& request, v1::GetJobResponse* response) {
  absl::StatusOr<User> user = Caller(context);
  if (!user.ok()) return ToGrpcStatus(user.status());
  absl::MutexLock lock(&mu_);
  absl::StatusOr<JobRecord*> record = VisibleJobLocked(*user, request.job_id());
  if (!record.ok()) return ToGrpcStatus(record.status());
  *response->mutable_job() = (*record)->job;
  return grpc::Status::OK;
}

grpc::Status Coordinator::ListJobs(const grpc::ServerContext& context,
                                   v1::ListJobsResponse* response) {
  absl::StatusOr<User> user = Caller(context);
  if (!user.ok()) return ToGrpcStatus(user.status());
  absl::MutexLock lock(&mu_);
  for (const std::string& id : job_order_) {
    const v1::Job& job = jobs_.at(id).job;
    if (!user->admin && job.owner() != user->name) continue;
    v1::Job* out = response->add_jobs();
    *out = job;
    out->clear_spec();
    out->clear_placement();
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::CancelJob(const grpc::ServerContext& context,
                                    const v1::CancelJobRequest& request,
                                    v1::CancelJobResponse* response) {
  absl::StatusOr<User> user = Caller(context);
  if (!user.ok()) return ToGrpcStatus(user.status());
  absl::MutexLock lock(&mu_);
  absl::StatusOr<JobRecord*> found = VisibleJobLocked(*user, request.job_id());
  if (!found.ok()) return ToGrpcStatus(found.status());
  JobRecord& record = **found;
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
    PersistLocked(record, nullptr);
  }
  *response->mutable_job() = record.job;
  return grpc::Status::OK;
}

grpc::Status Coordinator::WatchJob(grpc::ServerContext* context, const v1::WatchJobRequest& request,
                                   grpc::ServerWriter<v1::WatchJobResponse>* writer) {
  absl::StatusOr<User> user = Caller(*context);
  if (!user.ok()) return ToGrpcStatus(user.status());
  int64_t next = 0;
  v1::WatchJobResponse first;
  {
    absl::MutexLock lock(&mu_);
    absl::StatusOr<JobRecord*> record = VisibleJobLocked(*user, request.job_id());
    if (!record.ok()) return ToGrpcStatus(record.status());
    if (watchers_ >= options_.max_watchers ||
        (*record)->watchers >= options_.max_watchers_per_job) {
      return Refuse(absl::StatusCode::kResourceExhausted,
                    absl::StrCat("too many watchers (", watchers_, " in all, ", (*record)->watchers,
                                 " on this job): try again later"));
    }
    const int64_t total = (*record)->events_total;
    if (request.has_after_seq() && (request.after_seq() < -1 || request.after_seq() >= total)) {
      return Refuse(absl::StatusCode::kOutOfRange,
                    absl::StrCat("after_seq: ", request.after_seq(), " is not an event of job ",
                                 request.job_id(), " (its events are 0..", total - 1, ")"));
    }
    ++watchers_;
    ++(*record)->watchers;
    if (request.has_after_seq()) {
      next = request.after_seq() + 1;
    } else {
      first.set_kind(v1::JOB_EVENT_KIND_SNAPSHOT);
      *first.mutable_job() = (*record)->job;
      first.set_seq(total - 1);
      next = total;
    }
  }
  // The job stays remembered while watched (ForgetOldJobsLocked).
  struct Release {
    Coordinator* c;
    std::string job_id;
    ~Release() {
      absl::MutexLock lock(&c->mu_);
      --c->watchers_;
      --c->jobs_.at(job_id).watchers;
    }
  } release{this, request.job_id()};
  if (!request.has_after_seq()) {
    if (!writer->Write(first)) return grpc::Status::OK;
    if (Ended(first.job().state())) return grpc::Status::OK;
  }
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
      // A watcher that fell behind the events held is told how many it
      // missed, never skipped silently.
      if (!batch.empty() && oldest > next) batch.front().set_missed(oldest - next);
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
        return static_cast<int>(PlaceableShardsLocked().size()) >= std::max(1, options_.min_shards);
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
