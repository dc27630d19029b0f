// One training step of the default model, next to the same step in PyTorch.
//
//   ./build/bench/train_step [--steps=10] [--warmup=3] [--threads=0] [--torch=true]
//
// The step is the single-process trainer's: for each of the 4 slots (micro
// batch 2, T 256: 2048 tokens per step) a ForwardBackward into a zeroed slot
// gradient, summed left to right; then global-norm clipping, Muon on the
// hidden matrices and AdamW on embedding, head and norms (the default job),
// and the router-bias update. Tokens are random. Every figure is the median
// over --steps measured steps after --warmup unmeasured ones.
//   forward   MoeModel::Forward of every slot, timed in a separate pass
//   backward  ForwardBackward time minus the forward time
//   optimizer clipping + Muon/AdamW + bias update
//   step      ForwardBackward of every slot + gradient sums + optimizer
// Then bench/torch_train_step.py runs the same model (float32, same shapes and
// thread count, experts as grouped gathers) under torch.optim.AdamW and under
// a Muon (NS5) + AdamW step, and the ratio of step throughputs is printed next
// to the goal (muonps >= 2x PyTorch). Without torch the comparison is skipped.
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <random>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "common/blas_runtime.h"
#include "common/job_spec.h"
#include "common/model_layout.h"
#include "common/parallel.h"
#include "nlohmann/json.hpp"
#include "services/optimizer/adamw.h"
#include "services/optimizer/grad_norm.h"
#include "services/optimizer/muon.h"
#include "workers/model/moe_model.h"

ABSL_FLAG(int, steps, 10, "Measured steps");
ABSL_FLAG(int, warmup, 3, "Unmeasured warm-up steps");
ABSL_FLAG(int, threads, 0, "Threads (0 = the OpenMP default, all cores)");
ABSL_FLAG(bool, torch, true, "Also time the PyTorch step (bench/torch_train_step.py)");
ABSL_FLAG(std::string, python, "/usr/bin/python3", "Python interpreter with torch and numpy");

namespace muonps {
namespace {

constexpr double kGoalRatio = 2.0;

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t mid = v.size() / 2;
  return v.size() % 2 == 1 ? v[mid] : 0.5 * (v[mid - 1] + v[mid]);
}

struct StepTimes {
  std::vector<double> forward, backward, optimizer, step;  // seconds
};

// The training state of the default job, stepped on random tokens.
class TrainStepBench {
 public:
  explicit TrainStepBench(const v1::JobSpec& job)
      : job_(job), model_(job.model()), T_(job.model().max_position_embeddings()) {
    const ModelLayout& layout = model_.layout();
    const int64_t total = layout.total_floats();
    params_.resize(total);
    InitParameters(layout, job.seed(), job.model().initializer_range(), params_.data());
    momentum_.assign(total, 0.0f);
    exp_avg_.assign(total, 0.0f);
    exp_avg_sq_.assign(total, 0.0f);
    grads_.assign(total, 0.0f);
    slot_grads_.assign(total, 0.0f);
    const int slots = job.batch().slots(), B = job.batch().micro_batch();
    std::mt19937 gen(job.seed());
    std::uniform_int_distribution<int32_t> token(0, job.model().vocab_size() - 1);
    inputs_.resize(slots);
    targets_.resize(slots);
    for (int s = 0; s < slots; ++s) {
      for (int i = 0; i < B * T_; ++i) {
        inputs_[s].push_back(token(gen));
        targets_[s].push_back(token(gen));
      }
    }
  }

  int64_t tokens_per_step() const {
    return static_cast<int64_t>(job_.batch().slots()) * job_.batch().micro_batch() * T_;
  }

