// The stateless worker: it registers with the coordinator, asks for tasks,
// pulls the parameters of the task's version from every shard, computes the
// task (slot gradients, or validation losses), pushes each slot's gradient to
// the shards that own the tensors, reports the slot statistics, and loops.
// A training task's forward pass starts while the pull is still streaming:
// each layer waits only for its own tensors (PullStages). The last wave of
// slots streams its gradients to the shards while its backward pass goes on,
// each stage as soon as it is final (PushStages), from the last layer to the
// embedding; nothing is pushed before every pull has ended and been checked.
// It keeps nothing that cannot be recomputed: killing it loses at most the
// task in progress, which the coordinator hands to another worker.
//
// Its arithmetic is the trainer's: the same model code, the same windows for
// (step, slot, row), the same loss and aux scales. A task whose slots start at
// slot 0 pushes their left-to-right sum ((g0 + g1) + ...) once, which is
// exactly the prefix of the sum the shard forms.
#ifndef MUONPS_WORKERS_WORKER_WORKER_H_
#define MUONPS_WORKERS_WORKER_WORKER_H_

#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <map>
#include <memory>
#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/synchronization/notification.h"
#include "data/batch_sampler.h"
#include "data/token_source.h"
#include "model/backend.h"
#include "model/moe_model.h"
#include "muonps/v1/coordinator.grpc.pb.h"
#include "muonps/v1/shard.grpc.pb.h"
#include "prometheus/counter.h"
#include "prometheus/gauge.h"
#include "prometheus/registry.h"
#include "rpc/membership.h"
#include "workers/worker/pull_stages.h"
#include "workers/worker/push_stages.h"

namespace muonps {

struct WorkerOptions {
  std::string coordinator = "127.0.0.1:7070";
  // Address of the worker's own health service (reported at registration).
  std::string address;
  // Compute threads (slots run concurrently, one per thread).
  int threads = 1;
  // Longest wait of one GetTask call.
  double task_wait_seconds = 2.0;
  // Tensor chunk size on the wire.
  int64_t chunk_bytes = 1 << 20;
  // Fault injection for tests: SIGKILL itself right after this many
  // successful gradient pushes (0 = never), i.e. in the middle of a step.
  int64_t crash_after_pushes = 0;
  // Stream the last wave's gradients to the shards while its backward pass
  // runs (false: push them after it, as whole buffers).
  bool overlap_push = true;
  // How long to keep trying to reach the coordinator at start.
  double register_timeout_seconds = 60.0;
  std::function<void(const std::string&)> log;
  // Called once registered (e.g. to report the health service SERVING).
  std::function<void()> on_registered;
  // Where the worker's metrics go (a private registry when null).
  std::shared_ptr<prometheus::Registry> metrics;
  // Peak FLOP/s of this worker's compute, for model FLOPs utilisation
  // (0 = unknown: the utilisation metric is not exported).
  double peak_flops = 0.0;
  // Sent when registering (rpc/auth.h); empty: none.
  std::string cluster_secret;
  // What this worker may use, reported at registration (0: unknown).
  int64_t memory_bytes = 0;
  // A job's data.path must resolve under one of these (symlinks followed)
  // or under the bundled default corpus (kDefaultCorpusPath).
  std::vector<std::string> data_roots;
  // The compute backend of each lane (slots computed concurrently), e.g. a
  // GPU per lane; null: every lane on the CPU. The parameters live in lane
  // 0's backend memory, each lane's gradient in its own; every backend's
  // memory must be readable by the host and by the other lanes' devices
  // (CUDA managed memory is).
  std::function<absl::StatusOr<std::unique_ptr<ComputeBackend>>(int lane)> backend_factory;
  // What the backends compute on, reported at registration
  // (NumericsProfile.device; empty: the CPU).
  std::string device;
};

// Model FLOPs of one token's forward and backward: 6 x the parameters a token
// meets in matrix products (attention, the dense or the shared and top-k
// routed experts, the router, the LM head) + 12 x layers x T x C for
// attention scores and values (6 x layers x T x H (dqk + dv) under MLA).
double ModelFlopsPerToken(const v1::ModelConfig& model);

class Worker {
 public:
  explicit Worker(const WorkerOptions& options);
  ~Worker();

