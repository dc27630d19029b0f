#include "services/shard/shard_state.h"

#include <algorithm>
#include <cmath>

#include "absl/strings/str_cat.h"
#include "common/parallel.h"
#include "services/optimizer/grad_norm.h"
#include "services/optimizer/tensor_update.h"

namespace muonps {

ShardState::ShardState(const v1::JobSpec& job) : job_(job), layout_(job.model()) {}

absl::StatusOr<std::unique_ptr<ShardState>> ShardState::Create(
    const v1::JobSpec& job, const std::vector<std::string>& owned) {
  std::unique_ptr<ShardState> shard(new ShardState(job));
  absl::MutexLock lock(&shard->mu_);
  for (const std::string& name : owned) {
    const TensorInfo* info = shard->layout_.Find(name);
    if (info == nullptr) return absl::NotFoundError(absl::StrCat("no tensor named ", name));
    if (shard->tensors_.count(name) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " listed twice"));
    }
    Tensor& t = shard->tensors_[name];
    t.info = info;
    t.value.resize(info->numel);
    InitTensor(*info, job.seed(), job.model().initializer_range(), t.value.data());
    if (info->trainable()) {
      if (UsesMuon(*info, job.optimizer().name())) {
        t.momentum.assign(info->numel, 0.0f);
      } else {
        t.exp_avg.assign(info->numel, 0.0f);
        t.exp_avg_sq.assign(info->numel, 0.0f);
      }
      t.slot_grads.resize(job.batch().slots());
    }
  }
  for (const TensorInfo& info : shard->layout_.tensors()) {
    if (shard->tensors_.count(info.name) != 0) shard->order_.push_back(info.name);
  }
  return shard;
}

int64_t ShardState::version() const {
  absl::MutexLock lock(&mu_);
  return version_;
}

bool ShardState::Owns(const std::string& name) const {
  absl::MutexLock lock(&mu_);
  return tensors_.count(name) != 0;
}

absl::StatusOr<std::vector<float>> ShardState::Parameter(const std::string& name) const {
  absl::MutexLock lock(&mu_);
  auto it = tensors_.find(name);
  if (it == tensors_.end()) return absl::NotFoundError(absl::StrCat("tensor ", name, " is not on this shard"));
  return it->second.value;
}

absl::StatusOr<bool> ShardState::AddSlotGradient(int64_t step, int slot, const std::string& name,
                                                 const float* grad, int64_t numel) {
  absl::MutexLock lock(&mu_);
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor ", name, " is not on this shard"));
  }
  Tensor& t = it->second;
  if (!t.info->trainable()) {
    return absl::FailedPreconditionError(absl::StrCat("tensor ", name, " is a buffer: no gradient"));
  }
  if (step != version_) {
    return absl::FailedPreconditionError(
        absl::StrCat("tensor ", name, ": gradient for step ", step, ", shard is at step ", version_));
  }
  if (slot < 0 || slot >= static_cast<int>(t.slot_grads.size())) {
    return absl::InvalidArgumentError(absl::StrCat("slot ", slot, " out of range [0, ",
                                                   t.slot_grads.size(), ")"));
  }
  if (numel != t.info->numel) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": ", numel,
                                                   " gradient values, expected ", t.info->numel));
  }
  for (int64_t i = 0; i < numel; ++i) {
    if (!std::isfinite(grad[i])) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", name, ": non-finite gradient value at element ", i));
    }
  }
  if (!t.slot_grads[slot].empty()) return false;  // already counted
  t.slot_grads[slot].assign(grad, grad + numel);
  summed_ = false;
  return true;
}

bool ShardState::GradientsComplete() const {
  absl::MutexLock lock(&mu_);
  for (const auto& [name, t] : tensors_) {
    for (const auto& g : t.slot_grads) {
      if (g.empty()) return false;
    }
  }
  return true;
}

absl::Status ShardState::SumSlotsLocked() {
  if (summed_) return absl::OkStatus();
  for (auto& [name, t] : tensors_) {
    for (const auto& g : t.slot_grads) {
      if (g.empty()) {
        return absl::FailedPreconditionError(
            absl::StrCat("step ", version_, ": slot gradients of ", name, " are still missing"));
      }
    }
  }
  for (auto& [name, t] : tensors_) {
    if (t.slot_grads.empty()) continue;
    // ((0 + g0) + g1) + ...: the trainer's order.
    t.grad.assign(t.info->numel, 0.0f);
    float* sum = t.grad.data();
    for (const auto& g : t.slot_grads) {
      const float* x = g.data();
      ParallelFor(t.info->numel, [&](int64_t i) { sum[i] += x[i]; });
    }
  }
  summed_ = true;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::pair<std::string, double>>> ShardState::GradientSquares() {
  absl::MutexLock lock(&mu_);
  if (absl::Status st = SumSlotsLocked(); !st.ok()) return st;
  std::vector<std::pair<std::string, double>> out;
  for (const std::string& name : order_) {
    const Tensor& t = tensors_.at(name);
    if (!t.info->trainable()) continue;
    out.emplace_back(name, SumOfSquares(t.grad.data(), t.info->numel));
  }
  return out;
}

absl::Status ShardState::ApplyStep(int64_t step, double lr, double clip_coef,
                                   const std::vector<std::vector<int64_t>>& loads) {
  absl::MutexLock lock(&mu_);
  if (step != version_) {
    return absl::FailedPreconditionError(
        absl::StrCat("apply for step ", step, ", shard is at step ", version_));
  }
  if (absl::Status st = SumSlotsLocked(); !st.ok()) return st;
  const v1::OptimizerConfig& oc = job_.optimizer();
  std::vector<Tensor*> trainable;
  std::vector<const TensorInfo*> infos;
  for (const std::string& name : order_) {
    Tensor& t = tensors_.at(name);
    if (!t.info->trainable()) continue;
    trainable.push_back(&t);
    infos.push_back(t.info);
  }
  if (clip_coef < 1.0) {
    for (Tensor* t : trainable) Scale(t->grad.data(), t->info->numel, static_cast<float>(clip_coef));
  }
  const OptimizerStep update = MakeOptimizerStep(oc, lr, step);
  RunTensorUpdates(infos, oc.name(), [&](size_t k) {
    Tensor& t = *trainable[k];
    UpdateTensor(*t.info, update, t.value.data(), t.momentum.data(), t.exp_avg.data(),
                 t.exp_avg_sq.data(), t.grad.data());
  });
  if (job_.model().balancing() == "aux_free_bias") {
    for (const std::string& name : order_) {
      Tensor& t = tensors_.at(name);
      if (t.info->role != TensorRole::kBuffer) continue;
      const size_t moe_layer =
          static_cast<size_t>(t.info->layer - job_.model().first_k_dense_replace());
      if (moe_layer < loads.size()) {
        UpdateRouterBias(t.value.data(), loads[moe_layer], job_.model().bias_update_rate());
      }
    }
  }
  for (auto& [name, t] : tensors_) {
    for (auto& g : t.slot_grads) g.clear();
  }
  summed_ = false;
  ++version_;
  return absl::OkStatus();
}

}  // namespace muonps
