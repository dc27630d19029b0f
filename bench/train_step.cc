// One training step of the default model, next to the same step in PyTorch.
//
//   ./build/bench/train_step [--steps=10] [--warmup=3] [--threads=0] [--torch=true]
//                            [--attention=both|mha|mla]
//
// The step is muonps::Trainer::Step on the default job (4 slots of micro
// batch 2, T 256: 2048 tokens per step, from the fortunes corpus): slot
// gradients (concurrently, one slot per thread), summed left to right; then
// global-norm clipping, Muon on the hidden matrices and AdamW on embedding,
// head and norms, and the router-bias update. Every figure is the median over
// --steps measured steps after --warmup unmeasured ones.
//   forward   the slots' forward+backward wall time, split in proportion to
//   backward  the forward and backward times each slot measured
//   optimizer clipping + Muon/AdamW + bias update
//   step      ForwardBackward of every slot + gradient sums + optimizer
// Then bench/torch_train_step.py runs the same model (float32, same shapes and
// thread count, experts as grouped gathers) under torch.optim.AdamW and under
// a Muon (NS5) + AdamW step, and the ratio of step throughputs is printed next
// to the goal (muonps >= 2x PyTorch). Without torch the comparison is skipped.
// With --attention=both (the default) the same step also runs with
// Multi-head Latent Attention on the default shapes (attention "mla" with
// its default widths: r = 4 D, nope = v = D, rope = D / 2), and its
// tokens/s, parameters and activation memory (every lane's activations and
// backward scratch, MoeModel::ActivationBytes) are printed next to MHA's.
#include <sys/wait.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"
#include "common/blas_runtime.h"
#include "common/job_spec.h"
#include "common/model_layout.h"
#include "common/parallel.h"
#include "nlohmann/json.hpp"
#include "trainer/trainer.h"

ABSL_FLAG(int, steps, 10, "Measured steps");
ABSL_FLAG(int, warmup, 3, "Unmeasured warm-up steps");
ABSL_FLAG(int, threads, 0, "Threads (0 = the OpenMP default, all cores)");
ABSL_FLAG(bool, torch, true, "Also time the PyTorch step (bench/torch_train_step.py)");
ABSL_FLAG(std::string, python, "/usr/bin/python3", "Python interpreter with torch and numpy");
ABSL_FLAG(std::string, attention, "both",
          "mha, mla, or both (MLA beside MHA on the default shapes)");

namespace muonps {
namespace {

constexpr double kGoalRatio = 2.0;

struct StepTimes {
  std::vector<double> forward, backward, optimizer, step;  // seconds
};

// The single-process trainer on the default job, stepped without evaluation.
class TrainStepBench {
 public:
  explicit TrainStepBench(v1::JobSpec job) : job_(std::move(job)) {
    job_.mutable_schedule()->set_total_steps(1000000);  // never reaches the final evaluation
    job_.mutable_data()->set_eval_every(0);
    job_.mutable_checkpoint()->set_dir("");
    absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(job_, {});
    if (!trainer.ok()) {
      std::fprintf(stderr, "train_step: %s\n", std::string(trainer.status().message()).c_str());
      std::exit(1);
    }
    trainer_ = std::move(*trainer);
  }

  int64_t tokens_per_step() const {
    return static_cast<int64_t>(job_.batch().slots()) * job_.batch().micro_batch() *
           job_.model().max_position_embeddings();
  }

  int64_t ActivationBytes() const { return trainer_->ActivationBytes(); }

  void Step(StepTimes* times) {
    absl::StatusOr<StepReport> r = trainer_->Step();
    if (!r.ok()) {
      std::fprintf(stderr, "train_step: %s\n", std::string(r.status().message()).c_str());
      std::exit(1);
    }
    times->forward.push_back(r->forward_seconds);
    times->backward.push_back(r->backward_seconds);
    times->optimizer.push_back(r->optimizer_seconds);
    times->step.push_back(r->step_seconds);
  }

 private:
  v1::JobSpec job_;
  std::unique_ptr<Trainer> trainer_;
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

  const std::string attention = absl::GetFlag(FLAGS_attention);
  if (attention != "both" && attention != "mha" && attention != "mla") {
    std::fprintf(stderr, "train_step: --attention must be both, mha or mla\n");
    return 2;
  }
  const muonps::v1::JobSpec job = muonps::DefaultJobSpec();
  const muonps::v1::ModelConfig& m = job.model();
  std::printf(
      "train_step: default model (V=%d C=%d L=%d H=%d E=%d K=%d F=%d), %d slots x %d x %d = %lld "
      "tokens/step, optimizer %s, BLAS %s, %d threads, median of %d steps after %d warm-up\n",
      m.vocab_size(), m.hidden_size(), m.num_hidden_layers(), m.num_attention_heads(),
      m.n_routed_experts(), m.num_experts_per_tok(), m.moe_intermediate_size(), job.batch().slots(),
      job.batch().micro_batch(), m.max_position_embeddings(),
      static_cast<long long>(job.batch().slots()) * job.batch().micro_batch() *
          m.max_position_embeddings(),
      job.optimizer().name().c_str(), muonps::BlasCoreName().c_str(), threads, steps, warmup);

  // One attention variant: its median step, tokens/s, parameters and activations.
  struct Result {
    double tokens_per_s = 0.0;
    int64_t parameters = 0, activations = 0;
  };
  auto run = [&](const char* variant) {
    muonps::v1::JobSpec v = job;
    if (std::string(variant) == "mla") {
      v.mutable_model()->set_attention("mla");
      muonps::FillJobDefaults(&v);
    }
    Result result;
    const muonps::ModelLayout layout(v.model());
    for (const muonps::TensorInfo& t : layout.tensors()) {
      result.parameters += t.numel;
    }
    muonps::TrainStepBench bench(v);
    muonps::StepTimes times, ignored;
    for (int i = 0; i < warmup; ++i) bench.Step(&ignored);
    for (int i = 0; i < steps; ++i) bench.Step(&times);
    result.activations = bench.ActivationBytes();
    const double step_s = muonps::Median(times.step);
    result.tokens_per_s = static_cast<double>(bench.tokens_per_step()) / step_s;
    std::printf(
        "muonps   step %8.1f ms  (forward %.1f, backward %.1f, optimizer %.1f ms)  %8.0f tokens/s"
        "  [%s: %.2f M parameters, %.1f MiB of activations]\n",
        step_s * 1e3, muonps::Median(times.forward) * 1e3, muonps::Median(times.backward) * 1e3,
        muonps::Median(times.optimizer) * 1e3, result.tokens_per_s, variant,
        result.parameters / 1e6, result.activations / 1048576.0);
    return result;
  };
  Result mha, mla;
  if (attention != "mla") mha = run("mha");
  if (attention != "mha") mla = run("mla");
  if (attention == "both") {
    std::printf("mla/mha  tokens/s %.2fx, parameters %.2fx, activations %.2fx\n",
                mla.tokens_per_s / mha.tokens_per_s,
                static_cast<double>(mla.parameters) / static_cast<double>(mha.parameters),
                static_cast<double>(mla.activations) /
                    static_cast<double>(std::max<int64_t>(1, mha.activations)));
  }
  const double tokens_per_s = attention == "mla" ? mla.tokens_per_s : mha.tokens_per_s;

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
