// Step time of the same job in one process (`muonps train`) and as a cluster
// of processes on loopback (`muonps local`), measured in the same run.
//
//   ./build/bench/cluster_step [--steps=30] [--warmup=5] [--reps=3] [--threads=0]
//                              [--binary=PATH] [--preset=default|small]
//                              [--checkpoint_every=10] [--only=2+2,ckpt,...]
//
// The job is the default one (`muonps defaults`: 4 slots x 2 x 256 tokens)
// with --steps steps, random sampling, no periodic evaluation and no
// checkpoints. It runs as subprocesses of the real binary:
//   train  muonps train JOB --log_jsonl F      (step_s of every step record)
//   1+1    muonps local --shards 1 --workers 1 JOB --json
//   2+2    muonps local --shards 2 --workers 2 JOB --json
//   1+1 push after backward  1+1 with the workers' --overlap_push=false
//          (gradients pushed after the backward pass, not during it)
//   1+1 tasks after apply  1+1 with the coordinator's --plan_ahead=false
//          (a step's tasks handed out once the last step is applied, not
//          before: no pull of a tensor while the others are updated)
//   2+2 ckpt/10  the same with checkpoint.every_steps 10 (--checkpoint_every,
//          keep_last 2),
//          written in the background (the default), and
//   2+2 ckpt/10 sync  with checkpoint.background false (each step waits),
//          both compared with 2+2 on wall time per step over the whole run
//          (every cluster run writes the final checkpoint),
//   2+2 replicas:2  recovery.replicas 2 (a copy of every tensor's state on
//          the other shard, pushed to and updated every step), compared
//          with 2+2 on the median step time
//   1+1 bf16  transfer.dtype bf16 (parameters and gradients in bf16 on the
//          wire), compared with 1+1 on the median step time, with the
//          bytes per step and worker of each
// (the cluster's figure is job.progress.step_seconds of each STEP event: the
// coordinator's wall time from handing out the step's tasks, or from the
// last step's ApplyStep returning when they went out before it, to the
// shards' ApplyStep returning). A run's figure is the median step time over steps
// warmup+1 .. steps-1: the first steps warm caches, connections and thread
// pools, and the last step always evaluates. The runs alternate train, 1+1,
// 2+2 for --reps rounds so that machine noise hits all alike; every figure is
// the median over rounds. ratio = cluster ms/step / train ms/step; the goal
// for 1 shard + 1 worker is <= 1.05 (distribution costs at most 5%).
#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <string>
#include <tuple>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "common/blas_runtime.h"
#include "common/job_spec.h"
#include "nlohmann/json.hpp"
#include "services/coordinator/cluster_plan.h"

ABSL_FLAG(int, steps, 30, "Steps of each run (the job's schedule.total_steps)");
ABSL_FLAG(int, warmup, 5, "Leading steps of each run left out of its median");
ABSL_FLAG(int, reps, 3,
          "Rounds of (train, 1+1, 2+2, 2+2 with a checkpoint every 10 steps in the background and "
          "waited for); medians over rounds "
          "are reported");
ABSL_FLAG(int, threads, 0, "--threads for every run (0 = the binary's default, all cores)");
ABSL_FLAG(std::string, binary, MUONPS_BINARY, "The muonps binary to run");
ABSL_FLAG(bool, keep, false, "Keep the work directory (job, logs) after a successful run");
ABSL_FLAG(std::string, preset, "default", "The job's preset (muonps defaults --preset)");
ABSL_FLAG(int, checkpoint_every, 10, "checkpoint.every_steps of the checkpointing setups");
ABSL_FLAG(std::string, only, "",
          "Comma-separated setups to run (train, 1+1, 1+1-push-after, 1+1-plan-after, 2+2, ckpt, "
          "ckpt-sync, "
          "replicas, bf16); empty = "
          "all. Comparisons whose setups did not run are left out");

