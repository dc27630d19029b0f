// The per-tensor half of an optimizer step, shared by the single-process
// trainer and the optimizer shards so that both do the same arithmetic.
#ifndef MUONPS_OPTIM_TENSOR_UPDATE_H_
#define MUONPS_OPTIM_TENSOR_UPDATE_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "common/model_layout.h"
#include "muonps/v1/job.pb.h"
#include "optim/adamw.h"
#include "optim/muon.h"

namespace muonps {

// Hyperparameters of one step (0-based step_index) at learning rate lr.
struct OptimizerStep {
  std::string optimizer;  // "muon" | "adamw"
  MuonHyper muon;
  AdamWHyper adam;
  int64_t step_index = 0;
};
// `oc` must be validated (scale_rule known).
OptimizerStep MakeOptimizerStep(const v1::OptimizerConfig& oc, double lr, int64_t step_index);

// Updates one trainable tensor in place: Muon for matrices under "muon"
// (momentum used), AdamW otherwise (exp_avg, exp_avg_sq used).
void UpdateTensor(const TensorInfo& tensor, const OptimizerStep& step, float* w, float* momentum,
                  float* exp_avg, float* exp_avg_sq, const float* grad);

// Calls update(k) for every k in [0, tensors.size()). Each call must touch
// only its tensor. Many small tensors run one per thread, largest first; a
// set dominated by a few big matrices runs one at a time with every thread
// inside each update. The results are the same either way. With
// `in_order`, the updates start in the given order instead (a shard serves
// each tensor as soon as it is updated, so the forward order comes first).
void RunTensorUpdates(const std::vector<const TensorInfo*>& tensors, const std::string& optimizer,
                      const std::function<void(size_t)>& update, bool in_order = false);

// The aux-loss-free balancing rule for one MoE layer:
// bias[e] += rate * sign(mean(load) - load[e]).
void UpdateRouterBias(float* bias, const std::vector<int64_t>& load, double rate);

}  // namespace muonps

#endif  // MUONPS_OPTIM_TENSOR_UPDATE_H_
