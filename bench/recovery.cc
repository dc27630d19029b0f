// Recovery from a shard SIGKILLed in the middle of a job, on a local cluster
// of the default job (2 shards, 2 workers, `muonps local`, which restarts the
// shard as a StatefulSet would):
//
//   ./build/bench/recovery [--reps=3] [--steps=40] [--kill_at=15] [--binary=PATH]
//
// For each checkpoint interval (every 10 and every 2 steps, written in the
// background) it kills one shard once the job reports step --kill_at and
// measures, per run:
//   recovery  seconds from the kill to the job's RECOVERY event in the watch
//             (noticing the loss included: the member lease, or a call that
//             fails first), and the event's own last_recovery_seconds (from
//             noticing to going on);
//   lost      the steps computed again (job.steps_lost).
// Each figure stands beside its floor measured or set in the same run: the
// lease (3 s unless MUONPS_LEASE_SECONDS says otherwise), printed as the ratio
// recovery / lease, and the steps since the last checkpoint at the kill.
// Medians over --reps runs.
#include <signal.h>

#include <chrono>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "bench/bench_util.h"
#include "common/blas_runtime.h"
#include "common/job_spec.h"
#include "nlohmann/json.hpp"

ABSL_FLAG(int, reps, 3, "Runs per checkpoint interval; medians over runs are reported");
ABSL_FLAG(int, steps, 40, "Steps of each run (the job's schedule.total_steps)");
ABSL_FLAG(int, kill_at, 15, "Kill a shard once the job reports this step");
ABSL_FLAG(std::string, binary, MUONPS_BINARY, "The muonps binary to run");
ABSL_FLAG(bool, keep, false, "Keep the work directory (jobs, logs) after a successful run");

