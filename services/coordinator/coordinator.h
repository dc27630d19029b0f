// The coordinator: the user-facing JobService and the ClusterService that
// shards and workers call (proto/muonps/v1/coordinator.proto).
//
// Jobs queue first-in first-out; one runner thread runs them one at a time:
//   1. place the job's tensors on the registered shards (placement.h) and
//      load them there (fresh, or from a checkpoint);
//   2. per step: split the slots into contiguous tasks, one per live worker;
//      workers pull parameters, push slot gradients to the shards and report
//      slot statistics; a task whose worker's lease expires goes to another
//      worker;
//   3. once every slot is reported: the global gradient norm from the shards'
//      per-tensor sums of squares (added in layout order), the clipping
//      coefficient, the learning rate and the expert loads summed over slots
//      go to every shard's ApplyStep;
//   4. validation every eval_every steps (and at the end) as evaluation tasks;
//      checkpoints in the HF sharded layout.
// Every quantity is formed in the same order as in `muonps train`, so the
// result is bit-identical to it for any number of shards and workers.
#ifndef MUONPS_SERVICES_COORDINATOR_COORDINATOR_H_
#define MUONPS_SERVICES_COORDINATOR_COORDINATOR_H_

#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <optional>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "muonps/v1/coordinator.grpc.pb.h"
#include "muonps/v1/shard.grpc.pb.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "rpc/auth.h"
#include "services/coordinator/job_store.h"

namespace muonps {

struct CoordinatorOptions {
  // Members heartbeat this often and lose their lease after lease_seconds.
  double heartbeat_seconds = 0.5;
  double lease_seconds = 3.0;
  // A queued job starts once this many shards are registered.
  int min_shards = 1;
  // Deadline of the coordinator's calls to shards.
  double shard_rpc_seconds = 300.0;
  // Called with one line of log text (job start with its placement, ends).
  std::function<void(const std::string&)> log;
  // Where the coordinator's metrics go (a private registry when null).
  std::shared_ptr<prometheus::Registry> metrics;

  // Who may call (rpc/auth.h). With a cluster secret, registering needs it
  // (metadata x-muonps-cluster-secret); without, anyone who reaches the port
  // may register (loopback clusters and tests).
  std::string cluster_secret;
  // With tokens, every JobService call needs a bearer token, jobs belong to
  // their submitter, and only the owner or an admin sees or cancels them.
  // Without (null), callers are anonymous and see every job.
  std::shared_ptr<const UserTokens> users;

  // Bounds on what callers can make the coordinator hold.
  int max_queued_jobs = 64;        // queued jobs, all users together
  int max_jobs_remembered = 1000;  // ended jobs beyond this are forgotten, oldest first
  int max_watchers = 64;           // concurrent WatchJob streams
  int max_watchers_per_job = 16;
  // A worker that holds a task this long without reporting it loses it to
  // another worker (its late report is refused). 0: no deadline.
  double task_timeout_seconds = 600.0;
  // Hand out a step's tasks before the previous step's ApplyStep is sent
  // when nothing comes between the two (an evaluation, a shard leaving):
  // workers pull each tensor's new version as the shards publish it and
  // start the forward pass on the first layers while the last ones are
  // still being updated. The bits are the same either way.
  bool plan_ahead = true;
  // What the coordinator may use, and what members that do not report their
  // own limit are assumed to have (0: not checked). See admission.h.
  int64_t memory_limit_bytes = 0;
  // Directory under which every checkpoint.dir and resume_from must resolve
  // (symlinks followed). Empty: jobs may neither write nor read checkpoints.
  std::string checkpoint_root;
  // Where jobs outlive the coordinator (job_store.h; --state_dir). The
  // coordinator takes up the jobs it holds: queued ones queue again in
  // their order, ended ones are listed, and a running one continues on its
  // own, from the shards' current step when they still hold it, else from
  // its last checkpoint. Null: jobs live in memory only.
  std::shared_ptr<JobStore> store;
  // A running job recovers from a lost shard (or coordinator) at most this
  // many times in a row without completing a step, then fails.
  int max_recoveries_without_progress = 8;
};

class Coordinator {
 public:
  explicit Coordinator(const CoordinatorOptions& options);
  ~Coordinator();

  // The two services to register on a server.
  grpc::Service* job_service();
  grpc::Service* cluster_service();