  void Step(StepTimes* times) {
    const int slots = job_.batch().slots(), B = job_.batch().micro_batch();
    const float loss_scale = 1.0f / static_cast<float>(tokens_per_step());
    const float aux_scale = job_.model().balancing() == "aux_loss"
                                ? static_cast<float>(job_.model().aux_loss_alpha()) / slots
                                : 0.0f;
    // Forward only, for the forward/backward split.
    const auto f0 = Clock::now();
    for (int s = 0; s < slots; ++s) {
      model_.Forward(params_.data(), inputs_[s].data(), targets_[s].data(), B);
    }
    const double forward = Seconds(f0, Clock::now());

    const auto t0 = Clock::now();
    std::fill(grads_.begin(), grads_.end(), 0.0f);
    std::vector<std::vector<int64_t>> loads;
    for (int s = 0; s < slots; ++s) {
      std::fill(slot_grads_.begin(), slot_grads_.end(), 0.0f);
      const SlotStats stats =
          model_.ForwardBackward(params_.data(), inputs_[s].data(), targets_[s].data(), B,
                                 loss_scale, aux_scale, slot_grads_.data());
      for (size_t i = 0; i < grads_.size(); ++i) grads_[i] += slot_grads_[i];
      if (loads.empty()) loads = stats.expert_load;
      for (size_t l = 0; l < loads.size(); ++l) {
        for (size_t e = 0; e < loads[l].size(); ++e) loads[l][e] += stats.expert_load[l][e];
      }
    }
    const auto t1 = Clock::now();
    ApplyOptimizer(loads);
    const auto t2 = Clock::now();
    ++step_;

    const double fwd_bwd = Seconds(t0, t1);
    times->forward.push_back(forward);
    times->backward.push_back(fwd_bwd - forward);
    times->optimizer.push_back(Seconds(t1, t2));
    times->step.push_back(Seconds(t0, t2));
  }

 private:
  // As the trainer: clip, Muon / AdamW per tensor, router-bias update.
  void ApplyOptimizer(const std::vector<std::vector<int64_t>>& loads) {
    const ModelLayout& layout = model_.layout();
    const v1::OptimizerConfig& oc = job_.optimizer();
    double sq = 0.0;
    for (const TensorInfo& t : layout.tensors()) {
      if (t.trainable()) sq += SumOfSquares(grads_.data() + t.offset, t.numel);
    }
    const double norm = std::sqrt(sq);
    if (oc.max_grad_norm() > 0.0 && oc.max_grad_norm() / (norm + 1e-6) < 1.0) {
      const float coef = static_cast<float>(oc.max_grad_norm() / (norm + 1e-6));
      for (const TensorInfo& t : layout.tensors()) {
        if (t.trainable()) Scale(grads_.data() + t.offset, t.numel, coef);
      }
    }
    MuonHyper muon{oc.lr(),       oc.weight_decay(), oc.momentum(),
                   oc.nesterov(), oc.ns_steps(),     *ParseMuonScaleRule(oc.scale_rule())};
    AdamWHyper adam{oc.lr(), oc.adam_beta1(), oc.adam_beta2(), oc.adam_eps(), oc.weight_decay()};
    for (const TensorInfo& t : layout.tensors()) {
      if (!t.trainable()) continue;
      float* w = params_.data() + t.offset;
      const float* g = grads_.data() + t.offset;
      if (UsesMuon(t, oc.name())) {
        MuonStep(w, momentum_.data() + t.offset, g, t.rows(), t.cols(), muon);
      } else {
        AdamWStep(w, exp_avg_.data() + t.offset, exp_avg_sq_.data() + t.offset, g, t.numel,
                  step_ + 1, adam);
      }
    }
    if (job_.model().balancing() != "aux_free_bias") return;
    const float rate = static_cast<float>(job_.model().bias_update_rate());
    for (size_t l = 0; l < model_.bias_tensors().size() && l < loads.size(); ++l) {
      float* b = params_.data() + layout.tensors()[model_.bias_tensors()[l]].offset;
      int64_t total = 0;
      for (int64_t x : loads[l]) total += x;
      const double mean = static_cast<double>(total) / static_cast<double>(loads[l].size());
      for (size_t e = 0; e < loads[l].size(); ++e) {
        const double diff = mean - static_cast<double>(loads[l][e]);
        b[e] += rate * static_cast<float>((diff > 0) - (diff < 0));
      }
    }
  }

