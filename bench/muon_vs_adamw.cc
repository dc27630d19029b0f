// Muon against AdamW on the same job: same model, data, steps and tokens.
// Prints both validation-loss curves and the first step at which Muon reaches
// AdamW's final validation loss (the sample-efficiency ratio).
//
//   muon_vs_adamw [--steps N] [--eval_every K] [--muon_lr X] [--adamw_lr Y] [JOB.json]
#include <cmath>
#include <cstdio>
#include <map>
#include <string>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "common/atomic_file.h"
#include "common/blas_runtime.h"
#include "common/job_spec.h"
#include "common/parallel.h"
#include "trainer/trainer.h"

ABSL_FLAG(int, steps, 300, "Optimizer steps for each run");
ABSL_FLAG(int, eval_every, 10, "Validation interval (steps)");
ABSL_FLAG(double, muon_lr, 0.0, "Muon peak lr (0 = the job's, else the Muon default)");
ABSL_FLAG(double, adamw_lr, 0.0, "AdamW peak lr (0 = the job's, else the AdamW default)");
ABSL_FLAG(int, threads, 0, "Threads (0 = all cores)");

namespace muonps {
namespace {

// step -> validation loss
// `job_has_lr`: the job file chose the lr; otherwise each optimizer gets its own default.
std::map<int64_t, double> Curve(v1::JobSpec job, bool job_has_lr, const std::string& optimizer,
                                double lr) {
  job.mutable_optimizer()->set_name(optimizer);
  if (lr > 0) {
    job.mutable_optimizer()->set_lr(lr);
  } else if (!job_has_lr) {
    job.mutable_optimizer()->clear_lr();
    FillJobDefaults(&job);
  }
  std::fprintf(stderr, "%s: peak lr %g\n", optimizer.c_str(), job.optimizer().lr());
  std::map<int64_t, double> curve;
  TrainOptions options;
  options.on_step = [&](const StepReport& r) {
    if (r.val_loss) {
      curve[r.step] = *r.val_loss;
      std::fprintf(stderr, "  %-5s step %4lld  val %.4f  train %.4f\n", optimizer.c_str(),
                   static_cast<long long>(r.step), *r.val_loss, r.loss);
    }
  };
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(job, options);
  if (!trainer.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(trainer.status().message()).c_str());
    std::exit(1);
  }
  curve[0] = (*trainer)->EvaluateValidation();
  absl::StatusOr<TrainSummary> summary = (*trainer)->Run();
  if (!summary.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(summary.status().message()).c_str());
    std::exit(1);
  }
  return curve;
}

}  // namespace
}  // namespace muonps

int main(int argc, char** argv) {
  muonps::PrepareComputeRuntime(argc, argv);
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  absl::StatusOr<muonps::v1::JobSpec> job =
      args.size() > 1 ? muonps::LoadJobSpecFile(args[1]) : muonps::DefaultJobSpec();
  bool job_has_lr = false;
  if (args.size() > 1 && job.ok()) {
    // Whether the file itself set optimizer.lr (defaults are filled in by now).
    absl::StatusOr<std::string> text = muonps::ReadFileToString(args[1]);
    job_has_lr = text.ok() && text->find("\"lr\"") != std::string::npos;
  }
  if (!job.ok()) {
    std::fprintf(stderr, "error: %s\n", std::string(job.status().message()).c_str());
    return 1;
  }
  const int threads = absl::GetFlag(FLAGS_threads);
  if (threads > 0) muonps::SetNumThreads(threads);
  job->mutable_schedule()->set_total_steps(absl::GetFlag(FLAGS_steps));
  job->mutable_schedule()->set_warmup_steps(
      std::min(job->schedule().warmup_steps(), absl::GetFlag(FLAGS_steps) / 10));
  job->mutable_data()->set_eval_every(absl::GetFlag(FLAGS_eval_every));
  job->mutable_checkpoint()->set_dir("");

  std::printf(
      "muon_vs_adamw: %d steps x %d tokens, default model, data %s, BLAS core %s\n",
      job->schedule().total_steps(),
      job->batch().slots() * job->batch().micro_batch() * job->model().max_position_embeddings(),
      job->data().path().c_str(), muonps::BlasCoreName().c_str());
  const auto muon = muonps::Curve(*job, job_has_lr, "muon", absl::GetFlag(FLAGS_muon_lr));
  const auto adamw = muonps::Curve(*job, job_has_lr, "adamw", absl::GetFlag(FLAGS_adamw_lr));

  std::printf("%6s %10s %10s\n", "step", "muon_val", "adamw_val");
  for (const auto& [step, loss] : muon) {
    auto it = adamw.find(step);
    std::printf("%6lld %10.4f %10.4f\n", static_cast<long long>(step), loss,
                it == adamw.end() ? NAN : it->second);
  }
  const double adamw_final = adamw.rbegin()->second;
  const int64_t total = adamw.rbegin()->first;
  int64_t reached = -1;
  for (const auto& [step, loss] : muon) {
    if (loss <= adamw_final) {
      reached = step;
      break;
    }
  }
  std::printf("AdamW final val loss %.4f at step %lld; Muon final val loss %.4f\n", adamw_final,
              static_cast<long long>(total), muon.rbegin()->second);
  if (reached > 0) {
    std::printf("Muon first reaches it at step %lld: %.2fx sample efficiency (paper: ~2x)\n",
                static_cast<long long>(reached), static_cast<double>(total) / reached);
  } else {
    std::printf("Muon does not reach AdamW's final val loss within %lld steps\n",
                static_cast<long long>(total));
  }
  return 0;
}
