#include "trainer/trainer.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "checkpoint/checkpoint.h"
#include "common/bf16.h"
#include "common/job_spec.h"
#include "common/numerics.h"
#include "common/parallel.h"
#include "common/status_macros.h"
#include "optim/adamw.h"
#include "optim/grad_norm.h"
#include "optim/muon.h"
#include "optim/tensor_update.h"
#include "step/step.h"

namespace muonps {
namespace {

double Seconds(std::chrono::steady_clock::time_point a, std::chrono::steady_clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

}  // namespace

Trainer::Trainer(const v1::JobSpec& job, const TrainOptions& options)
    : job_(job), options_(options) {}

absl::StatusOr<std::unique_ptr<Trainer>> Trainer::Create(const v1::JobSpec& job,
                                                         const TrainOptions& options) {
  std::unique_ptr<Trainer> trainer(new Trainer(job, options));
  MUONPS_RETURN_IF_ERROR(trainer->Init());
  return trainer;
}

absl::Status Trainer::Init() {
  const v1::ModelConfig& mc = job_.model();
  const int T = mc.max_position_embeddings();
  MUONPS_ASSIGN_OR_RETURN(corpus_, LoadTokenCorpus(job_.data(), mc.vocab_size(), T));
  sampler_ = std::make_unique<BatchSampler>(&corpus_.train, T, job_.batch().slots(),
                                            job_.batch().micro_batch(),
                                            job_.data().sampling() == "random", job_.seed());
  val_windows_ =
      ValidationWindows(corpus_.val, T, job_.data().eval_windows(), &val_inputs_, &val_targets_);
  const int lanes = std::max(1, std::min(NumThreads(), job_.batch().slots()));
  lanes_.resize(lanes);
  for (Lane& lane : lanes_) lane.model = std::make_unique<MoeModel>(mc);
  const ModelLayout& layout = model().layout();
  const size_t total = static_cast<size_t>(layout.total_floats());
  state_.params.assign(total, 0.0f);
  state_.momentum.assign(total, 0.0f);
  state_.exp_avg.assign(total, 0.0f);
  state_.exp_avg_sq.assign(total, 0.0f);
  grads_.assign(total, 0.0f);
  const int rows = job_.batch().micro_batch();
  for (Lane& lane : lanes_) {
    lane.grads.assign(total, 0.0f);
    lane.inputs.assign(static_cast<size_t>(rows) * T, 0);
    lane.targets.assign(static_cast<size_t>(rows) * T, 0);
  }

  if (options_.resume.empty()) {
    InitParameters(layout, job_.seed(), mc.initializer_range(), state_.params.data());
    state_.trainer.set_step(0);
    state_.trainer.set_tokens_seen(0);
    state_.trainer.set_last_val_loss(std::nan(""));
  } else {
    MUONPS_ASSIGN_OR_RETURN(std::string dir, ResolveCheckpointDir(options_.resume));
    MUONPS_RETURN_IF_ERROR(ReadCheckpoint(dir, layout, mc, job_.optimizer().name(), &state_));
    const v1::JobSpec& saved = state_.trainer.job();
    if (saved.seed() != job_.seed() || saved.optimizer().name() != job_.optimizer().name()) {
      return absl::FailedPreconditionError(
          absl::StrCat(dir, ": the checkpoint was trained with a different seed or optimizer"));
    }
    if (!SameNumerics(state_.trainer.numerics(), LocalNumerics())) {
      resume_note_ = ResumeNumericsNote(state_.trainer.numerics());
    }
    if (state_.trainer.step() > job_.schedule().total_steps()) {
      return absl::FailedPreconditionError(
          absl::StrCat(dir, ": checkpoint is at step ", state_.trainer.step(),
                       ", beyond the job's schedule.total_steps ", job_.schedule().total_steps()));
    }
  }
  *state_.trainer.mutable_job() = job_;
  *state_.trainer.mutable_numerics() = LocalNumerics();
  return absl::OkStatus();
}

absl::StatusOr<StepReport> Trainer::Step() {
  using Clock = std::chrono::steady_clock;
  const auto t0 = Clock::now();
  const int64_t step_index = state_.trainer.step();  // 0-based index of this step
  const int slots = job_.batch().slots(), rows = job_.batch().micro_batch();
  const StepScales scales = StepScalesOf(job_);

  StepReport report;
  report.total_steps = job_.schedule().total_steps();
  report.tokens = scales.global_tokens;
  report.lr = StepLearningRate(job_, step_index);

  // 1. Slot gradients, computed in waves of one slot per lane, summed left to
  // right, with the parameters as a worker pulls them (transfer.dtype).
  std::fill(grads_.begin(), grads_.end(), 0.0f);
  const float* params = ComputeParameters();
  double loss_sum = 0.0, aux_sum = 0.0, fwd_time = 0.0, bwd_time = 0.0;
  ExpertLoads loads(job_.model());
  AttentionLogits logits(job_.model());
  absl::Status loads_ok;
  ForEachWave(slots, static_cast<int>(lanes_.size()), [&](int64_t base, int wave) {
    RunWave(wave, [&](int64_t i) {
      Lane& lane = lanes_[i];
      sampler_->Fill(step_index, static_cast<int>(base + i), lane.inputs.data(),
                     lane.targets.data());
      std::fill(lane.grads.begin(), lane.grads.end(), 0.0f);
      lane.stats =
          lane.model->ForwardBackward(params, lane.inputs.data(), lane.targets.data(), rows,
                                      scales.loss_scale, scales.aux_scale, lane.grads.data());
    });
    for (int i = 0; i < wave; ++i) {
      AccumulateSlotGradient(TransferDtypeOf(job_), lanes_[i].grads.data(),
                             static_cast<int64_t>(grads_.size()), grads_.data());
      const SlotStats& stats = lanes_[i].stats;
      loss_sum += stats.loss_sum;
      aux_sum += stats.aux_sum;
      fwd_time += stats.forward_seconds;
      bwd_time += stats.backward_seconds;
      if (loads_ok.ok()) loads_ok = loads.Add(stats.expert_load);
      if (loads_ok.ok()) loads_ok = logits.Add(stats.logit_max);
    }
  });
  MUONPS_RETURN_IF_ERROR(loads_ok);
  report.loss = loss_sum / static_cast<double>(scales.global_tokens);
  report.aux_loss = aux_sum / slots;
  if (!std::isfinite(report.loss)) {
    return absl::InternalError(absl::StrCat("loss is not finite at step ", step_index + 1,
                                            " (diverged: lower optimizer.lr?)"));
  }
  const auto t1 = Clock::now();

  // 2-4. Clip, update, rebalance.
  MUONPS_ASSIGN_OR_RETURN(report.grad_norm, ApplyOptimizer(report.lr, step_index));
  UpdateRouterBias(loads.layers());
  report.max_load_ratio = loads.MaxLoadRatio();
  // QK-Clip, tensor by tensor as the shards do it, after the update.
  const double tau = job_.optimizer().qk_clip_tau();
  report.max_attention_logit = -INFINITY;
  for (int l = 0; l < logits.layers(); ++l) {
    report.max_attention_logit = std::max<double>(report.max_attention_logit, logits.LayerMax(l));
    report.qk_clipped_heads += logits.ClippedHeads(l, tau);
  }
  if (tau > 0.0) {
    for (const TensorInfo& t : model().layout().tensors()) {
      ApplyQkClip(t, job_.model(), tau, logits, state_.params.data() + t.offset);
    }
  }
  const auto t2 = Clock::now();

  state_.trainer.set_step(step_index + 1);
  state_.trainer.set_tokens_seen(state_.trainer.tokens_seen() + scales.global_tokens);
  report.step = step_index + 1;

  // 5. Validation.
  const int eval_every = job_.data().eval_every();
  const bool last = report.step == job_.schedule().total_steps();
  if ((eval_every > 0 && report.step % eval_every == 0) || last) {
    report.val_loss = EvaluateValidation();
    state_.trainer.set_last_val_loss(*report.val_loss);
  }
  report.forward_backward_seconds = Seconds(t0, t1);
  if (fwd_time + bwd_time > 0) {
    report.forward_seconds = report.forward_backward_seconds * fwd_time / (fwd_time + bwd_time);
    report.backward_seconds = report.forward_backward_seconds - report.forward_seconds;
  }
  report.optimizer_seconds = Seconds(t1, t2);
  report.step_seconds = Seconds(t0, Clock::now());
  return report;
}

absl::StatusOr<double> Trainer::ApplyOptimizer(double lr, int64_t step_index) {
  const ModelLayout& layout = model().layout();
  const v1::OptimizerConfig& oc = job_.optimizer();
  // Global gradient norm over trainable tensors, summed in layout order.
  double sq = 0.0;
  for (const TensorInfo& t : layout.tensors()) {
    if (t.trainable()) sq += SumOfSquares(grads_.data() + t.offset, t.numel);
  }
  const double norm = std::sqrt(sq);
  if (!std::isfinite(norm)) {
    // Refuse the update: parameters and optimizer state stay as they were.
    std::string where = "?";
    for (const TensorInfo& t : layout.tensors()) {
      if (t.trainable() && !std::isfinite(SumOfSquares(grads_.data() + t.offset, t.numel))) {
        where = t.name;
        break;
      }
    }
    return absl::InternalError(absl::StrCat("gradient is not finite at step ", step_index + 1,
                                            " (first in ", where, "); the state is left at step ",
                                            step_index));
  }
  const double coef = ClipCoefficient(oc.max_grad_norm(), norm);
  if (ClipApplies(coef)) {
    for (const TensorInfo& t : layout.tensors()) {
      if (t.trainable()) Scale(grads_.data() + t.offset, t.numel, static_cast<float>(coef));
    }
  }
  const OptimizerStep step = MakeOptimizerStep(oc, lr, step_index);
  std::vector<const TensorInfo*> tensors;
  for (const TensorInfo& t : layout.tensors()) {
    if (t.trainable()) tensors.push_back(&t);
  }
  RunTensorUpdates(tensors, oc.name(), [&](size_t k) {
    const TensorInfo& t = *tensors[k];
    UpdateTensor(t, step, state_.params.data() + t.offset, state_.momentum.data() + t.offset,
                 state_.exp_avg.data() + t.offset, state_.exp_avg_sq.data() + t.offset,
                 grads_.data() + t.offset);
  });
  return norm;
}

void Trainer::UpdateRouterBias(const std::vector<std::vector<int64_t>>& loads) {
  if (job_.model().balancing() != "aux_free_bias") return;
  const std::vector<int>& bias = model().bias_tensors();
  for (size_t l = 0; l < bias.size() && l < loads.size(); ++l) {
    const TensorInfo& t = model().layout().tensors()[bias[l]];
    muonps::UpdateRouterBias(state_.params.data() + t.offset, loads[l],
                             job_.model().bias_update_rate());
  }
}

int64_t Trainer::ActivationBytes() const {
  int64_t bytes = 0;
  for (const Lane& lane : lanes_) bytes += lane.model->ActivationBytes();
  return bytes;
}

const float* Trainer::ComputeParameters() {
  if (TransferDtypeOf(job_) == TransferDtype::kF32) return state_.params.data();
  wire_params_.resize(state_.params.size());
  RoundBf16(state_.params.data(), static_cast<int64_t>(state_.params.size()), wire_params_.data());
  return wire_params_.data();
}

double Trainer::EvaluateValidation() {
  const float* params = ComputeParameters();
  const int T = model().seq_len();
  const int rows = job_.batch().micro_batch();
  const int64_t batches = (val_windows_ + rows - 1) / rows;
  std::vector<SlotStats> stats(static_cast<size_t>(batches));
  ForEachWave(batches, static_cast<int>(lanes_.size()), [&](int64_t base, int wave) {
    RunWave(wave, [&](int64_t i) {
      const int64_t w = (base + i) * rows;
      const int B = static_cast<int>(std::min<int64_t>(rows, val_windows_ - w));
      stats[base + i] = lanes_[i].model->Forward(params, val_inputs_.data() + w * T,
                                                 val_targets_.data() + w * T, B);
    });
  });
  double loss_sum = 0.0;
  int64_t tokens = 0;
  for (const SlotStats& s : stats) {
    loss_sum += s.loss_sum;
    tokens += s.tokens;
  }
  return tokens > 0 ? loss_sum / static_cast<double>(tokens) : std::nan("");
}

absl::Status Trainer::SaveCheckpoint() {
  const std::string& root = job_.checkpoint().dir();
  if (root.empty()) return absl::OkStatus();
  std::error_code ec;
  std::filesystem::create_directories(root, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot create ", root, ": ", ec.message()));
  const std::string dir = absl::StrCat(root, "/", CheckpointName(state_.trainer.step()));
  MUONPS_RETURN_IF_ERROR(WriteCheckpoint(dir, model().layout(), state_));
  last_checkpoint_ = dir;
  PruneCheckpoints(root, job_.checkpoint().keep_last(), /*owner=*/"");
  return absl::OkStatus();
}

absl::StatusOr<TrainSummary> Trainer::Run() {
  const auto start = std::chrono::steady_clock::now();
  const int64_t total = job_.schedule().total_steps();
  const int64_t until =
      options_.until_step > 0 ? std::min<int64_t>(options_.until_step, total) : total;
  TrainSummary summary;
  int64_t tokens = 0;
  const int every = job_.checkpoint().every_steps();
  while (state_.trainer.step() < until) {
    if (options_.stop_requested && options_.stop_requested()) {
      summary.interrupted = true;
      break;
    }
    MUONPS_ASSIGN_OR_RETURN(StepReport report, Step());
    tokens += report.tokens;
    ++summary.steps_run;
    summary.final_loss = report.loss;
    if (report.val_loss) summary.final_val_loss = report.val_loss;
    if (options_.on_step) options_.on_step(report);
    if (every > 0 && report.step % every == 0 && report.step < until) {
      MUONPS_RETURN_IF_ERROR(SaveCheckpoint());
    }
  }
  if (summary.steps_run > 0) MUONPS_RETURN_IF_ERROR(SaveCheckpoint());
  summary.final_step = state_.trainer.step();
  summary.seconds = Seconds(start, std::chrono::steady_clock::now());
  summary.tokens_per_second = summary.seconds > 0 ? tokens / summary.seconds : 0.0;
  summary.last_checkpoint = last_checkpoint_;
  return summary;
}

}  // namespace muonps