namespace muonps {
namespace {

constexpr double kGoalRatio = 1.05;

[[noreturn]] void Die(const std::string& what) { muonps::Die("cluster_step", what); }

// Runs argv[0] with `args`, stdout and stderr into files; returns the exit status.
int RunProcess(const std::vector<std::string>& argv, const std::string& out,
               const std::string& err) {
  const pid_t pid = StartProcess(argv, out, err);
  if (pid < 0) Die("fork failed");
  return WaitProcess(pid);
}

// One way of running the job: in one process (shards == 0) or as a cluster,
// with a checkpoint every `checkpoint_every` steps (0: none).
struct Setup {
  std::string name;
  int shards = 0, workers = 0;
  int checkpoint_every = 0;
  bool background = true;     // checkpoint.background
  int replicas = 1;           // recovery.replicas
  std::string dtype = "f32";  // transfer.dtype
  bool overlap_push = true;   // the workers' --overlap_push (MUONPS_OVERLAP_PUSH)
  bool plan_ahead = true;     // the coordinator's --plan_ahead (MUONPS_PLAN_AHEAD)
};

// What one run measured: the median step time, and the wall time from the
// job's start to its end over its steps (checkpoints between steps
// included, which step times leave out).
struct RunFigures {
  double median_step_s = 0.0;
  double wall_per_step_s = 0.0;
  // `muonps train` only: medians of its forward + backward and optimizer
  // times, which calibrate the plan's worker and shard rates.
  double fwd_bwd_s = 0.0, optimizer_s = 0.0;
};

// (step, seconds) of every step a run reported.
using StepTimes = std::vector<std::pair<int64_t, double>>;

// `split` (may be null) receives (step, fwd_bwd_s, optimizer_s).
StepTimes ParseTrainLog(const std::string& text,
                        std::vector<std::tuple<int64_t, double, double>>* split = nullptr) {
  StepTimes out;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || j.value("event", "") != "step") continue;
    out.emplace_back(j.value("step", int64_t{0}), j.value("step_s", 0.0));
    if (split != nullptr) {
      split->emplace_back(j.value("step", int64_t{0}), j.value("fwd_bwd_s", 0.0),
                          j.value("optimizer_s", 0.0));
    }
  }
  return out;
}

// WatchJobResponse JSON lines (proto field names; int64 as strings);
// `wall` receives ended_at - started_at of the last event.
StepTimes ParseWatchJson(const std::string& text, double* wall) {
  StepTimes out;
  std::istringstream lines(text);
  std::string line;
  while (std::getline(lines, line)) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded()) continue;
    if (j.contains("job")) {
      *wall = j["job"].value("ended_at", 0.0) - j["job"].value("started_at", 0.0);
    }
    if (j.value("kind", "") != "JOB_EVENT_KIND_STEP") continue;
    const nlohmann::json& p = j["job"]["progress"];
    const nlohmann::json& step = p["step"];
    const int64_t s =
        step.is_string() ? std::atoll(step.get<std::string>().c_str()) : step.get<int64_t>();
    out.emplace_back(s, p.value("step_seconds", 0.0));
  }
  return out;
}

