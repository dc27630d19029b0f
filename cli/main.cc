// muonps: one binary, a command per role (cli/help.cc lists them).
#include <signal.h>
#include <unistd.h>

#include <atomic>
#include <cctype>
#include <cmath>
#include <csignal>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <optional>
#include <string>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/cluster_cli.h"
#include "cli/help.h"
#include "cli/progress.h"
#include "common/blas_runtime.h"
#include "common/job_spec.h"
#include "common/numerics.h"
#include "common/parallel.h"
#include "services/coordinator/cluster_plan.h"
#include "trainer/trainer.h"

ABSL_FLAG(std::string, resume, "",
          "Checkpoint directory (or a directory of step-* checkpoints) to resume from");
ABSL_FLAG(int64_t, until, 0,
          "Stop after this many completed steps, in [1, schedule.total_steps] (absent: the whole "
          "schedule)");
ABSL_FLAG(int, threads, 0, "Threads for kernels and BLAS (0 = all cores, or MUONPS_THREADS)");
ABSL_FLAG(std::string, log_jsonl, "",
          "Append one JSON record per step and a summary to this file ('-' = stdout)");
ABSL_DECLARE_FLAG(bool, json);
ABSL_FLAG(bool, quiet, false, "No progress display on stderr");
ABSL_FLAG(std::string, blas_core, "portable",
          "OpenBLAS kernel family: portable (Haswell on every x86-64 CPU with AVX2 and FMA, so "
          "Intel and AMD members agree bit for bit), native (OpenBLAS's choice for this CPU), or "
          "a kernel name (Haswell, Zen, SkylakeX, Sandybridge, ...). Members of one cluster must "
          "compute alike: the coordinator refuses any other");

ABSL_FLAG(std::string, preset, "default",
          "defaults: the preset to print (default, small, moonlight-tiny, moonlight-16b-a3b)");
ABSL_FLAG(double, link_gbps, 0.0,
          "plan: each process's network link in Gbit/s per direction (0 = the loopback rate "
          "measured on the development machine)");
ABSL_FLAG(double, worker_gflops, 0.0,
          "plan: a worker's float32 GFLOP/s in forward and backward (0 = measured on the "
          "development machine)");
ABSL_FLAG(double, shard_gflops, 0.0,
          "plan: a shard's GFLOP/s in Newton-Schulz (0 = measured on the development machine)");
ABSL_DECLARE_FLAG(int, shards);
ABSL_DECLARE_FLAG(int, workers);

namespace muonps {
namespace {

std::atomic<bool> g_stop{false};
bool g_until_given = false;  // --until on the command line

// First Ctrl-C / SIGTERM: stop after the current step and checkpoint. Second:
// the default action (exit now).
void OnStopSignal(int signal_number) {
  g_stop.store(true);
  std::signal(signal_number, SIG_DFL);
}

int Train(const std::vector<std::string>& args) {
  absl::StatusOr<v1::JobSpec> job = args.empty() ? DefaultJobSpec() : LoadJobSpecFile(args[0]);
  if (!job.ok()) return Fail(job.status());
  const int64_t until = absl::GetFlag(FLAGS_until);
  if (g_until_given && (until < 1 || until > job->schedule().total_steps())) {
    return Fail(absl::InvalidArgumentError(
        absl::StrCat("--until: must be in [1, ", job->schedule().total_steps(),
                     "] (the job's schedule.total_steps), got ", until)));
  }
  ApplyThreadsFlag();

  ProgressDisplay progress(absl::GetFlag(FLAGS_quiet) ? nullptr : stderr,
                           absl::GetFlag(FLAGS_log_jsonl));
  if (!progress.status().ok()) return Fail(progress.status());
  TrainOptions options;
  options.resume = absl::GetFlag(FLAGS_resume);
  options.until_step = absl::GetFlag(FLAGS_until);
  options.on_step = [&](const StepReport& r) { progress.Step(r); };
  options.stop_requested = [] { return g_stop.load(); };
  std::signal(SIGINT, OnStopSignal);
  std::signal(SIGTERM, OnStopSignal);

  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(*job, options);
  if (!trainer.ok()) return Fail(trainer.status());
  if (!(*trainer)->resume_note().empty()) {
    std::fprintf(stderr, "muonps: note: %s\n", (*trainer)->resume_note().c_str());
  }
  progress.Start(*job, (*trainer)->corpus().description, (*trainer)->model().layout(),
                 (*trainer)->step(), (*trainer)->state().trainer.last_val_loss(), NumThreads(),
                 BlasCoreName());
  absl::StatusOr<TrainSummary> summary = (*trainer)->Run();
  if (!summary.ok()) {
    progress.Abort();
    return Fail(summary.status());
  }
  progress.Finish(*summary);
  if (summary->interrupted) {
    std::fprintf(stderr, "muonps: interrupted at step %lld%s\n",
                 static_cast<long long>(summary->final_step),
                 summary->last_checkpoint.empty() ? " (no checkpoint dir in the job)"
                                                  : "; resume with --resume");
    return 130;
  }
  return 0;
}

int Numerics() {
  const bool json = absl::GetFlag(FLAGS_json);
  const v1::NumericsProfile& p = LocalNumerics();
  const std::vector<std::string> cores = RunnableBlasCores();
  if (json) {
    std::string list;
    for (const std::string& c : cores) list += (list.empty() ? "\"" : ", \"") + c + "\"";
    std::printf(
        "{\"blas_core\": \"%s\", \"fingerprint\": \"%s\", \"version\": \"%s\", "
        "\"blas_config\": \"%s\", \"runnable_blas_cores\": [%s]}\n",
        p.blas_core().c_str(), p.fingerprint().c_str(), p.version().c_str(),
        p.blas_config().c_str(), list.c_str());
    return 0;
  }
  std::printf("BLAS kernel     %s\nfingerprint     %s\nmuonps          %s\nOpenBLAS        %s\n",
              p.blas_core().c_str(), p.fingerprint().c_str(), p.version().c_str(),
              p.blas_config().c_str());
  std::printf("runnable kernels");
  for (const std::string& c : cores) std::printf(" %s", c.c_str());
  std::printf("\n");
  return 0;
}

int Validate(const std::vector<std::string>& args) {
  if (args.size() != 1) {
    std::fprintf(stderr, "usage: muonps validate JOB.json\n");
    return 2;
  }
  absl::StatusOr<v1::JobSpec> job = LoadJobSpecFile(args[0]);
  if (!job.ok()) return Fail(job.status());
  std::cout << ToJson(*job);
  return 0;
}

int Plan(const std::vector<std::string>& args) {
  if (args.size() != 1) {
    std::fprintf(stderr, "usage: muonps plan JOB.json --workers N --shards M\n");
    return 2;
  }
  absl::StatusOr<v1::JobSpec> job = LoadJobSpecFile(args[0]);
  if (!job.ok()) return Fail(job.status());
  PlanOptions options;
  options.workers = absl::GetFlag(FLAGS_workers);
  options.shards = absl::GetFlag(FLAGS_shards);
  options.link_gbps = absl::GetFlag(FLAGS_link_gbps);
  options.worker_gflops = absl::GetFlag(FLAGS_worker_gflops);
  options.shard_gflops = absl::GetFlag(FLAGS_shard_gflops);
  absl::StatusOr<ClusterPlan> plan = PlanCluster(*job, options);
  if (!plan.ok()) return Fail(plan.status());
  std::cout << FormatPlan(*job, *plan);
  return 0;
}

}  // namespace
}  // namespace muonps

