// Which backward stages of a push have their final gradient, so that a
// worker streams each tensor's gradient to the shards while the backward
// pass goes on (the last layer's first).
//
// Stages are numbered as in PullStages. A push unit sums the gradients of
// `lanes` slots computed concurrently (one lane: a slot pushed alone).
// Each lane reports each stage as its backward pass finishes it (Done); the
// lane that completes a stage runs the stage's reduction (the slot-order
// sum into the pushed buffer), then the stage becomes ready and the push
// threads waiting for it (Wait) send it.
//
// Thread safety: Done comes from the compute threads, Wait from the push
// threads, Abort from either; the mutex hand-off orders the reduction's
// writes before the push threads' reads.
#ifndef MUONPS_WORKERS_WORKER_PUSH_STAGES_H_
#define MUONPS_WORKERS_WORKER_PUSH_STAGES_H_

#include <functional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"

namespace muonps {

class PushStages {
 public:
  // `stages`: the model's num_hidden_layers + 2; `lanes` >= 1.
  PushStages(int stages, int lanes);

  // Lane's backward pass has finished `stage`. The call that completes it
  // (the last lane's) first runs `reduce(stage)` outside the lock, when set.
  void Done(int stage, const std::function<void(int)>& reduce);
  // Nothing more will become ready: every Wait returns false from now on,
  // unless its stage is already ready.
  void Abort();
  // Blocks until `stage` is ready (true) or the push was aborted (false).
  bool Wait(int stage);

 private:
  static bool Settled(void* arg) ABSL_NO_THREAD_SAFETY_ANALYSIS;

  const int lanes_;
  absl::Mutex mu_;
  std::vector<int> done_ ABSL_GUARDED_BY(mu_);  // lanes done, per stage
  std::vector<bool> ready_ ABSL_GUARDED_BY(mu_);
  bool aborted_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace muonps

#endif  // MUONPS_WORKERS_WORKER_PUSH_STAGES_H_
