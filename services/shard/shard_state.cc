#include "services/shard/shard_state.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <tuple>

#include "absl/strings/str_cat.h"
#include "common/bf16.h"
#include "common/failpoint.h"
#include "common/job_spec.h"
#include "common/parallel.h"
#include "optim/grad_norm.h"
#include "optim/tensor_update.h"
#include "rpc/tensor_stream.h"
#include "step/step.h"

namespace muonps {

ShardState::ShardState(const v1::JobSpec& job) : job_(job), layout_(job.model()) {}

ShardState::~ShardState() {
  absl::MutexLock lock(&mu_);
  AwaitReplicasLocked();
}

void ShardState::AwaitReplicasLocked() const {
  if (replicas_pending_.valid()) replicas_pending_.wait();
}

bool ShardState::AnyReplicaLocked(const std::vector<std::string>& names) const {
  for (const std::string& name : names) {
    auto it = tensors_.find(name);
    if (it != tensors_.end() && it->second.replica) return true;
  }
  return false;
}

absl::StatusOr<std::unique_ptr<ShardState>> ShardState::Create(
    const v1::JobSpec& job, const std::vector<std::string>& owned,
    const std::vector<std::string>& replicas) {
  std::unique_ptr<ShardState> shard(new ShardState(job));
  absl::MutexLock lock(&shard->mu_);
  std::vector<std::string> held = owned;
  held.insert(held.end(), replicas.begin(), replicas.end());
  for (size_t k = 0; k < held.size(); ++k) {
    const std::string& name = held[k];
    const TensorInfo* info = shard->layout_.Find(name);
    if (info == nullptr) return absl::NotFoundError(absl::StrCat("no tensor named ", name));
    if (shard->tensors_.count(name) != 0) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, " listed twice"));
    }
    Tensor& t = shard->tensors_[name];
    t.info = info;
    t.replica = k >= owned.size();
    t.value = std::make_shared<std::vector<float>>(info->numel);
    t.momentum = std::make_shared<std::vector<float>>();
    t.exp_avg = std::make_shared<std::vector<float>>();
    t.exp_avg_sq = std::make_shared<std::vector<float>>();
    InitTensor(*info, job.seed(), job.model().initializer_range(), t.value->data());
    if (info->trainable()) {
      if (UsesMuon(*info, job.optimizer().name())) {
        t.momentum->assign(info->numel, 0.0f);
      } else {
        t.exp_avg->assign(info->numel, 0.0f);
        t.exp_avg_sq->assign(info->numel, 0.0f);
      }
      t.covered_by.assign(job.batch().slots(), -1);
    }
  }
  for (const TensorInfo& info : shard->layout_.tensors()) {
    if (shard->tensors_.count(info.name) != 0) shard->order_.push_back(info.name);
  }
  absl::MutexLock serve(&shard->serve_mu_);
  for (const auto& [name, t] : shard->tensors_) shard->served_[name] = Served{0, t.value};
  return shard;
}

absl::Status ShardState::Restore(const std::string& name, std::vector<float> value,
                                 std::vector<float> momentum, std::vector<float> exp_avg,
                                 std::vector<float> exp_avg_sq) {
  absl::MutexLock lock(&mu_);
  AwaitReplicasLocked();
  auto it = tensors_.find(name);
  if (it == tensors_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor ", name, " is not on this shard"));
  }
  Tensor& t = it->second;
  auto check = [&](const std::vector<float>& v, const std::vector<float>& now,
                   absl::string_view what) -> absl::Status {
    if (v.size() != now.size()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", name, ": ", v.size(), " ", what,
                                                     " values, expected ", now.size()));
    }
    return absl::OkStatus();
  };
  for (const auto& [v, now, what] : {std::tuple(&value, t.value.get(), "parameter"),
                                     std::tuple(&momentum, t.momentum.get(), "momentum"),
                                     std::tuple(&exp_avg, t.exp_avg.get(), "exp_avg"),
                                     std::tuple(&exp_avg_sq, t.exp_avg_sq.get(), "exp_avg_sq")}) {
    if (absl::Status st = check(*v, *now, what); !st.ok()) return st;
  }
  if (!t.received.empty()) {
    return absl::FailedPreconditionError(
        absl::StrCat("tensor ", name, ": cannot restore after gradients arrived"));
  }
  t.value = std::make_shared<std::vector<float>>(std::move(value));
  t.momentum = std::make_shared<std::vector<float>>(std::move(momentum));
  t.exp_avg = std::make_shared<std::vector<float>>(std::move(exp_avg));
  t.exp_avg_sq = std::make_shared<std::vector<float>>(std::move(exp_avg_sq));
  absl::MutexLock serve(&serve_mu_);
  served_[name].value = t.value;
  return absl::OkStatus();
}

