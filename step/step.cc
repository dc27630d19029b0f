#include "step/step.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "optim/lr_schedule.h"

namespace muonps {

StepScales StepScalesOf(const v1::JobSpec& job) {
  StepScales s;
  const int slots = job.batch().slots();
  s.global_tokens = static_cast<int64_t>(slots) * job.batch().micro_batch() *
                    job.model().max_position_embeddings();
  s.loss_scale = static_cast<float>(1.0 / static_cast<double>(s.global_tokens));
  s.aux_scale = job.model().balancing() == "aux_loss"
                    ? static_cast<float>(job.model().aux_loss_alpha() / slots)
                    : 0.0f;
  return s;
}

double StepLearningRate(const v1::JobSpec& job, int64_t step_index) {
  return ScheduledLr(job.optimizer().lr(), step_index, job.schedule().total_steps(),
                     job.schedule().warmup_steps(), job.schedule().min_lr_ratio());
}

SlotRange PlanSlots(int slots, int tasks, int k) {
  const int64_t s = slots, t = tasks > 0 ? tasks : 1;
  return {static_cast<int>(k * s / t), static_cast<int>((k + 1) * s / t)};
}

double ClipCoefficient(double max_grad_norm, double norm) {
  return max_grad_norm > 0.0 ? max_grad_norm / (norm + 1e-6) : 1.0;
}

ExpertLoads::ExpertLoads(const v1::ModelConfig& model) {
  const int moe_layers = std::max(0, model.num_hidden_layers() - model.first_k_dense_replace());
  layers_.assign(
      static_cast<size_t>(moe_layers),
      std::vector<int64_t>(static_cast<size_t>(std::max(0, model.n_routed_experts())), 0));
}

namespace {

// Checks the shape of loads given as `layers` sequences of counts.
template <typename Layers, typename CountsOf>
absl::Status CheckShape(const std::vector<std::vector<int64_t>>& want, const Layers& layers,
                        CountsOf counts_of) {
  if (static_cast<size_t>(layers.size()) != want.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expert_load: ", layers.size(), " layers, the model has ", want.size(), " MoE layers"));
  }
  for (size_t l = 0; l < want.size(); ++l) {
    const auto& counts = counts_of(layers[static_cast<int>(l)]);
    if (static_cast<size_t>(counts.size()) != want[l].size()) {
      return absl::InvalidArgumentError(absl::StrCat("expert_load[", l, "]: ", counts.size(),
                                                     " experts, the model has ", want[l].size()));
    }
    for (int64_t x : counts) {
      if (x < 0) {
        return absl::InvalidArgumentError(absl::StrCat("expert_load[", l, "]: negative count ", x));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ExpertLoads::Add(const std::vector<std::vector<int64_t>>& loads) {
  if (absl::Status st = CheckShape(
          layers_, loads, [](const std::vector<int64_t>& v) -> const auto& { return v; });
      !st.ok()) {
    return st;
  }
  for (size_t l = 0; l < layers_.size(); ++l) {
    for (size_t e = 0; e < layers_[l].size(); ++e) layers_[l][e] += loads[l][e];
  }
  return absl::OkStatus();
}

absl::Status ExpertLoads::Add(const google::protobuf::RepeatedPtrField<v1::ExpertLoad>& loads) {
  if (absl::Status st = CheckShape(
          layers_, loads, [](const v1::ExpertLoad& v) -> const auto& { return v.tokens(); });
      !st.ok()) {
    return st;
  }
  for (size_t l = 0; l < layers_.size(); ++l) {
    const auto& counts = loads[static_cast<int>(l)].tokens();
    for (size_t e = 0; e < layers_[l].size(); ++e) layers_[l][e] += counts[static_cast<int>(e)];
  }
  return absl::OkStatus();
}

void ExpertLoads::ToProto(google::protobuf::RepeatedPtrField<v1::ExpertLoad>* out) const {
  out->Clear();
  for (const auto& layer : layers_) {
    v1::ExpertLoad* l = out->Add();
    for (int64_t x : layer) l->add_tokens(x);
  }
}

double ExpertLoads::MaxLoadRatio() const {
  double ratio = 0.0;
  for (const auto& layer : layers_) {
    int64_t total = 0, peak = 0;
    for (int64_t x : layer) {
      total += x;
      peak = std::max(peak, x);
    }
    if (total > 0) {
      ratio = std::max(ratio, static_cast<double>(peak) * static_cast<double>(layer.size()) /
                                  static_cast<double>(total));
    }
  }
  return ratio;
}

}  // namespace muonps