  // Stops the runner (a running job is cancelled) and wakes every waiting call.
  void Shutdown();

 private:
  class JobServiceImpl;
  class ClusterServiceImpl;
  class JobRun;  // one running job, from placement to its end (job_run.cc)
  friend class JobServiceImpl;
  friend class ClusterServiceImpl;
  friend class JobRun;

  struct Member {
    std::string id, address, secret;
    bool shard = false;
    int threads = 0;
    int64_t memory_bytes = 0;  // what it may use, as reported (0: unknown)
    std::string device;        // NumericsProfile.device (empty: the CPU)
    absl::Time last_seen;
    int64_t order = 0;  // registration order
    std::string job_id;
    bool draining = false;  // leaving (HeartbeatRequest.draining): no new work
    // Heartbeated since it registered: it holds the secret the coordinator
    // issued (its calls to a shard carry it), so a shard is placed only then.
    bool confirmed = false;
  };
  struct TaskRecord {
    v1::Task task;
    std::string worker;  // assigned worker; empty = anyone may take it
    bool delivered = false;
    bool done = false;
    absl::Time delivered_at;
  };
  struct JobRecord {
    int64_t seq = 0;  // submission order; the job id's sequence number
    v1::Job job;
    bool cancel_requested = false;
    // Running when the coordinator stopped: it continues from the shards'
    // state or its last checkpoint.
    bool interrupted = false;
    std::deque<v1::WatchJobResponse> events;  // the latest kMaxEvents
    int64_t events_total = 0;                 // events ever appended
    int watchers = 0;                         // WatchJob streams open on it
  };
  // The step in progress of the running job.
  struct StepRun {
    std::string job_id;
    int64_t version = 0;
    bool eval = false;
    std::vector<std::optional<v1::SlotStats>> slots;
    std::map<int64_t, v1::EvalBatch> eval_batches;
    std::vector<bool> eval_parts_done;
    int64_t eval_total_batches = -1;
    std::vector<TaskRecord> tasks;
    std::string failure;  // set by FailTask
  };