void ShardState::set_version(int64_t version) {
  absl::MutexLock lock(&mu_);
  AwaitReplicasLocked();
  version_ = version;
  absl::MutexLock serve(&serve_mu_);
  for (auto& [name, served] : served_) served.version = version;
  served_version_ = version;
}

absl::StatusOr<std::optional<ShardState::Snapshot>> ShardState::ServedTensor(
    const std::string& name, int64_t version) const {
  absl::MutexLock serve(&serve_mu_);
  auto it = served_.find(name);
  if (it == served_.end()) {
    return absl::NotFoundError(absl::StrCat("tensor ", name, " is not on this shard"));
  }
  const Served& s = it->second;
  if (s.version > version) {
    return absl::FailedPreconditionError(
        absl::StrCat("version: ", version, " is gone; the shard is at version ", served_version_));
  }
  if (s.version < version || s.value == nullptr) return std::optional<Snapshot>();
  return std::optional<Snapshot>(s.value);
}

int64_t ShardState::served_version() const {
  absl::MutexLock serve(&serve_mu_);
  return served_version_;
}

bool ShardState::Holds(const std::string& name) const {
  absl::MutexLock serve(&serve_mu_);
  return served_.count(name) != 0;
}

void ShardState::Unpublish(const std::string& name) {
  absl::MutexLock serve(&serve_mu_);
  served_.at(name).value.reset();
}

void ShardState::Publish(const std::string& name, int64_t version, Snapshot value) {
  {
    absl::MutexLock serve(&serve_mu_);
    served_.at(name) = Served{version, std::move(value)};
  }
  if (on_publish_) on_publish_();
}

int64_t ShardState::version() const {
  absl::MutexLock lock(&mu_);
  return version_;
}

bool ShardState::Owns(const std::string& name) const {
  absl::MutexLock lock(&mu_);
  return tensors_.count(name) != 0;
}

std::vector<const TensorInfo*> ShardState::Trainable() const {
  absl::MutexLock lock(&mu_);
  std::vector<const TensorInfo*> out;
  for (const std::string& name : order_) {
    const TensorInfo* info = tensors_.at(name).info;
    if (info->trainable()) out.push_back(info);
  }
  return out;
}

absl::StatusOr<std::vector<float>> ShardState::Parameter(const std::string& name) const {
  absl::MutexLock lock(&mu_);
  AwaitReplicasLocked();
  auto it = tensors_.find(name);
  if (it == tensors_.end())
    return absl::NotFoundError(absl::StrCat("tensor ", name, " is not on this shard"));
  return *it->second.value;
}

int64_t ShardState::Visit(
    const std::function<void(const TensorInfo&, const std::vector<float>&,
                             const std::vector<float>&, const std::vector<float>&,
                             const std::vector<float>&)>& visit) const {
  absl::MutexLock lock(&mu_);
  AwaitReplicasLocked();
  for (const std::string& name : order_) {
    const Tensor& t = tensors_.at(name);
    visit(*t.info, *t.value, *t.momentum, *t.exp_avg, *t.exp_avg_sq);
  }
  return version_;
}

ShardState::StateSnapshot ShardState::TakeSnapshot() const {
  return TakeSnapshot(std::set<std::string>(order_.begin(), order_.end()));
}

