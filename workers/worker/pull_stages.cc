#include "workers/worker/pull_stages.h"

#include <chrono>

namespace muonps {

PullStages::PullStages(const ModelLayout& layout, int layers)
    : total_(static_cast<size_t>(layers) + 2, 0) {
  for (const TensorInfo& t : layout.tensors()) ++total_[StageOf(t, layers)];
  absl::MutexLock lock(&mu_);
  pending_ = total_;
}

int PullStages::StageOf(const TensorInfo& tensor, int layers) {
  if (tensor.layer >= 0) return tensor.layer + 1;
  return tensor.role == TensorRole::kEmbedding ? 0 : layers + 1;
}

void PullStages::Reset() {
  absl::MutexLock lock(&mu_);
  pending_ = total_;
  finished_ = false;
}

void PullStages::MarkAll() {
  absl::MutexLock lock(&mu_);
  pending_.assign(total_.size(), 0);
  finished_ = true;
}

void PullStages::Arrived(const TensorInfo& tensor) {
  const int stage = StageOf(tensor, static_cast<int>(total_.size()) - 2);
  absl::MutexLock lock(&mu_);
  if (pending_[stage] > 0) --pending_[stage];
}

void PullStages::Finished() {
  absl::MutexLock lock(&mu_);
  finished_ = true;
}

namespace {

struct StageReady {
  PullStages* stages;
  int stage;
};

}  // namespace

bool PullStages::Ready(void* arg) {
  const StageReady& r = *static_cast<StageReady*>(arg);
  r.stages->mu_.AssertHeld();
  return r.stages->finished_ || r.stages->pending_[r.stage] == 0;
}

double PullStages::Wait(int stage) {
  const auto start = std::chrono::steady_clock::now();
  StageReady ready{this, stage};
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(&PullStages::Ready, static_cast<void*>(&ready)));
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

}  // namespace muonps