  // JobService. Every call first authenticates its caller (Caller).
  grpc::Status SubmitJob(const grpc::ServerContext& context, const v1::SubmitJobRequest& request,
                         v1::SubmitJobResponse* response);
  grpc::Status GetJob(const grpc::ServerContext& context, const v1::GetJobRequest& request,
                      v1::GetJobResponse* response);
  grpc::Status ListJobs(const grpc::ServerContext& context, v1::ListJobsResponse* response);
  grpc::Status CancelJob(const grpc::ServerContext& context, const v1::CancelJobRequest& request,
                         v1::CancelJobResponse* response);
  grpc::Status WatchJob(grpc::ServerContext* context, const v1::WatchJobRequest& request,
                        grpc::ServerWriter<v1::WatchJobResponse>* writer);
  grpc::Status GetCluster(const grpc::ServerContext& context, v1::GetClusterResponse* response);
  // The calling user: anonymous (an admin) without tokens, else the token's
  // user or UNAUTHENTICATED.
  absl::StatusOr<User> Caller(const grpc::ServerContext& context) const;
  // The job `job_id` if `user` may see it: NOT_FOUND when it does not exist,
  // PERMISSION_DENIED when it is another user's.
  absl::StatusOr<JobRecord*> VisibleJobLocked(const User& user, const std::string& job_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Forgets the oldest ended jobs beyond max_jobs_remembered.
  void ForgetOldJobsLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // ClusterService.
  // Refuses (FAILED_PRECONDITION, naming both kernels) a member whose
  // numerics are not the coordinator's LocalNumerics(), and (UNAUTHENTICATED)
  // one without the cluster secret when there is one.
  grpc::Status Register(const grpc::ServerContext& context, bool shard, const std::string& address,
                        int threads, int64_t memory_bytes, const v1::NumericsProfile& numerics,
                        std::string* member_id, std::string* member_secret);
  grpc::Status Heartbeat(const grpc::ServerContext& context, const v1::HeartbeatRequest& request,
                         v1::HeartbeatResponse* response);
  grpc::Status GetTask(grpc::ServerContext* context, const v1::GetTaskRequest& request,
                       v1::GetTaskResponse* response);
  grpc::Status ReportSlots(const grpc::ServerContext& context,
                           const v1::ReportSlotsRequest& request,
                           v1::ReportSlotsResponse* response);
  grpc::Status ReportEval(const grpc::ServerContext& context, const v1::ReportEvalRequest& request);
  grpc::Status FailTask(const grpc::ServerContext& context, const v1::FailTaskRequest& request);
  // The caller is member `id` (of the kind `shard`) presenting its secret:
  // NOT_FOUND for an unknown id (the member registers again),
  // UNAUTHENTICATED without the secret.
  grpc::Status AuthenticateMemberLocked(const grpc::ServerContext& context, const std::string& id,
                                        bool shard) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The task `task_id` of the step in progress, held by `worker_id`:
  // FAILED_PRECONDITION otherwise (a report from a worker that does not hold
  // the task, or one whose task was given to another worker).
  absl::StatusOr<TaskRecord*> HeldTaskLocked(const std::string& worker_id,
                                             const std::string& task_id)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Tasks held past task_timeout_seconds go back to the pool.
  void ExpireTasksLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  void RunnerLoop();
  void ReaperLoop();
  // Runs one job to its end; returns the final state and message.
  void RunJob(const std::string& job_id);
  void ExpireMembersLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<const Member*> LiveLocked(bool shards) const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // The live shards a job may be placed on: not leaving, and confirmed (a
  // shard just registered does not yet hold the secret the coordinator's
  // calls carry). In registration order.
  std::vector<const Member*> PlaceableShardsLocked() const ABSL_SHARED_LOCKS_REQUIRED(mu_);
  // Appends an event to the job's log (and the store, with the job).
  void EmitLocked(JobRecord& record, v1::JobEventKind kind) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Writes the job to the store without an event (e.g. a cancel request).
  void PersistLocked(const JobRecord& record, const v1::WatchJobResponse* event)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Takes up the jobs of options_.store.
  void RestoreLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void SetStateLocked(JobRecord& record, v1::JobState state, const std::string& error)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void Log(const std::string& line);

  // Metrics (Prometheus naming; no job or task ids in labels).
  struct Metrics {
    explicit Metrics(prometheus::Registry& registry);
    prometheus::Family<prometheus::Gauge>& jobs;  // {state}
    prometheus::Gauge &step, &total_steps, &train_loss, &val_loss, &tokens_per_second, &grad_norm,
        &learning_rate, &load_ratio, &workers, &shards, &step_workers;
    prometheus::Counter &tokens, &steps, &reassignments, &refused_members;
    prometheus::Histogram &step_seconds, &global_seconds;
    // Recoveries by the role whose loss caused them (shard, coordinator),
    // the steps they recomputed, the seconds from loss to running again.
    prometheus::Family<prometheus::Counter>& recoveries;
    prometheus::Counter& steps_lost;
    prometheus::Histogram& recovery_seconds;
    prometheus::Counter& store_errors;
    // QK-Clip: each layer's largest attention logit and clipped heads.
    prometheus::Family<prometheus::Gauge>& attention_logit_max;  // {layer}
    prometheus::Family<prometheus::Gauge>& qk_clipped_heads;     // {layer}
  };
  void UpdateJobGaugesLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const CoordinatorOptions options_;
  std::shared_ptr<prometheus::Registry> registry_;
  Metrics metrics_;
  const absl::Time started_ = absl::Now();
  const std::string job_prefix_;  // "job-", the start time and a nonce, see Job.job_id
  std::unique_ptr<JobServiceImpl> job_service_;
  std::unique_ptr<ClusterServiceImpl> cluster_service_;

  mutable absl::Mutex mu_;
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  std::map<std::string, Member> members_ ABSL_GUARDED_BY(mu_);
  int64_t next_order_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_job_ ABSL_GUARDED_BY(mu_) = 1;
  int watchers_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t next_task_ ABSL_GUARDED_BY(mu_) = 1;
  std::map<std::string, JobRecord> jobs_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> job_order_ ABSL_GUARDED_BY(mu_);  // submission order
  std::deque<std::string> queue_ ABSL_GUARDED_BY(mu_);
  std::deque<std::string> ended_recently_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<StepRun> step_ ABSL_GUARDED_BY(mu_);  // the running job's step
  std::thread runner_, reaper_;
};

}  // namespace muonps

#endif  // MUONPS_SERVICES_COORDINATOR_COORDINATOR_H_