  // Registers and serves tasks until `stop` becomes true. Returns an error
  // only when the coordinator could not be reached at start.
  absl::Status Run(const std::atomic<bool>& stop);

 private:
  // What the worker caches for the job it is working on; rebuilt for a new job.
  struct JobContext {
    std::string job_id;
    v1::JobSpec spec;
    TokenCorpus corpus;
    std::unique_ptr<BatchSampler> sampler;
    std::vector<int32_t> val_inputs, val_targets;
    int64_t val_windows = 0;
    // Declared before what lives in their memory, so destroyed after it.
    std::vector<std::unique_ptr<ComputeBackend>> backends;  // empty: the CPU
    std::vector<std::unique_ptr<MoeModel>> lanes;
    std::vector<BackendArray<float>> lane_grads;
    std::vector<std::vector<int32_t>> lane_inputs, lane_targets;
    BackendArray<float> params;  // as pulled (bf16 jobs: bf16 values, widened)
    int64_t params_version = -1;
    std::unique_ptr<PullStages> stages;  // what of `params` the current pull has placed
    // The trainable tensors in the order the backward pass finishes them
    // (stage L + 1 down to stage 0, layout order within a stage), and by stage.
    std::vector<const TensorInfo*> push_order;
    std::vector<std::vector<const TensorInfo*>> stage_tensors;
    std::map<std::string, std::shared_ptr<grpc::Channel>> channels;  // by shard address
  };

  absl::Status Prepare(const v1::Task& task);
  // Starts pulling the task's version from every shard on threads of their
  // own (nothing to do when `params` already hold it); FinishPull waits for
  // them and returns the first error. FinishPull may be called again: it
  // returns the same status until the next StartPull.
  void StartPull(const v1::Task& task);
  absl::Status FinishPull(const v1::Task& task);
  absl::Status RunTrain(const v1::Task& task);
  absl::Status RunEval(const v1::Task& task);
  absl::Status Push(const v1::Task& task, int first_slot, int slot_count, const float* grads);
  // One push of a slot range streamed during the backward pass.
  struct StreamedPush {
    int first_slot = 0;
    int slot_count = 1;
    const float* grads = nullptr;
    std::unique_ptr<PushStages> stages;
  };
  // Sends `unit` to every shard and copy of the task, each tensor once
  // `unit.stages` says it is final, after `pull_checked` has been notified
  // with an OK `pull_status`. Returns the first error.
  absl::Status StreamPush(const v1::Task& task, const StreamedPush& unit,
                          const absl::Notification& pull_checked, const absl::Status& pull_status);
  // Counts one completed push; the crash_after_pushes fault injection.
  void CountPush();
  grpc::Channel* Channel(const std::string& address);
  void Log(const std::string& line);

  struct Metrics {
    explicit Metrics(prometheus::Registry& registry);
    prometheus::Family<prometheus::Counter>& seconds;      // {phase}
    prometheus::Family<prometheus::Gauge>& last_seconds;   // {phase}
    prometheus::Family<prometheus::Counter>& tasks;        // {kind}
    prometheus::Family<prometheus::Gauge>& expert_tokens;  // {layer, expert}
    prometheus::Counter& tokens;
    prometheus::Gauge& flops_per_second;
    prometheus::Gauge* mfu = nullptr;  // only with a known peak
  };
  void RecordPhase(const std::string& phase, double seconds);
  static double Since(std::chrono::steady_clock::time_point start);  // seconds

  const WorkerOptions options_;
  std::shared_ptr<prometheus::Registry> registry_;
  Metrics metrics_;
  std::map<std::string, double> task_seconds_;  // phases of the task in progress
  std::unique_ptr<Membership> membership_;
  std::unique_ptr<JobContext> job_;
  // Jobs the coordinator reported ended (heartbeats); their context is dropped.
  absl::Mutex ended_mu_;
  std::set<std::string> ended_ ABSL_GUARDED_BY(ended_mu_);
  int64_t pushes_ = 0;
  // The pull in progress.
  std::vector<std::thread> pull_threads_;
  std::vector<absl::Status> pull_status_;
  std::atomic<int> pulls_running_{0};
  absl::Status pull_result_;
  std::chrono::steady_clock::time_point pull_start_;
};

}  // namespace muonps

#endif  // MUONPS_WORKERS_WORKER_WORKER_H_