// Runs the job once as `setup`; returns the median step time (seconds) over
// steps warmup+1 .. steps-1.
RunFigures RunOnce(const Setup& setup, const std::string& binary, const std::string& job_path,
                   const std::string& dir, int round, int steps, int warmup, int threads) {
  std::string file_name = setup.name;  // "2+2 ckpt/10" -> "2+2_ckpt_10"
  for (char& c : file_name) {
    if (c == ' ' || c == '/') c = '_';
  }
  const std::string tag = absl::StrCat(dir, "/", file_name, "-", round);
  const std::string out = tag + ".out", err = tag + ".err";
  std::vector<std::string> argv = {binary};
  std::string jsonl;
  if (setup.shards == 0) {
    jsonl = tag + ".jsonl";
    argv.insert(argv.end(), {"train", job_path, "--quiet", "--log_jsonl=" + jsonl});
  } else {
    std::string job_file = job_path;
    {
      // The same job, checkpointing into the work directory: every cluster
      // run writes the final checkpoint, so that wall times differ only by
      // the periodic ones.
      absl::StatusOr<v1::JobSpec> job = LoadJobSpecFile(job_path);
      if (!job.ok()) Die(std::string(job.status().message()));
      job->mutable_checkpoint()->set_dir(tag + "-ckpt");
      job->mutable_checkpoint()->set_every_steps(setup.checkpoint_every);
      job->mutable_checkpoint()->set_keep_last(2);
      job->mutable_checkpoint()->set_background(setup.background);
      job->mutable_recovery()->set_replicas(setup.replicas);
      job->mutable_transfer()->set_dtype(setup.dtype);
      job_file = tag + "-job.json";
      std::ofstream(job_file) << ToJson(*job);
    }
    argv.insert(argv.end(), {"local", absl::StrCat("--shards=", setup.shards),
                             absl::StrCat("--workers=", setup.workers), job_file, "--json",
                             "--log_dir=" + tag + "-logs", "--checkpoint_root=" + dir});
  }
  if (threads > 0) argv.push_back(absl::StrCat("--threads=", threads));
  // The environment reaches the workers `muonps local` starts.
  if (!setup.overlap_push) setenv("MUONPS_OVERLAP_PUSH", "false", 1);
  if (!setup.plan_ahead) setenv("MUONPS_PLAN_AHEAD", "false", 1);
  const int rc = RunProcess(argv, out, err);
  unsetenv("MUONPS_OVERLAP_PUSH");
  unsetenv("MUONPS_PLAN_AHEAD");
  if (rc != 0) {
    Die(absl::StrCat(setup.name, " exited with status ", rc, "; ", err, " ends:\n",
                     Tail(ReadFile(err), 2000)));
  }
  double wall = 0.0;
  std::vector<std::tuple<int64_t, double, double>> split;
  const StepTimes times = setup.shards == 0 ? ParseTrainLog(ReadFile(jsonl), &split)
                                            : ParseWatchJson(ReadFile(out), &wall);
  std::vector<double> fwd_bwd, optimizer;
  for (const auto& [step, fb, opt] : split) {
    if (step > warmup && step < steps) {
      fwd_bwd.push_back(fb);
      optimizer.push_back(opt);
    }
  }
  std::vector<double> kept;
  for (const auto& [step, seconds] : times) {
    if (step > warmup && step < steps) kept.push_back(seconds);
  }
  if (kept.empty()) {
    Die(absl::StrCat(setup.name, ": no step times after warm-up in ", out, " (", times.size(),
                     " steps reported)"));
  }
  RunFigures figures{Median(kept), wall / steps};
  if (!fwd_bwd.empty()) {
    figures.fwd_bwd_s = Median(fwd_bwd);
    figures.optimizer_s = Median(optimizer);
  }
  return figures;
}

