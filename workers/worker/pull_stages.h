// Which forward stages of the model have their parameters in place while a
// pull streams in, so that a slot's forward pass starts on its first layers
// before the last ones have arrived.
//
// Stage 0 is the embedding, stage 1 + l transformer layer l (its norms,
// attention, router, bias and experts), stage L + 1 the final norm and the
// LM head: the order in which the forward pass needs them, and the order in
// which a shard streams its tensors (layout order).
//
// Thread safety: Arrived and Finished come from the pull threads, Wait from
// the compute threads; the mutex hand-off orders a tensor's writes before
// the reads of the stage that waited for it.
#ifndef MUONPS_WORKERS_WORKER_PULL_STAGES_H_
#define MUONPS_WORKERS_WORKER_PULL_STAGES_H_

#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/synchronization/mutex.h"
#include "common/model_layout.h"

namespace muonps {

class PullStages {
 public:
  // `layers`: the model's num_hidden_layers.
  PullStages(const ModelLayout& layout, int layers);

  // The stage whose forward computation first reads `tensor`.
  static int StageOf(const TensorInfo& tensor, int layers);
  int stages() const { return static_cast<int>(total_.size()); }

  // A new pull: no tensor is in place.
  void Reset();
  // Every tensor is in place (the parameters are already at the version).
  void MarkAll();
  // `tensor` is complete and checked in the parameter buffer.
  void Arrived(const TensorInfo& tensor);
  // Every pull has ended, successfully or not: nothing more will arrive,
  // and no Wait blocks any longer (the caller checks the pulls' status
  // before it uses what it computed).
  void Finished();
  // Blocks until stage `stage`'s tensors are all in place or the pulls have
  // ended; returns the seconds it waited.
  double Wait(int stage);

 private:
  // Await's condition: the stage of a StageReady (pull_stages.cc) is in
  // place, or the pulls have ended. Called with mu_ held.
  static bool Ready(void* arg) ABSL_NO_THREAD_SAFETY_ANALYSIS;

  std::vector<int> total_;  // tensors per stage
  absl::Mutex mu_;
  std::vector<int> pending_ ABSL_GUARDED_BY(mu_);  // per stage, not yet arrived
  bool finished_ ABSL_GUARDED_BY(mu_) = false;
};

}  // namespace muonps

#endif  // MUONPS_WORKERS_WORKER_PULL_STAGES_H_
