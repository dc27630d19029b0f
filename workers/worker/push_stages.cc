#include "workers/worker/push_stages.h"

namespace muonps {

PushStages::PushStages(int stages, int lanes) : lanes_(lanes) {
  absl::MutexLock lock(&mu_);
  done_.assign(static_cast<size_t>(stages), 0);
  ready_.assign(static_cast<size_t>(stages), false);
}

void PushStages::Done(int stage, const std::function<void(int)>& reduce) {
  {
    absl::MutexLock lock(&mu_);
    if (++done_[stage] < lanes_) return;
  }
  // Every lane has finished the stage: no one writes its gradients any more.
  if (reduce) reduce(stage);
  absl::MutexLock lock(&mu_);
  ready_[stage] = true;
}

void PushStages::Abort() {
  absl::MutexLock lock(&mu_);
  aborted_ = true;
}

namespace {

struct StageArg {
  PushStages* stages;
  int stage;
};

}  // namespace

bool PushStages::Settled(void* arg) {
  const StageArg& a = *static_cast<StageArg*>(arg);
  a.stages->mu_.AssertHeld();
  return a.stages->aborted_ || a.stages->ready_[a.stage];
}

bool PushStages::Wait(int stage) {
  StageArg arg{this, stage};
  absl::MutexLock lock(&mu_);
  mu_.Await(absl::Condition(&PushStages::Settled, static_cast<void*>(&arg)));
  return ready_[stage];
}

}  // namespace muonps