  v1::JobSpec job_;
  MoeModel model_;
  int T_;
  int64_t step_ = 0;
  std::vector<float> params_, momentum_, exp_avg_, exp_avg_sq_, grads_, slot_grads_;
  std::vector<std::vector<int32_t>> inputs_, targets_;  // per slot, (B, T)
};

// Runs the PyTorch bench and returns its JSON lines, or an empty list.
std::vector<nlohmann::json> RunTorch(const std::string& python, int threads, int steps,
                                     int warmup) {
  std::string script = __FILE__;
  script = script.substr(0, script.find_last_of('/') + 1) + "torch_train_step.py";
  const std::string command = absl::StrCat(python, " ", script, " --threads ", threads, " --steps ",
                                           steps, " --warmup ", warmup);
  std::vector<nlohmann::json> out;
  FILE* pipe = popen(command.c_str(), "r");
  if (pipe == nullptr) return out;
  std::string text;
  char buf[4096];
  size_t got;
  while ((got = std::fread(buf, 1, sizeof(buf), pipe)) > 0) text.append(buf, got);
  const int rc = pclose(pipe);
  size_t start = 0;
  while (start < text.size()) {
    size_t end = text.find('\n', start);
    if (end == std::string::npos) end = text.size();
    const std::string line = text.substr(start, end - start);
    start = end + 1;
    if (line.empty() || line[0] != '{') {
      if (!line.empty()) std::printf("  torch: %s\n", line.c_str());
      continue;
    }
    nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (!j.is_discarded()) out.push_back(std::move(j));
  }
  if (rc != 0 && out.empty()) {
    std::printf("  torch: %s exited with status %d\n", command.c_str(),
                WIFEXITED(rc) ? WEXITSTATUS(rc) : rc);
  }
  return out;
}

}  // namespace
}  // namespace muonps

int main(int argc, char** argv) {
  muonps::PrepareComputeRuntime(argc, argv);
  absl::ParseCommandLine(argc, argv);
  if (absl::GetFlag(FLAGS_threads) > 0) muonps::SetNumThreads(absl::GetFlag(FLAGS_threads));
  const int steps = std::max(1, absl::GetFlag(FLAGS_steps));
  const int warmup = std::max(0, absl::GetFlag(FLAGS_warmup));
  const int threads = muonps::NumThreads();

  const muonps::v1::JobSpec job = muonps::DefaultJobSpec();
  const muonps::v1::ModelConfig& m = job.model();
  muonps::TrainStepBench bench(job);
  std::printf(
      "train_step: default model (V=%d C=%d L=%d H=%d E=%d K=%d F=%d), %d slots x %d x %d = %lld "
      "tokens/step, optimizer %s, BLAS %s, %d threads, median of %d steps after %d warm-up\n",
      m.vocab_size(), m.hidden_size(), m.num_hidden_layers(), m.num_attention_heads(),
      m.n_routed_experts(), m.num_experts_per_tok(), m.moe_intermediate_size(), job.batch().slots(),
      job.batch().micro_batch(), m.max_position_embeddings(),
      static_cast<long long>(bench.tokens_per_step()), job.optimizer().name().c_str(),
      muonps::BlasCoreName().c_str(), threads, steps, warmup);

  muonps::StepTimes times, ignored;
  for (int i = 0; i < warmup; ++i) bench.Step(&ignored);
  for (int i = 0; i < steps; ++i) bench.Step(&times);
  const double step_s = muonps::Median(times.step);
  const double tokens_per_s = static_cast<double>(bench.tokens_per_step()) / step_s;
  std::printf(
      "muonps   step %8.1f ms  (forward %.1f, backward %.1f, optimizer %.1f ms)  %8.0f tokens/s\n",
      step_s * 1e3, muonps::Median(times.forward) * 1e3, muonps::Median(times.backward) * 1e3,
      muonps::Median(times.optimizer) * 1e3, tokens_per_s);

  if (!absl::GetFlag(FLAGS_torch)) return 0;
  const std::vector<nlohmann::json> torch =
      muonps::RunTorch(absl::GetFlag(FLAGS_python), threads, steps, warmup);
  if (torch.empty()) {
    std::printf("pytorch  unavailable (%s cannot run bench/torch_train_step.py): no ratio\n",
                absl::GetFlag(FLAGS_python).c_str());
    return 0;
  }
  for (const nlohmann::json& r : torch) {
    const double torch_tps = r.value("tokens_per_s", 0.0);
    const double ratio = torch_tps > 0 ? tokens_per_s / torch_tps : 0.0;
    std::printf(
        "pytorch  step %8.1f ms  (forward %.1f, backward %.1f, optimizer %.1f ms)  %8.0f tokens/s"
        "  [%s, torch %s, %d threads]  muonps/pytorch %.2fx (goal >= %.0fx: %s)\n",
        r.value("step_ms", 0.0), r.value("forward_ms", 0.0), r.value("backward_ms", 0.0),
        r.value("optimizer_ms", 0.0), torch_tps, r.value("optimizer", std::string("?")).c_str(),
        r.value("torch", std::string("?")).c_str(), r.value("threads", 0), ratio,
        muonps::kGoalRatio, ratio >= muonps::kGoalRatio ? "met" : "not met");
  }
  return 0;
}