ShardState::StateSnapshot ShardState::TakeSnapshot(const std::set<std::string>& only) const {
  StateSnapshot out;
  absl::MutexLock lock(&mu_);
  if (AnyReplicaLocked({only.begin(), only.end()})) AwaitReplicasLocked();
  out.version = version_;
  for (const std::string& name : order_) {
    if (only.count(name) == 0) continue;
    const Tensor& t = tensors_.at(name);
    out.tensors.push_back({t.info, t.value, t.momentum, t.exp_avg, t.exp_avg_sq});
  }
  return out;
}

int64_t ShardState::StateSnapshot::bytes() const {
  int64_t n = 0;
  for (const Entry& e : tensors) {
    n += static_cast<int64_t>(
        (e.value->size() + e.momentum->size() + e.exp_avg->size() + e.exp_avg_sq->size()) *
        sizeof(float));
  }
  return n;
}

absl::StatusOr<bool> ShardState::AddGradients(int64_t step, int first_slot, int slot_count,
                                              const std::vector<Gradient>& grads,
                                              int64_t generation) {
  const int slots = job_.batch().slots();
  if (slot_count < 1 || first_slot < 0 || first_slot + slot_count > slots) {
    return absl::InvalidArgumentError(absl::StrCat(
        "slot range [", first_slot, ", ", first_slot + slot_count, ") out of [0, ", slots, ")"));
  }
  if (slot_count > 1 && first_slot != 0) {
    return absl::InvalidArgumentError(absl::StrCat(
        "slot_count: a gradient summed over several slots must start at slot 0, got slot ",
        first_slot, " with slot_count ", slot_count));
  }
  absl::MutexLock lock(&mu_);
  if (generation >= 0 && generation != generation_) {
    return absl::AbortedError(
        "the job was loaded again since this push began: the push belongs to an earlier run");
  }
  // Check everything first: a refused push changes nothing.
  std::vector<Tensor*> targets;
  int repeats = 0;
  for (const Gradient& g : grads) {
    auto it = tensors_.find(g.name);
    if (it == tensors_.end()) {
      return absl::NotFoundError(absl::StrCat("tensor ", g.name, " is not on this shard"));
    }
    Tensor& t = it->second;
    if (!t.info->trainable()) {
      return absl::FailedPreconditionError(
          absl::StrCat("tensor ", g.name, " is a buffer: no gradient"));
    }
    if (std::find(targets.begin(), targets.end(), &t) != targets.end()) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", g.name, " appears twice"));
    }
    if (step != version_) {
      return absl::FailedPreconditionError(absl::StrCat("tensor ", g.name, ": gradient for step ",
                                                        step, ", shard is at step ", version_));
    }
    if (g.numel != t.info->numel) {
      return absl::InvalidArgumentError(absl::StrCat("tensor ", g.name, ": ", g.numel,
                                                     " gradient values, expected ", t.info->numel));
    }
    const int64_t bad =
        g.finite_checked ? -1 : FirstNonFinite(reinterpret_cast<const char*>(g.data), g.numel);
    if (bad >= 0) {
      return absl::InvalidArgumentError(
          absl::StrCat("tensor ", g.name, ": non-finite gradient value at element ", bad));
    }
    auto same = t.received.find(first_slot);
    if (same != t.received.end() && same->second.first == slot_count) {
      ++repeats;
    } else {
      for (int s = first_slot; s < first_slot + slot_count; ++s) {
        if (t.covered_by[s] >= 0) {
          return absl::FailedPreconditionError(absl::StrCat(
              "tensor ", g.name, ": slots [", first_slot, ", ", first_slot + slot_count,
              ") overlap slot ", s, ", already counted in a different range"));
        }
      }
    }
    targets.push_back(&t);
  }
  if (repeats == static_cast<int>(grads.size())) return false;  // already counted
  std::vector<Tensor*> added;
  for (size_t k = 0; k < grads.size(); ++k) {
    Tensor& t = *targets[k];
    if (t.received.count(first_slot) != 0) continue;
    std::vector<float> kept;
    if (grads[k].movable != nullptr && grads[k].movable->data() == grads[k].data &&
        static_cast<int64_t>(grads[k].movable->size()) == grads[k].numel) {
      kept = std::move(*grads[k].movable);
    } else {
      kept.assign(grads[k].data, grads[k].data + grads[k].numel);
    }
    t.received[first_slot] = {slot_count, std::move(kept)};
    if (first_slot == 0 && slot_count == slots) t.whole_sq = grads[k].sum_of_squares;
    for (int s = first_slot; s < first_slot + slot_count; ++s) t.covered_by[s] = first_slot;
    // A replica's sum may still be read by the last step's update.
    if (t.replica) AwaitReplicasLocked();
    added.push_back(&t);
  }
  summed_ = false;
  // Summed now, not when the coordinator asks for the squares: each tensor
  // on its own, the largest first, spread over the threads.
  std::stable_sort(added.begin(), added.end(), [](const Tensor* a, const Tensor* b) {
    return a->info->numel > b->info->numel;
  });
  const TransferDtype dtype = TransferDtypeOf(job_);
  ParallelForDynamic(static_cast<int64_t>(added.size()),
                     [&](int64_t k) { Fold(*added[k], dtype); });
  return true;
}