namespace muonps {
namespace {

[[noreturn]] void Die(const std::string& what) { muonps::Die("recovery", what); }

double Now() {
  return std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
}

int64_t AsInt(const nlohmann::json& v) {
  if (v.is_number_integer()) return v.get<int64_t>();
  int64_t out = 0;
  if (v.is_string()) (void)absl::SimpleAtoi(v.get<std::string>(), &out);
  return out;
}

// What the watch (`local --json`) has said so far.
struct Watched {
  int64_t step = 0;
  bool recovered = false;
  double recovery_seconds = 0.0;  // last_recovery_seconds of the first RECOVERY
  int64_t steps_lost = 0;
  bool ended = false;
};

Watched ReadWatch(const std::string& path) {
  Watched w;
  for (absl::string_view line : absl::StrSplit(ReadFile(path), '\n', absl::SkipEmpty())) {
    const nlohmann::json j = nlohmann::json::parse(line, nullptr, /*allow_exceptions=*/false);
    if (j.is_discarded() || !j.contains("job")) continue;
    const nlohmann::json& job = j["job"];
    if (job.contains("progress"))
      w.step = std::max(w.step, AsInt(job["progress"].value("step", nlohmann::json(0))));
    const std::string state = job.value("state", "");
    w.ended = state == "JOB_STATE_SUCCEEDED" || state == "JOB_STATE_FAILED" ||
              state == "JOB_STATE_CANCELLED";
    if (!w.recovered && j.value("kind", "") == "JOB_EVENT_KIND_RECOVERY") {
      w.recovered = true;
      w.recovery_seconds = job.value("last_recovery_seconds", 0.0);
      w.steps_lost = AsInt(job.value("steps_lost", nlohmann::json(0)));
    }
  }
  return w;
}

// A shard process of the local cluster whose log directory is `log_dir`.
pid_t FindShard(const std::string& log_dir) {
  int port = 0;
  std::ifstream(log_dir + "/coordinator.port") >> port;
  if (port <= 0) return -1;
  const std::string needle = absl::StrCat("--coordinator=127.0.0.1:", port);
  for (const auto& entry : std::filesystem::directory_iterator("/proc")) {
    const std::string name = entry.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    const std::string cmdline = ReadFile("/proc/" + name + "/cmdline");
    const std::vector<std::string> args = absl::StrSplit(cmdline, '\0');
    if (args.size() < 2 || args[1] != "shard") continue;
    for (const std::string& a : args) {
      if (a == needle) return static_cast<pid_t>(std::stol(name));
    }
  }
  return -1;
}

struct RunFigures {
  double kill_to_recovered = 0.0, noticed_to_recovered = 0.0;
  int64_t lost = 0, since_checkpoint = 0;
};

RunFigures RunOnce(const std::string& binary, const v1::JobSpec& base, int every,
                   const std::string& dir, int round, int kill_at) {
  const std::string tag = absl::StrCat(dir, "/every", every, "-", round);
  v1::JobSpec job = base;
  job.mutable_checkpoint()->set_dir(tag + "-ckpt");
  job.mutable_checkpoint()->set_every_steps(every);
  job.mutable_checkpoint()->set_keep_last(2);
  const std::string job_file = tag + "-job.json";
  std::ofstream(job_file) << ToJson(job);
  const std::string log_dir = tag + "-logs", out = tag + ".out", err = tag + ".err";
  const pid_t local = StartProcess({binary, "local", "--shards=2", "--workers=2", job_file,
                                    "--json", "--log_dir=" + log_dir, "--checkpoint_root=" + dir},
                                   out, err);
  if (local < 0) Die("fork failed");
  auto fail = [&](const std::string& why) {
    kill(local, SIGKILL);
    WaitProcess(local);
    Die(absl::StrCat("every ", every, " round ", round + 1, ": ", why, "; ", err, " ends:\n",
                     Tail(ReadFile(err), 2000)));
  };
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::minutes(5);
  auto wait_for = [&](auto done) {
    while (true) {
      const Watched w = ReadWatch(out);
      if (done(w)) return w;
      if (w.ended) fail("the job ended first");
      if (std::chrono::steady_clock::now() > deadline) fail("timed out");
      std::this_thread::sleep_for(std::chrono::milliseconds(5));
    }
  };
  const Watched before = wait_for([&](const Watched& w) { return w.step >= kill_at; });
  const pid_t shard = FindShard(log_dir);
  if (shard < 0) fail("no shard process found");
  const double killed = Now();
  kill(shard, SIGKILL);
  wait_for([](const Watched& w) { return w.recovered; });
  const double recovered = Now();
  const int rc = WaitProcess(local);
  const Watched after = ReadWatch(out);
  if (rc != 0) fail(absl::StrCat("local exited with status ", rc));
  RunFigures f;
  f.kill_to_recovered = recovered - killed;
  f.noticed_to_recovered = after.recovery_seconds;
  f.lost = after.steps_lost;
  f.since_checkpoint = before.step % every;
  return f;
}

int Run() {
  const int reps = std::max(1, absl::GetFlag(FLAGS_reps));
  const int steps = std::max(10, absl::GetFlag(FLAGS_steps));
  const int kill_at = std::clamp(absl::GetFlag(FLAGS_kill_at), 3, steps - 5);
  const std::string binary = absl::GetFlag(FLAGS_binary);
  if (access(binary.c_str(), X_OK) != 0) Die(absl::StrCat(binary, " is not an executable"));
  double lease = 3.0;
  if (const char* env = std::getenv("MUONPS_LEASE_SECONDS")) (void)absl::SimpleAtod(env, &lease);

  char pattern[] = "/tmp/muonps-recovery-XXXXXX";
  if (mkdtemp(pattern) == nullptr) Die("cannot create a work directory");
  const std::string dir = pattern;
  v1::JobSpec job = DefaultJobSpec();
  job.set_name("recovery");
  job.mutable_schedule()->set_total_steps(steps);
  job.mutable_data()->set_sampling("random");
  job.mutable_data()->set_eval_every(0);
  if (absl::Status st = ValidateJobSpec(job); !st.ok()) Die(std::string(st.message()));
  std::printf(
      "recovery: default job, %d steps on local 2 shards + 2 workers; one shard SIGKILLed at "
      "step %d (restarted by local); lease %.1f s; %d run(s) each; BLAS %s\n"
      "  work directory %s\n",
      steps, kill_at, lease, reps, BlasCoreName().c_str(), dir.c_str());
  std::fflush(stdout);
  for (int every : {10, 2}) {
    std::vector<double> total, inner, lost, since;
    for (int round = 0; round < reps; ++round) {
      const RunFigures f = RunOnce(binary, job, every, dir, round, kill_at);
      total.push_back(f.kill_to_recovered);
      inner.push_back(f.noticed_to_recovered);
      lost.push_back(static_cast<double>(f.lost));
      since.push_back(static_cast<double>(f.since_checkpoint));
      std::printf(
          "  every %2d, run %d: kill -> recovered %.2f s (noticed -> recovered %.2f s), "
          "%lld step(s) again, %lld since the last checkpoint at the kill\n",
          every, round + 1, f.kill_to_recovered, f.noticed_to_recovered,
          static_cast<long long>(f.lost), static_cast<long long>(f.since_checkpoint));
      std::fflush(stdout);
    }
    const double t = Median(total);
    std::printf(
        "checkpoint every %2d (background): recovery %.2f s = %.2f x lease (noticed -> recovered "
        "%.2f s); steps again %.0f, since the checkpoint at the kill %.0f (medians)\n",
        every, t, t / lease, Median(inner), Median(lost), Median(since));
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
