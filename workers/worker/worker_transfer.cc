// The worker's transfers: the pull of a task's parameters, shard by shard
// and layer by layer, and the pushes of its gradients (whole, or streamed
// while the backward pass runs).
#include <grpcpp/channel.h>
#include <signal.h>

#include <set>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/job_spec.h"
#include "common/status_macros.h"
#include "rpc/shard_client.h"
#include "workers/worker/worker.h"

namespace muonps {

void Worker::StartPull(const v1::Task& task) {
  pull_result_ = absl::OkStatus();
  pull_start_ = std::chrono::steady_clock::now();
  if (job_->params_version == task.version()) {
    job_->stages->MarkAll();
    return;
  }
  job_->params_version = -1;
  job_->stages->Reset();
  const ModelLayout& layout = job_->lanes[0]->layout();
  const int n = task.shards_size();
  pull_status_.assign(static_cast<size_t>(n), absl::OkStatus());
  if (n == 0) {
    job_->stages->Finished();
    return;
  }
  std::vector<grpc::Channel*> channels;
  for (const v1::ShardRoute& route : task.shards()) channels.push_back(Channel(route.address()));
  pulls_running_.store(n);
  PullStages* stages = job_->stages.get();
  for (int i = 0; i < n; ++i) {
    pull_threads_.emplace_back([this, &layout, task, channel = channels[i], i, stages] {
      const v1::ShardRoute& route = task.shards(i);
      pull_status_[i] = PullParameters(
          channel, layout, task.job_id(), task.job_key(), task.version(), route.tensors_size(),
          600.0, options_.chunk_bytes, job_->params.data(),
          absl::StrCat("shard ", route.shard_id(), " (", route.address(), "): PullParameters"),
          TransferDtypeOf(job_->spec), [stages](const TensorInfo& t) { stages->Arrived(t); });
      // The last pull to end lets every waiting stage go: what it computes
      // is used only if every pull succeeded.
      if (pulls_running_.fetch_sub(1) == 1) stages->Finished();
    });
  }
}

absl::Status Worker::FinishPull(const v1::Task& task) {
  if (pull_threads_.empty()) return pull_result_;
  for (std::thread& t : pull_threads_) t.join();
  pull_threads_.clear();
  for (const absl::Status& st : pull_status_) {
    if (!st.ok()) {
      pull_result_ = st;
      return pull_result_;
    }
  }
  job_->params_version = task.version();
  return pull_result_;
}

absl::Status Worker::Push(const v1::Task& task, int first_slot, int slot_count,
                          const float* grads) {
  const auto push_start = std::chrono::steady_clock::now();
  const ModelLayout& layout = job_->lanes[0]->layout();
  const int n = task.shards_size();
  std::vector<absl::Status> status(static_cast<size_t>(n));
  PushTarget target;
  target.job_id = task.job_id();
  target.step = task.version();
  target.first_slot = first_slot;
  target.slot_count = slot_count;
  target.job_key = task.job_key();
  std::vector<grpc::Channel*> channels;
  for (const v1::ShardRoute& route : task.shards()) channels.push_back(Channel(route.address()));
  auto push_one = [&](int i) -> absl::Status {
    const v1::ShardRoute& route = task.shards(i);
    // Its own tensors and its replicas: every copy applies the same update.
    std::vector<std::string> tensors(route.tensors().begin(), route.tensors().end());
    tensors.insert(tensors.end(), route.replicas().begin(), route.replicas().end());
    return PushGradients(
        channels[i], layout, tensors, target, grads, TransferDtypeOf(job_->spec),
        options_.chunk_bytes,
        absl::StrCat("shard ", route.shard_id(), " (", route.address(), "): PushGradients"));
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) threads.emplace_back([&, i] { status[i] = push_one(i); });
  for (std::thread& t : threads) t.join();
  for (const absl::Status& st : status) MUONPS_RETURN_IF_ERROR(st);
  RecordPhase("push", Since(push_start));
  CountPush();
  return absl::OkStatus();
}

void Worker::CountPush() {
  ++pushes_;
  if (options_.crash_after_pushes > 0 && pushes_ >= options_.crash_after_pushes) {
    Log(absl::StrCat("crash_after_pushes: killing this worker after ", pushes_, " pushes"));
    raise(SIGKILL);
  }
}

absl::Status Worker::StreamPush(const v1::Task& task, const StreamedPush& unit,
                                const absl::Notification& pull_checked,
                                const absl::Status& pull_status) {
  const ModelLayout& layout = job_->lanes[0]->layout();
  const int layers = job_->spec.model().num_hidden_layers();
  const int n = task.shards_size();
  PushTarget target;
  target.job_id = task.job_id();
  target.step = task.version();
  target.first_slot = unit.first_slot;
  target.slot_count = unit.slot_count;
  target.job_key = task.job_key();
  std::vector<grpc::Channel*> channels;
  for (const v1::ShardRoute& route : task.shards()) channels.push_back(Channel(route.address()));
  std::vector<absl::Status> status(static_cast<size_t>(n));
  auto push_one = [&](int i) -> absl::Status {
    const v1::ShardRoute& route = task.shards(i);
    const std::string what =
        absl::StrCat("shard ", route.shard_id(), " (", route.address(), "): PushGradients");
    // Nothing leaves before the pulls this gradient was computed from are
    // known to be whole.
    pull_checked.WaitForNotification();
    if (!pull_status.ok()) return absl::CancelledError(absl::StrCat(what, ": the pull failed"));
    // Its own tensors and its replicas, in the order the backward pass
    // finishes them.
    std::set<std::string> held(route.tensors().begin(), route.tensors().end());
    held.insert(route.replicas().begin(), route.replicas().end());
    std::vector<std::string> tensors;
    for (const TensorInfo* t : job_->push_order) {
      if (held.count(t->name) != 0) tensors.push_back(t->name);
    }
    return PushGradients(
        channels[i], layout, tensors, target, unit.grads, TransferDtypeOf(job_->spec),
        options_.chunk_bytes, what, nullptr,
        [&](const TensorInfo& t) { return unit.stages->Wait(PullStages::StageOf(t, layers)); });
  };
  std::vector<std::thread> threads;
  threads.reserve(static_cast<size_t>(n));
  for (int i = 0; i < n; ++i) threads.emplace_back([&, i] { status[i] = push_one(i); });
  for (std::thread& t : threads) t.join();
  for (const absl::Status& st : status) MUONPS_RETURN_IF_ERROR(st);
  return absl::OkStatus();
}

}  // namespace muonps