void ShardState::Fold(Tensor& t, TransferDtype dtype) {
  const int slots = static_cast<int>(t.covered_by.size());
  const int64_t n = t.info->numel;
  while (t.summed < slots) {
    auto it = t.received.find(t.summed);
    if (it == t.received.end()) return;  // a slot before the rest is still missing
    auto& [count, buffer] = it->second;
    if (t.summed == 0 && count == slots && t.whole_sq.has_value()) {
      // One gradient of every slot, reduced as it arrived: 0 + g is g with
      // +0 for -0, which the pusher made it, so it is the sum itself.
      std::swap(t.grad, buffer);
      t.grad_sq = *t.whole_sq;
      t.summed = slots;
      return;
    }
    // ((0 + g0) + g1) + ...: the trainer's order; a prefix sum received from
    // a worker is exactly the first terms of it. Under transfer.dtype bf16
    // every partial sum is rounded to bf16 (common/bf16.h).
    if (t.summed == 0) t.grad.assign(static_cast<size_t>(n), 0.0f);
    AccumulateSlotGradient(dtype, buffer.data(), n, t.grad.data());
    t.summed += count;
  }
  // Its share of the global norm, while the sum is in cache.
  t.grad_sq = SumOfSquares(t.grad.data(), n);
}

int ShardState::SummedSlots(const std::string& name) const {
  absl::MutexLock lock(&mu_);
  auto it = tensors_.find(name);
  return it == tensors_.end() ? 0 : it->second.summed;
}

std::vector<float> ShardState::TakeBuffer(int64_t numel) {
  {
    absl::MutexLock lock(&mu_);
    auto it = spare_.find(numel);
    if (it != spare_.end() && !it->second.empty()) {
      std::vector<float> buffer = std::move(it->second.back());
      it->second.pop_back();
      return buffer;
    }
  }
  return std::vector<float>(static_cast<size_t>(numel));
}

bool ShardState::GradientsComplete() const {
  absl::MutexLock lock(&mu_);
  for (const auto& [name, t] : tensors_) {
    for (int owner : t.covered_by) {
      if (owner < 0) return false;
    }
  }
  return true;
}

absl::Status ShardState::SumSlotsLocked() {
  if (summed_) return absl::OkStatus();
  for (auto& [name, t] : tensors_) {
    for (size_t s = 0; s < t.covered_by.size(); ++s) {
      if (t.covered_by[s] < 0) {
        return absl::FailedPreconditionError(absl::StrCat(
            "step ", version_, ": the gradient of slot ", s, " of ", name, " is still missing"));
      }
    }
    // Every slot is in, and each was summed as it arrived (Fold).
    if (t.info->trainable() && t.summed != static_cast<int>(t.covered_by.size())) {
      return absl::InternalError(absl::StrCat("step ", version_, ": ", name, " has ", t.summed,
                                              " of its slots summed, all of them in"));
    }
  }
  summed_ = true;
  return absl::OkStatus();
}