int main(int argc, char** argv) {
  muonps::PrepareComputeRuntime(argc, argv);
  absl::SetProgramUsageMessage(muonps::UsageMessage());
  if (std::optional<int> status = muonps::PreParseCommandLine(argc, argv)) return *status;
  muonps::g_until_given = muonps::FlagGiven(argc, argv, "until");
  // Service settings may come from MUONPS_<FLAG> variables; flags on the
  // command line come later and win.
  std::vector<std::string> from_env;
  for (const std::string& name : muonps::EnvironmentFlags()) {
    std::string var = "MUONPS_" + name;
    for (char& c : var) c = static_cast<char>(std::toupper(static_cast<unsigned char>(c)));
    if (const char* value = std::getenv(var.c_str())) from_env.push_back("--" + name + "=" + value);
  }
  std::vector<char*> full_argv = {argv[0]};
  for (std::string& flag : from_env) full_argv.push_back(flag.data());
  for (int i = 1; i < argc; ++i) full_argv.push_back(argv[i]);
  std::vector<char*> positional =
      absl::ParseCommandLine(static_cast<int>(full_argv.size()), full_argv.data());
  std::vector<std::string> args(positional.begin() + 1, positional.end());
  if (args.empty()) {
    std::fprintf(stderr, "muonps: error: no command; `muonps help` lists them\n");
    return 2;
  }
  const std::string command = args[0];
  args.erase(args.begin());
  // Every product relies on a single-threaded BLAS (common/gemm.h).
  if (absl::Status st = muonps::CheckBlasRuntime(); !st.ok()) return muonps::Fail(st);
  if (command == "train") return muonps::Train(args);
  if (command == "validate") return muonps::Validate(args);
  if (command == "numerics") return muonps::Numerics();
  if (command == "defaults") {
    absl::StatusOr<muonps::v1::JobSpec> job = muonps::PresetJobSpec(absl::GetFlag(FLAGS_preset));
    if (!job.ok()) return muonps::Fail(job.status());
    std::cout << muonps::ToJson(*job);
    return 0;
  }
  if (command == "plan") return muonps::Plan(args);
  if (const int status = muonps::RunClusterCommand(command, args); status >= 0) return status;
  if (command == "version") {
    std::printf("muonps %s (BLAS core %s, numerics fingerprint %s)\n", muonps::MuonpsVersion(),
                muonps::BlasCoreName().c_str(), muonps::LocalNumerics().fingerprint().c_str());
    return 0;
  }
  std::fprintf(stderr, "muonps: error: unknown command \"%s\"; `muonps help` lists them\n",
               command.c_str());
  return 2;
}