int Run() {
  const int steps = std::max(3, absl::GetFlag(FLAGS_steps));
  const int warmup = std::clamp(absl::GetFlag(FLAGS_warmup), 0, steps - 2);
  const int reps = std::max(1, absl::GetFlag(FLAGS_reps));
  const int threads = absl::GetFlag(FLAGS_threads);
  const std::string binary = absl::GetFlag(FLAGS_binary);
  if (access(binary.c_str(), X_OK) != 0) Die(absl::StrCat(binary, " is not an executable"));

  char pattern[] = "/tmp/muonps-cluster-step-XXXXXX";
  if (mkdtemp(pattern) == nullptr) Die("cannot create a work directory");
  const std::string dir = pattern;
  absl::StatusOr<v1::JobSpec> preset = PresetJobSpec(absl::GetFlag(FLAGS_preset));
  if (!preset.ok()) Die(std::string(preset.status().message()));
  v1::JobSpec job = *preset;
  job.set_name("cluster-step");
  job.mutable_schedule()->set_total_steps(steps);
  job.mutable_schedule()->set_warmup_steps(std::min(job.schedule().warmup_steps(), steps));
  job.mutable_data()->set_sampling("random");
  job.mutable_data()->set_eval_every(0);
  job.mutable_checkpoint()->set_dir("");
  if (absl::Status st = ValidateJobSpec(job); !st.ok()) Die(std::string(st.message()));
  const std::string job_path = dir + "/job.json";
  std::ofstream(job_path) << ToJson(job);

  const v1::ModelConfig& m = job.model();
  std::printf(
      "cluster_step: %s model (V=%d C=%d L=%d E=%d K=%d), %d slots x %d x %d tokens, %s, "
      "%d steps, random sampling, no evaluation but the last step's\n"
      "  figure: median step time over steps %d..%d of each run, median over %d rounds "
      "(train, 1+1, 2+2 alternating); threads %s; BLAS %s\n"
      "  binary %s; work directory %s\n",
      absl::GetFlag(FLAGS_preset).c_str(), m.vocab_size(), m.hidden_size(), m.num_hidden_layers(),
      m.n_routed_experts(), m.num_experts_per_tok(), job.batch().slots(), job.batch().micro_batch(),
      m.max_position_embeddings(), job.optimizer().name().c_str(), steps, warmup + 1, steps - 1,
      reps, threads > 0 ? std::to_string(threads).c_str() : "all cores", BlasCoreName().c_str(),
      binary.c_str(), dir.c_str());
  std::fflush(stdout);

  const int every = std::max(1, absl::GetFlag(FLAGS_checkpoint_every));
  const std::string ckpt = absl::StrCat("2+2 ckpt/", every);
  // (short name for --only, setup)
  const std::vector<std::pair<std::string, Setup>> all = {
      {"train", {"train", 0, 0}},
      {"1+1", {"1+1", 1, 1}},
      {"1+1-push-after", {"1+1 push after backward", 1, 1, 0, true, 1, "f32", false}},
      {"1+1-plan-after", {"1+1 tasks after apply", 1, 1, 0, true, 1, "f32", true, false}},
      {"2+2", {"2+2", 2, 2}},
      {"ckpt", {ckpt, 2, 2, every, true}},
      {"ckpt-sync", {ckpt + " sync", 2, 2, every, false}},
      {"replicas", {"2+2 replicas:2", 2, 2, 0, true, 2}},
      {"bf16", {"1+1 bf16", 1, 1, 0, true, 1, "bf16"}}};
  const std::vector<std::string> only =
      absl::StrSplit(absl::GetFlag(FLAGS_only), ',', absl::SkipEmpty());
  std::vector<Setup> setups;
  std::map<std::string, size_t> index;  // short name -> setups index
  for (const auto& [name, setup] : all) {
    if (!only.empty() && std::find(only.begin(), only.end(), name) == only.end()) continue;
    index[name] = setups.size();
    setups.push_back(setup);
  }
  if (setups.empty()) Die("--only names no setup");
  std::vector<std::vector<double>> seconds(setups.size());  // [setup][round]
  std::vector<std::vector<double>> walls(setups.size());
  std::vector<double> train_fwd_bwd, train_optimizer;  // the plan's calibration
  for (int round = 0; round < reps; ++round) {
    std::printf("round %d:", round + 1);
    for (size_t k = 0; k < setups.size(); ++k) {
      const RunFigures f = RunOnce(setups[k], binary, job_path, dir, round, steps, warmup, threads);
      seconds[k].push_back(f.median_step_s);
      if (setups[k].shards == 0) {
        train_fwd_bwd.push_back(f.fwd_bwd_s);
        train_optimizer.push_back(f.optimizer_s);
      }
      walls[k].push_back(f.wall_per_step_s);
      std::printf("  %s %.1f ms", setups[k].name.c_str(), seconds[k].back() * 1e3);
      std::fflush(stdout);
    }
    std::printf("\n");
  }
  auto ran = [&](const std::string& name) { return index.count(name) != 0; };

  // The plan with this run's own rates: a worker's GFLOP/s from `train`'s
  // forward + backward, a shard's from its optimizer step (nearly all of it
  // Newton-Schulz), each shared by the processes that share the cores; the
  // link stays the loopback default.
  std::optional<PlanOptions> calibrated;
  if (ran("train") && Median(train_fwd_bwd) > 0.0 && Median(train_optimizer) > 0.0) {
    absl::StatusOr<ClusterPlan> one = PlanCluster(job, LocalPlanOptions(1, 1));
    if (one.ok()) {
      double ns_gflop = 0.0;
      for (const ShardPlan& sp : one->shards) ns_gflop += sp.ns_gflop;
      PlanOptions o;
      o.worker_gflops = one->flops_per_token * static_cast<double>(one->tokens_per_step) * 1e-9 /
                        Median(train_fwd_bwd);
      o.shard_gflops = ns_gflop / Median(train_optimizer);
      calibrated = o;
      std::printf(
          "plan calibrated on train: worker %.1f GFLOP/s, shard %.1f GFLOP/s (defaults "
          "%.1f and %.1f)\n",
          o.worker_gflops, o.shard_gflops, LocalPlanOptions(1, 1).worker_gflops,
          LocalPlanOptions(1, 1).shard_gflops);
    }
  }
  auto calibrated_for = [&](int workers, int shards) {
    PlanOptions o = *calibrated;
    o.workers = workers;
    o.shards = shards;
    o.worker_gflops /= std::max(1, workers);
    o.shard_gflops /= std::max(1, shards);
    return o;
  };

  if (ran("train")) {
    const size_t t = index["train"];
    const double train_s = Median(seconds[t]);
    std::printf("%-34s %8.1f ms/step\n", "train (1 process)", train_s * 1e3);
    for (const char* name : {"1+1", "2+2"}) {
      if (!ran(name)) continue;
      const size_t k = index[name];
      std::vector<double> ratios;
      ratios.reserve(static_cast<size_t>(reps));
      for (int r = 0; r < reps; ++r) ratios.push_back(seconds[k][r] / seconds[t][r]);
      const auto [lo, hi] = std::minmax_element(ratios.begin(), ratios.end());
      const double s = Median(seconds[k]);
      const double ratio = s / train_s;
      const std::string label =
          absl::StrCat("local ", setups[k].shards, " shard(s) + ", setups[k].workers, " worker(s)");
      std::printf("%-34s %8.1f ms/step  ratio to train %.2f (per round %.2f .. %.2f)",
                  label.c_str(), s * 1e3, ratio, *lo, *hi);
      // `muonps plan`'s prediction for the same shape on this machine's cores.
      absl::StatusOr<ClusterPlan> plan =
          PlanCluster(job, LocalPlanOptions(setups[k].workers, setups[k].shards));
      if (plan.ok()) {
        std::printf("  plan %.1f ms (measured / plan %.2f)", plan->serial_seconds * 1e3,
                    s / plan->serial_seconds);
      }
      if (calibrated.has_value()) {
        absl::StatusOr<ClusterPlan> own =
            PlanCluster(job, calibrated_for(setups[k].workers, setups[k].shards));
        if (own.ok()) {
          const double r = s / own->serial_seconds;
          std::printf("  calibrated plan %.1f ms (%.2f; goal within 20%%: %s)",
                      own->serial_seconds * 1e3, r, r >= 0.8 && r <= 1.2 ? "met" : "NOT MET");
        }
      }
      if (setups[k].shards == 1 && setups[k].workers == 1) {
        std::printf("  goal <= %.2f: %s", kGoalRatio, ratio <= kGoalRatio ? "met" : "NOT MET");
      }
      std::printf("\n");
    }
  }
  // Checkpoints against none, on the whole run's wall time per step (a
  // checkpoint happens between steps): written in the background, and with
  // each step waiting for the write.
  if (ran("2+2") && ran("ckpt")) {
    const double plain = Median(walls[index["2+2"]]), background = Median(walls[index["ckpt"]]);
    std::printf("%-34s %8.1f ms/step wall, without %.1f: overhead %+.1f%% (goal <= 2%%: %s)\n",
                absl::StrCat("local 2+2, checkpoint/", every, " background").c_str(),
                background * 1e3, plain * 1e3, (background / plain - 1.0) * 100.0,
                background <= plain * 1.02 ? "met" : "NOT MET");
  }
  if (ran("2+2") && ran("ckpt-sync")) {
    const double plain = Median(walls[index["2+2"]]), sync = Median(walls[index["ckpt-sync"]]);
    std::printf("%-34s %8.1f ms/step wall, without %.1f: overhead %+.1f%%\n",
                absl::StrCat("local 2+2, checkpoint/", every, " waited for").c_str(), sync * 1e3,
                plain * 1e3, (sync / plain - 1.0) * 100.0);
  }
  // A second copy of every tensor's state against none, on the median step
  // time (the copies cost every step: pushes, updates and memory).
  if (ran("2+2") && ran("replicas")) {
    const double two = Median(seconds[index["replicas"]]), one = Median(seconds[index["2+2"]]);
    std::printf("%-34s %8.1f ms/step, without %.1f: overhead %+.1f%% (goal <= 5%%: %s)\n",
                "local 2+2, recovery.replicas 2", two * 1e3, one * 1e3, (two / one - 1.0) * 100.0,
                two <= one * 1.05 ? "met" : "NOT MET");
  }
  // Pushes during the backward pass against pushes after it.
  if (ran("1+1") && ran("1+1-push-after")) {
    const double during = Median(seconds[index["1+1"]]);
    const double after = Median(seconds[index["1+1-push-after"]]);
    std::printf("%-34s %8.1f ms/step, pushing after the backward pass %.1f: %+.1f%%\n",
                "local 1+1, pushes during backward", during * 1e3, after * 1e3,
                (during / after - 1.0) * 100.0);
  }
  // Tasks handed out before the apply (each tensor pulled as it is updated)
  // against tasks after it.
  if (ran("1+1") && ran("1+1-plan-after")) {
    const double ahead = Median(seconds[index["1+1"]]);
    const double after = Median(seconds[index["1+1-plan-after"]]);
    std::printf("%-34s %8.1f ms/step, tasks after the apply %.1f: %+.1f%%\n",
                "local 1+1, tasks before the apply", ahead * 1e3, after * 1e3,
                (ahead / after - 1.0) * 100.0);
  }
  // bf16 on the wire against f32: step time, and the bytes each worker
  // moves per step (muonps plan's count of the same job).
  if (ran("1+1") && ran("bf16")) {
    const double bf16 = Median(seconds[index["bf16"]]), f32 = Median(seconds[index["1+1"]]);
    v1::JobSpec half = job;
    half.mutable_transfer()->set_dtype("bf16");
    absl::StatusOr<ClusterPlan> plan_f32 = PlanCluster(job, LocalPlanOptions(1, 1));
    absl::StatusOr<ClusterPlan> plan_bf16 = PlanCluster(half, LocalPlanOptions(1, 1));
    std::printf("%-34s %8.1f ms/step, f32 %.1f: %+.1f%%", "local 1+1, transfer.dtype bf16",
                bf16 * 1e3, f32 * 1e3, (bf16 / f32 - 1.0) * 100.0);
    if (plan_f32.ok() && plan_bf16.ok()) {
      const double a = static_cast<double>(plan_f32->pull_bytes + plan_f32->push_bytes);
      const double b = static_cast<double>(plan_bf16->pull_bytes + plan_bf16->push_bytes);
      std::printf("; pulled + pushed per step and worker %.1f MiB, f32 %.1f MiB (%.2fx)",
                  b / 1048576.0, a / 1048576.0, b / a);
    }
    std::printf("\n");
  }
  if (!absl::GetFlag(FLAGS_keep)) std::filesystem::remove_all(dir);
  return 0;
}

}  // namespace
}  // namespace muonps

int main(int argc, char** argv) {
  muonps::PrepareComputeRuntime(argc, argv);
  absl::ParseCommandLine(argc, argv);
  return muonps::Run();
}
