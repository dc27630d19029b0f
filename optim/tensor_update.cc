#include "optim/tensor_update.h"

#include <algorithm>

#include "common/parallel.h"

namespace muonps {

OptimizerStep MakeOptimizerStep(const v1::OptimizerConfig& oc, double lr, int64_t step_index) {
  OptimizerStep s;
  s.optimizer = oc.name();
  s.step_index = step_index;
  s.muon.lr = lr;
  s.muon.weight_decay = oc.weight_decay();
  s.muon.momentum = oc.momentum();
  s.muon.nesterov = oc.nesterov();
  s.muon.ns_steps = oc.ns_steps();
  s.muon.scale_rule = ParseMuonScaleRule(oc.scale_rule()).value_or(MuonScaleRule::kMatchRmsAdamW);
  s.adam.lr = lr;
  s.adam.beta1 = oc.adam_beta1();
  s.adam.beta2 = oc.adam_beta2();
  s.adam.eps = oc.adam_eps();
  s.adam.weight_decay = oc.weight_decay();
  return s;
}

void UpdateTensor(const TensorInfo& t, const OptimizerStep& step, float* w, float* momentum,
                  float* exp_avg, float* exp_avg_sq, const float* grad) {
  if (UsesMuon(t, step.optimizer)) {
    MuonStep(w, momentum, grad, t.rows(), t.cols(), step.muon);
  } else {
    AdamWStep(w, exp_avg, exp_avg_sq, grad, t.numel, step.step_index + 1, step.adam);
  }
}

void RunTensorUpdates(const std::vector<const TensorInfo*>& tensors, const std::string& optimizer,
                      const std::function<void(size_t)>& update, bool in_order) {
  std::vector<std::pair<double, size_t>> work;  // (cost, k)
  double total_cost = 0.0, max_cost = 0.0;
  for (size_t k = 0; k < tensors.size(); ++k) {
    const TensorInfo& t = *tensors[k];
    const double cost = UsesMuon(t, optimizer) ? static_cast<double>(t.rows()) * t.cols() *
                                                     std::min(t.rows(), t.cols())
                                               : static_cast<double>(t.numel);
    work.emplace_back(cost, k);
    total_cost += cost;
    max_cost = std::max(max_cost, cost);
  }
  if (!in_order) {
    std::stable_sort(work.begin(), work.end(),
                     [](const auto& a, const auto& b) { return a.first > b.first; });
  }
  if (max_cost * NumThreads() > total_cost) {
    for (const auto& item : work) update(item.second);
  } else {
    ParallelForDynamic(static_cast<int64_t>(work.size()),
                       [&](int64_t i) { update(work[i].second); });
  }
}

void UpdateRouterBias(float* bias, const std::vector<int64_t>& load, double rate) {
  int64_t total = 0;
  for (int64_t x : load) total += x;
  const double mean = static_cast<double>(total) / static_cast<double>(load.size());
  const float r = static_cast<float>(rate);
  for (size_t e = 0; e < load.size(); ++e) {
    const double diff = mean - static_cast<double>(load[e]);
    const float sign = diff > 0 ? 1.0f : (diff < 0 ? -1.0f : 0.0f);
    bias[e] += r * sign;
  }
}

}  // namespace muonps