absl::StatusOr<std::vector<std::pair<std::string, double>>> ShardState::GradientSquares() {
  absl::MutexLock lock(&mu_);
  AwaitReplicasLocked();  // the summed gradients are rewritten
  if (absl::Status st = SumSlotsLocked(); !st.ok()) return st;
  std::vector<std::pair<std::string, double>> out;
  for (const std::string& name : order_) {
    const Tensor& t = tensors_.at(name);
    if (!t.info->trainable()) continue;
    out.emplace_back(name, t.grad_sq);
  }
  return out;
}

absl::Status ShardState::ApplyStep(int64_t step, double lr, double clip_coef,
                                   const std::vector<std::vector<int64_t>>& loads,
                                   ApplyStats* stats,
                                   const google::protobuf::RepeatedField<float>* logits) {
  absl::MutexLock lock(&mu_);
  AwaitReplicasLocked();
  if (step != version_) {
    return absl::FailedPreconditionError(
        absl::StrCat("apply for step ", step, ", shard is at step ", version_));
  }
  // Loads index the router biases: refuse any shape but the model's before
  // anything changes. None at all means no bias update.
  ExpertLoads summed(job_.model());
  if (!loads.empty()) {
    if (absl::Status st = summed.Add(loads); !st.ok()) return st;
  }
  // QK-Clip's maxima: the model's shape and finite, and present when the
  // job clips.
  const double tau = job_.optimizer().qk_clip_tau();
  AttentionLogits qk(job_.model());
  if (tau > 0.0 || (logits != nullptr && !logits->empty())) {
    static const google::protobuf::RepeatedField<float> kNone;
    if (absl::Status st = qk.Add(logits != nullptr ? *logits : kNone); !st.ok()) return st;
  }
  if (absl::Status st = SumSlotsLocked(); !st.ok()) return st;
  const v1::OptimizerConfig& oc = job_.optimizer();
  std::vector<Tensor*> trainable, replicas;
  std::vector<const TensorInfo*> infos, replica_infos;
  for (const std::string& name : order_) {
    Tensor& t = tensors_.at(name);
    if (!t.info->trainable()) continue;
    (t.replica ? replicas : trainable).push_back(&t);
    (t.replica ? replica_infos : infos).push_back(t.info);
  }
  const bool clip = ClipApplies(clip_coef);
  if (clip) {
    for (Tensor* t : trainable)
      Scale(t->grad.data(), t->info->numel, static_cast<float>(clip_coef));
  }
  OptimizerStep update = MakeOptimizerStep(oc, lr, step);
  update.muon.orthogonalizer = orthogonalizer_;
  const int64_t next = step + 1;
  // A pull may still be streaming this version, or a checkpoint writing it:
  // update a copy then. Unpublish first, so that no pull takes the values
  // while they change.
  auto copy_if_shared = [](Tensor& t) {
    for (auto* buffer : {&t.value, &t.momentum, &t.exp_avg, &t.exp_avg_sq}) {
      if (buffer->use_count() > 1) *buffer = std::make_shared<std::vector<float>>(**buffer);
    }
  };
  // The router biases first (they need only the loads), and every tensor
  // this step leaves as it is, so that a pull of the next version is held
  // up by nothing but the updates still running.
  const bool bias_update = job_.model().balancing() == "aux_free_bias" && !loads.empty();
  for (const std::string& name : order_) {
    Tensor& t = tensors_.at(name);
    if (t.info->trainable()) continue;
    const size_t moe_layer =
        static_cast<size_t>(t.info->layer - job_.model().first_k_dense_replace());
    if (bias_update && t.info->role == TensorRole::kBuffer && moe_layer < summed.layers().size() &&
        summed.layers()[moe_layer].size() == static_cast<size_t>(t.info->numel)) {
      Unpublish(name);
      if (t.value.use_count() > 1) t.value = std::make_shared<std::vector<float>>(*t.value);
      UpdateRouterBias(t.value->data(), summed.layers()[moe_layer],
                       job_.model().bias_update_rate());
    }
    Publish(name, next, t.value);
  }
  std::vector<double> seconds(trainable.size(), 0.0), update_sq(trainable.size(), 0.0);
  RunTensorUpdates(
      infos, oc.name(),
      [&](size_t k) {
        Tensor& t = *trainable[k];
        const auto start = std::chrono::steady_clock::now();
        Unpublish(t.info->name);
        copy_if_shared(t);
        FailPoint("shard.apply_tensor");
        std::vector<float> before;
        if (stats != nullptr) before = *t.value;
        UpdateTensor(*t.info, update, t.value->data(), t.momentum->data(), t.exp_avg->data(),
                     t.exp_avg_sq->data(), t.grad.data());
        ApplyQkClip(*t.info, job_.model(), tau, qk, t.value->data());
        Publish(t.info->name, next, t.value);
        seconds[k] =
            std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (stats != nullptr) {
          double sq = 0.0;
          for (size_t i = 0; i < before.size(); ++i) {
            const double d = static_cast<double>((*t.value)[i]) - before[i];
            sq += d * d;
          }
          update_sq[k] = sq;
        }
      },
      /*in_order=*/true);
  if (stats != nullptr) {
    for (size_t k = 0; k < trainable.size(); ++k) {
      const bool muon = UsesMuon(*trainable[k]->info, oc.name());
      (muon ? stats->muon_seconds : stats->adamw_seconds) += seconds[k];
      (muon ? stats->muon_update_sq : stats->adamw_update_sq) += update_sq[k];
      (muon ? stats->muon_numel : stats->adamw_numel) += trainable[k]->info->numel;
      stats->tensor_seconds.emplace_back(muon, seconds[k]);
    }
  }
  ClearGradientsLocked();
  ++version_;
  {
    absl::MutexLock serve(&serve_mu_);
    served_version_ = version_;
  }
  if (!replicas.empty()) {
    // The same arithmetic on the replicas, on a thread of their own; each is
    // published when done (nobody pulls a replica unless it names it).
    replicas_pending_ =
        std::async(std::launch::async, [this, replicas = std::move(replicas),
                                        replica_infos = std::move(replica_infos), clip, clip_coef,
                                        update, optimizer = oc.name(), copy_if_shared, next,
                                        model = job_.model(), tau, qk = std::move(qk)] {
          if (clip) {
            for (Tensor* t : replicas)
              Scale(t->grad.data(), t->info->numel, static_cast<float>(clip_coef));
          }
          RunTensorUpdates(replica_infos, optimizer, [&](size_t k) {
            Tensor& t = *replicas[k];
            Unpublish(t.info->name);
            copy_if_shared(t);
            FailPoint("shard.apply_tensor");
            UpdateTensor(*t.info, update, t.value->data(), t.momentum->data(), t.exp_avg->data(),
                         t.exp_avg_sq->data(), t.grad.data());
            ApplyQkClip(*t.info, model, tau, qk, t.value->data());
            Publish(t.info->name, next, t.value);
          });
        }).share();
  }
  return absl::OkStatus();
}

void ShardState::StartGeneration(int64_t generation) {
  absl::MutexLock lock(&mu_);
  generation_ = generation;
  ClearGradientsLocked();
}

void ShardState::ClearGradientsLocked() {
  for (auto& [name, t] : tensors_) {
    for (auto& [first, entry] : t.received) {
      if (entry.second.empty()) continue;  // swapped with an empty `grad`
      spare_[static_cast<int64_t>(entry.second.size())].push_back(std::move(entry.second));
    }
    t.received.clear();
    t.whole_sq.reset();
    t.summed = 0;
    std::fill(t.covered_by.begin(), t.covered_by.end(), -1);
  }
  summed_ = false;
}

}  // namespace muonps
