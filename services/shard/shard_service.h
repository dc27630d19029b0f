// The optimizer shard's gRPC service (proto/muonps/v1/shard.proto) over a
// ShardState: it holds one job at a time, streams parameters at the version a
// worker asks for (waiting for it), takes whole gradient pushes, and runs the
// coordinator's global steps. Every refusal is a precise status and leaves the
// state as it was.
#ifndef MUONPS_SERVICES_SHARD_SHARD_SERVICE_H_
#define MUONPS_SERVICES_SHARD_SHARD_SERVICE_H_

#include <future>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/string_view.h"
#include "absl/synchronization/mutex.h"
#include "muonps/v1/shard.grpc.pb.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"
#include "services/shard/shard_state.h"

namespace muonps {

// PullParameters and PushGradients are raw callback methods (no thread waits
// for a version; payloads are sent from and decoded into place); the other
// methods are synchronous.
class ShardServiceImpl final
    : public v1::ShardService::WithRawCallbackMethod_PullParameters<
          v1::ShardService::WithRawCallbackMethod_PushGradients<v1::ShardService::Service>> {
 public:
  // Metrics go to `metrics` (a private registry when null).
  explicit ShardServiceImpl(std::shared_ptr<prometheus::Registry> metrics = nullptr);
  ~ShardServiceImpl() override;
  // Muon's Newton-Schulz for every job loaded from now on runs on `o`
  // (null: the CPU); `o` must outlive the service.
  void set_orthogonalizer(Orthogonalizer* o) { orthogonalizer_ = o; }
  // Wakes waiting pulls so the server can shut down.
  void Shutdown();

  grpc::Status LoadJob(grpc::ServerContext* context, const v1::LoadJobRequest* request,
                       v1::LoadJobResponse* response) override;
  grpc::Status DropJob(grpc::ServerContext* context, const v1::DropJobRequest* request,
                       v1::DropJobResponse* response) override;
  grpc::ServerWriteReactor<grpc::ByteBuffer>* PullParameters(
      grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) override;
  grpc::ServerReadReactor<grpc::ByteBuffer>* PushGradients(grpc::CallbackServerContext* context,
                                                           grpc::ByteBuffer* response) override;
  grpc::Status GetGradientSquares(grpc::ServerContext* context,
                                  const v1::GetGradientSquaresRequest* request,
                                  v1::GetGradientSquaresResponse* response) override;
  grpc::Status ApplyStep(grpc::ServerContext* context, const v1::ApplyStepRequest* request,
                         v1::ApplyStepResponse* response) override;
  grpc::Status SaveCheckpoint(grpc::ServerContext* context,
                              const v1::SaveCheckpointRequest* request,
                              v1::SaveCheckpointResponse* response) override;

  // Who may call (rpc/auth.h). After RequireMemberSecret() every call needs
  // the secret the coordinator issued at registration (SetMemberSecret;
  // until then calls are UNAVAILABLE), except pushes and pulls, which may
  // instead carry the held job's key. The muonps shard command requires it;
  // an in-process service that never calls it checks nothing (tests).
  void RequireMemberSecret();
  void SetMemberSecret(const std::string& secret);
  // Confines checkpoint directories (SaveCheckpoint.dir, LoadJob.resume_from)
  // to `roots` (common/confine.h); no roots: no checkpoint I/O. Not called:
  // unconfined (tests).
  void ConfineCheckpoints(const std::vector<std::string>& roots);

  // The held job's id ("" when none) and version, for tests and metrics.
  std::string job_id() const;
  int64_t version() const;

 private:
  Orthogonalizer* orthogonalizer_ = nullptr;
  // OK when the caller may make a call: the coordinator (the member
  // secret), or for a push or pull (`worker_call`) the held job's workers.
  // `run`, when given, receives the number of the job's current load (see
  // ShardState::StartGeneration), so a push authorized before a new load is
  // refused when it adds its gradients.
  absl::Status Authorize(const grpc::ServerContextBase& context, bool worker_call,
                         int64_t* run = nullptr) const;
  // Whether ConfineCheckpoints was called; `path` confined to the roots then.
  bool Confined() const;
  absl::StatusOr<std::string> CheckpointPath(const std::string& path,
                                             absl::string_view field) const;
  // The state of `job_id`, or NOT_FOUND.
  absl::StatusOr<std::shared_ptr<ShardState>> Find(const std::string& job_id) const;

  class PushSession;
  class PushReactor;
  class PullReactor;
  // Makes `state` the held job (replacing another one only with `replace`).
  absl::Status Install(const std::string& job_id, const std::string& job_key,
                       const std::vector<std::string>& tensors,
                       const std::vector<std::string>& replicas, std::shared_ptr<ShardState> state,
                       bool replace);
  // Pulls in progress: woken when the version, the job or shutdown changes,
  // and by a timer for their deadlines; finished ones are deleted there.
  void WakePulls();
  // Asks the timer thread to wake the pulls now (a tensor was published):
  // callable from any thread holding no lock of the service's.
  void RequestWake();
  void PullTimerLoop();
  absl::Mutex wake_mu_;
  bool wake_requested_ ABSL_GUARDED_BY(wake_mu_) = false;
  bool timer_stop_ ABSL_GUARDED_BY(wake_mu_) = false;
  absl::Mutex pulls_mu_;  // taken before a reactor's lock, which is taken before mu_
  std::set<PullReactor*> pulls_ ABSL_GUARDED_BY(pulls_mu_);
  std::thread pull_timer_;
  struct Metrics {
    explicit Metrics(prometheus::Registry& registry);
    prometheus::Gauge &tensors, &parameter_bytes, &state_bytes, &version, &muon_rms, &adamw_rms;
    prometheus::Counter &pushed_bytes, &pulled_bytes, &steps;
    prometheus::Histogram &push_seconds, &pull_seconds, &apply_seconds, &muon_seconds,
        &adamw_seconds;
  };
  std::shared_ptr<prometheus::Registry> registry_;
  Metrics metrics_;

  mutable absl::Mutex mu_;
  std::string job_id_ ABSL_GUARDED_BY(mu_);
  std::vector<std::string> tensors_ ABSL_GUARDED_BY(mu_);   // owned, as loaded
  std::vector<std::string> replicas_ ABSL_GUARDED_BY(mu_);  // replicated, as loaded
  std::vector<std::string> served_ ABSL_GUARDED_BY(mu_);    // owned, in layout order
  std::shared_ptr<ShardState> state_ ABSL_GUARDED_BY(mu_);
  int64_t version_ ABSL_GUARDED_BY(mu_) = 0;  // mirrors state_->version() for waits
  int64_t run_ ABSL_GUARDED_BY(mu_) = 0;      // loads of jobs so far
  bool shutdown_ ABSL_GUARDED_BY(mu_) = false;
  bool require_secret_ ABSL_GUARDED_BY(mu_) = false;
  std::string member_secret_ ABSL_GUARDED_BY(mu_);
  std::string job_key_ ABSL_GUARDED_BY(mu_);  // of the held job
  std::optional<std::vector<std::string>> checkpoint_roots_ ABSL_GUARDED_BY(mu_);
  // The checkpoint part written in the background (SaveCheckpoint with
  // `background`), at most one: whose it is and its outcome (bytes written).
  // Destroying the last copy of `done` waits for the write.
  struct CheckpointWrite {
    std::string job_id, dir;
    int64_t version = 0;
    int index = 0, count = 0;
    std::shared_future<absl::StatusOr<int64_t>> done;
  };
  absl::Mutex write_mu_;
  std::optional<CheckpointWrite> write_ ABSL_GUARDED_BY(write_mu_);
};

}  // namespace muonps

#endif  // MUONPS_SERVICES_SHARD_SHARD_SERVICE_H_
