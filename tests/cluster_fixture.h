// The cluster as users run it: real `muonps` processes (coordinator, shards,
// workers, the client commands and `muonps local`) talking gRPC on loopback.
// The independent reference is `muonps train` on the same job: every tensor,
// every optimizer buffer and the trainer state of a cluster checkpoint must
// equal the trainer's bit for bit, for any number of shards and workers,
// across resumes between the two layouts, when workers die mid-step or join
// mid-job, and when a job is cancelled. `muonps local` must leave no process
// behind, also when interrupted.
//
// The job is a small MoE (C = 64, 3 layers, the first dense, E = 4 experts,
// T = 64) on a generated corpus, with 5 slots so that tasks split unevenly
// over 2 and 3 workers (prefix-summed and per-slot pushes both occur) and
// validation every 5 steps so evaluation tasks run too.
// (The shared fixture and helpers; the tests are in the files that include it.)
#ifndef MUONPS_TESTS_CLUSTER_FIXTURE_H_
#define MUONPS_TESTS_CLUSTER_FIXTURE_H_

#include <gtest/gtest.h>
#include <signal.h>
#include <sys/wait.h>

#include <cctype>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <memory>
#include <optional>
#include <ostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "checkpoint/checkpoint.h"
#include "checkpoint/training_state.h"
#include "common/job_spec.h"
#include "common/model_layout.h"
#include "google/protobuf/util/json_util.h"
#include "muonps/v1/coordinator.pb.h"
#include "nlohmann/json.hpp"
#include "tests/process_util.h"
#include "tests/test_util.h"

namespace muonps {

namespace fs = std::filesystem;
using testing_util::ChildProcess;
using testing_util::ExitCodeOf;
using testing_util::ProcessesMentioning;
using testing_util::ReadWholeFile;

// Longest any single command may take before the test kills it and fails.
constexpr double kCommandSeconds = 120.0;

// What varies between the tests' jobs; the rest is fixed in JobJson.
struct JobOptions {
  std::string optimizer = "muon";
  std::string balancing = "aux_free_bias";
  int total_steps = 20;
  int eval_every = 5;
  int every_steps = 0;  // checkpoint.every_steps
  int keep_last = 0;    // checkpoint.keep_last
  int replicas = 1;     // recovery.replicas
  std::string transfer_dtype = "f32";
  std::string attention = "mha";
  double qk_clip_tau = 0.0;  // optimizer.qk_clip_tau
};

// A one-line description of a wait status, for messages.
inline std::string DescribeStatus(std::optional<int> status) {
  if (!status.has_value()) return "still running";
  if (WIFEXITED(*status)) return absl::StrCat("exited with ", WEXITSTATUS(*status));
  if (WIFSIGNALED(*status)) return absl::StrCat("killed by signal ", WTERMSIG(*status));
  return absl::StrCat("wait status ", *status);
}

// The events of a `muonps watch --json` (or `local --json`) output file so
// far: one WatchJobResponse per complete line.
inline std::vector<v1::WatchJobResponse> ReadEvents(const std::string& path) {
  std::vector<v1::WatchJobResponse> events;
  const std::string text = ReadWholeFile(path);
  size_t begin = 0;
  for (size_t end; (end = text.find('\n', begin)) != std::string::npos; begin = end + 1) {
    const std::string line = text.substr(begin, end - begin);
    if (line.empty() || line[0] != '{') continue;
    v1::WatchJobResponse event;
    if (google::protobuf::util::JsonStringToMessage(line, &event).ok()) {
      events.push_back(std::move(event));
    }
  }
  return events;
}

inline bool Ended(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

// Compares `what` of two flat buffers tensor by tensor, bit for bit; an
// empty expected buffer means the optimizer keeps none.
inline void ExpectSameBits(const std::vector<float>& want, const std::vector<float>& got,
                           const ModelLayout& layout, const char* what) {
  ASSERT_EQ(want.size(), got.size()) << what;
  int differing = 0;
  for (const TensorInfo& t : layout.tensors()) {
    const size_t bytes = static_cast<size_t>(t.numel) * sizeof(float);
    if (std::memcmp(want.data() + t.offset, got.data() + t.offset, bytes) != 0 &&
        ++differing <= 5) {
      int64_t first = 0;
      while (std::memcmp(&want[t.offset + first], &got[t.offset + first], sizeof(float)) == 0) {
        ++first;
      }
      ADD_FAILURE() << what << " of " << t.name << " differ, first at element " << first << ": "
                    << want[t.offset + first] << " vs " << got[t.offset + first];
    }
  }
  EXPECT_EQ(differing, 0) << "tensors whose " << what << " differ";
}

// The bits of a double, so that NaN equals NaN.
inline uint64_t Bits(double x) {
  uint64_t bits;
  std::memcpy(&bits, &x, sizeof bits);
  return bits;
}

class ClusterTest : public testing_util::TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    corpus_ = Path("corpus.txt");
    std::ofstream out(corpus_);
    for (int i = 0; i < 600; ++i) {
      out << "Line " << i << ": the quick brown fox " << (i % 7 == 0 ? "jumps" : "naps") << " over "
          << (i * 37 % 101) << " lazy dogs.\n";
    }
  }

  // Kills every process the test started, and shows their logs when it failed.
  void TearDown() override {
    for (auto& child : children_) child->Kill();
    if (HasFailure()) {
      for (auto& child : children_) {
        std::string log = ReadWholeFile(child->err_path());
        const size_t skip = log.size() > 3000 ? log.size() - 3000 : 0;
        std::fprintf(stderr, "---- %s (%s)\n%s%s\n", child->command().c_str(),
                     DescribeStatus(child->status()).c_str(), skip > 0 ? "..." : "",
                     log.c_str() + skip);
      }
      // The services `muonps local` started log into its --log_dir.
      std::error_code ec;
      for (const fs::directory_entry& d : fs::directory_iterator(dir(), ec)) {
        if (!d.is_directory() || d.path().filename().string().rfind("local-", 0) != 0) continue;
        for (const fs::directory_entry& f : fs::directory_iterator(d.path(), ec)) {
          if (f.path().extension() != ".log") continue;
          std::string log = ReadWholeFile(f.path().string());
          if (log.size() > 3000) log = "..." + log.substr(log.size() - 3000);
          std::fprintf(stderr, "---- %s\n%s\n", f.path().c_str(), log.c_str());
        }
      }
    }
    children_.clear();
    TempDirTest::TearDown();
  }

  // Writes NAME.json, checkpointing into NAME-ckpt; returns its path.
  std::string WriteJob(const std::string& name, const JobOptions& o) {
    const std::string path = Path(name + ".json");
    std::ofstream(path) << absl::StrFormat(R"({
      "name": "%s",
      "model": {"hidden_size": 64, "num_hidden_layers": 3, "num_attention_heads": 4,
                "first_k_dense_replace": 1, "intermediate_size": 128,
                "n_routed_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
                "max_position_embeddings": 64, "balancing": "%s", "attention": "%s"},
      "optimizer": {"name": "%s", "qk_clip_tau": %.17g},
      "schedule": {"total_steps": %d, "warmup_steps": 4},
      "data": {"path": "%s", "sampling": "random", "eval_every": %d, "eval_windows": 8},
      "batch": {"slots": 5, "micro_batch": 2},
      "checkpoint": {"dir": "%s", "every_steps": %d, "keep_last": %d},
      "recovery": {"replicas": %d},
      "transfer": {"dtype": "%s"},
      "seed": 11})",
                                           name, o.balancing, o.attention, o.optimizer,
                                           o.qk_clip_tau, o.total_steps, corpus_, o.eval_every,
                                           CheckpointRoot(name), o.every_steps, o.keep_last,
                                           o.replicas, o.transfer_dtype);
    return path;
  }
  std::string CheckpointRoot(const std::string& name) const { return Path(name + "-ckpt"); }
  std::string CheckpointOf(const std::string& name, int64_t step) const {
    return CheckpointRoot(name) + "/" + CheckpointName(step);
  }

  // Starts `muonps ARGS...` with stdout in NAME.out and stderr in NAME.log.
  // `env` ("NAME=VALUE") is added to its environment.
  ChildProcess& Start(const std::string& name, std::vector<std::string> args,
                      std::vector<std::string> env = {}) {
    args.insert(args.begin(), MUONPS_BINARY);
    children_.push_back(std::make_unique<ChildProcess>(std::move(args), Path(name + ".out"),
                                                       Path(name + ".log"), std::move(env)));
    EXPECT_GT(children_.back()->pid(), 0) << "fork failed";
    return *children_.back();
  }

  // Waits for `child` to exit; its exit code (128 + signal when killed), or
  // -1 after killing it when it took longer than `seconds`.
  int Finish(ChildProcess& child, double seconds = kCommandSeconds) {
    const std::optional<int> status = child.Wait(seconds);
    if (!status.has_value()) {
      ADD_FAILURE() << child.command() << " did not end within " << seconds << " s";
      child.Kill();
      return -1;
    }
    return ExitCodeOf(*status);
  }

  // Runs `muonps ARGS...` to its end; its exit code.
  int Run(const std::string& name, std::vector<std::string> args) {
    return Finish(Start(name, std::move(args)));
  }

  // `muonps train` of job NAME (until `until` steps when > 0, from `resume`
  // when set); its final checkpoint directory.
  std::string Train(const std::string& name, int64_t until = 0, const std::string& resume = "") {
    std::vector<std::string> args = {"train", Path(name + ".json"), "--quiet", "--threads=2"};
    if (until > 0) args.push_back(absl::StrCat("--until=", until));
    if (!resume.empty()) args.push_back("--resume=" + resume);
    EXPECT_EQ(Run("train-" + name, args), 0) << ReadWholeFile(Path("train-" + name + ".log"));
    absl::StatusOr<std::string> newest = LatestCheckpoint(name);
    EXPECT_TRUE(newest.ok()) << newest.status();
    return newest.value_or("");
  }

  // The newest step-* checkpoint of job NAME.
  absl::StatusOr<std::string> LatestCheckpoint(const std::string& name) {
    return ResolveCheckpointDir(CheckpointRoot(name));
  }

  // `muonps local` of job NAME on `shards` shards and `workers` workers.
  void Local(const std::string& name, int shards, int workers, int threads = 1,
             const std::string& resume = "") {
    std::vector<std::string> args = {"local",
                                     Path(name + ".json"),
                                     absl::StrCat("--shards=", shards),
                                     absl::StrCat("--workers=", workers),
                                     absl::StrCat("--threads=", threads),
                                     "--log_dir=" + Path("local-" + name),
                                     "--checkpoint_root=" + Root(),
                                     "--data_root=" + Root()};
    if (!resume.empty()) args.push_back("--resume=" + resume);
    EXPECT_EQ(Run("local-" + name, args), 0) << ReadWholeFile(Path("local-" + name + ".log"));
  }

  // `muonps local --json` of job NAME on 2 shards and 2 workers with its
  // logs in `log_dir`, left running.
  ChildProcess& StartLocal(const std::string& name, const std::string& log_dir) {
    return Start("local", {"local", Path(name + ".json"), "--shards=2", "--workers=2",
                           "--threads=1", "--json", "--log_dir=" + log_dir,
                           "--checkpoint_root=" + Root(), "--data_root=" + Root()});
  }

  // Reads a checkpoint (either layout) completely.
  static TrainingState ReadState(const std::string& dir, const v1::JobSpec& spec) {
    const ModelLayout layout(spec.model());
    TrainingState state;
    for (auto* v : {&state.params, &state.momentum, &state.exp_avg, &state.exp_avg_sq}) {
      v->assign(layout.total_floats(), 0.0f);
    }
    const absl::Status st =
        ReadCheckpoint(dir, layout, spec.model(), spec.optimizer().name(), &state);
    EXPECT_TRUE(st.ok()) << st;
    return state;
  }

  // Every tensor, optimizer buffer and trainer-state number of checkpoint
  // `got` equals that of `want`, bit for bit.
  static void ExpectSameCheckpoint(const std::string& want_dir, const std::string& got_dir) {
    SCOPED_TRACE(absl::StrCat(got_dir, " against ", want_dir));
    absl::StatusOr<v1::TrainerState> meta = ReadTrainerState(want_dir);
    ASSERT_TRUE(meta.ok()) << meta.status();
    ASSERT_TRUE(fs::exists(got_dir));
    const v1::JobSpec& spec = meta->job();
    const ModelLayout layout(spec.model());
    const TrainingState want = ReadState(want_dir, spec);
    const TrainingState got = ReadState(got_dir, spec);
    EXPECT_EQ(want.trainer.step(), got.trainer.step());
    EXPECT_EQ(want.trainer.tokens_seen(), got.trainer.tokens_seen());
    EXPECT_EQ(Bits(want.trainer.last_val_loss()), Bits(got.trainer.last_val_loss()))
        << "last_val_loss " << want.trainer.last_val_loss() << " vs "
        << got.trainer.last_val_loss();
    ExpectSameBits(want.params, got.params, layout, "values");
    ExpectSameBits(want.momentum, got.momentum, layout, "momentum buffers");
    ExpectSameBits(want.exp_avg, got.exp_avg, layout, "exp_avg");
    ExpectSameBits(want.exp_avg_sq, got.exp_avg_sq, layout, "exp_avg_sq");
  }

  // --- A cluster of separately started services ----------------------------

  // The test's directory: every checkpoint and corpus lies under it.
  std::string Root() const { return Path("").substr(0, Path("").size() - 1); }
  // The cluster secret every separately started service is given.
  std::string SecretFile() {
    const std::string path = Path("cluster.secret");
    if (!fs::exists(path)) std::ofstream(path) << "a-cluster-secret-for-the-tests\n";
    return path;
  }

  // Starts the coordinator with short leases; returns its address. A later
  // --listen in `extra` wins over the free port; `name` names its log.
  std::string StartCoordinator(int min_shards, std::vector<std::string> extra = {},
                               const std::string& name = "coordinator") {
    const std::string port_file = Path(name + ".port");
    std::vector<std::string> args = {"coordinator",
                                     "--listen=127.0.0.1:0",
                                     "--port_file=" + port_file,
                                     absl::StrCat("--min_shards=", min_shards),
                                     "--lease_seconds=1.5",
                                     "--heartbeat_seconds=0.25",
                                     "--checkpoint_root=" + Root(),
                                     "--cluster_secret_file=" + SecretFile()};
    args.insert(args.end(), extra.begin(), extra.end());
    ChildProcess& c = Start(name, args);
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(30);
    int port = 0;
    while (port <= 0 && !c.Exited() && std::chrono::steady_clock::now() < deadline) {
      std::ifstream(port_file) >> port;
      if (port <= 0) std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
    EXPECT_GT(port, 0) << "the coordinator did not write " << port_file << "; "
                       << DescribeStatus(c.status());
    coordinator_ = absl::StrCat("127.0.0.1:", port);
    return coordinator_;
  }
  ChildProcess& StartShard(int i, std::vector<std::string> extra = {}) {
    return StartShard(absl::StrCat("shard-", i), std::move(extra));
  }
  ChildProcess& StartShard(const std::string& name, std::vector<std::string> extra,
                           std::vector<std::string> env = {}) {
    std::vector<std::string> args = {
        "shard",       "--listen=127.0.0.1:0",        "--coordinator=" + coordinator_,
        "--threads=1", "--checkpoint_root=" + Root(), "--cluster_secret_file=" + SecretFile()};
    args.insert(args.end(), extra.begin(), extra.end());
    return Start(name, args, std::move(env));
  }
  // `muonps numerics --json` with --blas_core=CORE (default when empty): the
  // profile a member started that way would send.
  nlohmann::json NumericsOf(const std::string& core) {
    std::vector<std::string> args = {"numerics", "--json"};
    if (!core.empty()) args.push_back("--blas_core=" + core);
    ChildProcess& c = Start("numerics-" + (core.empty() ? "default" : core), args);
    EXPECT_EQ(Finish(c), 0) << ReadWholeFile(c.err_path());
    return nlohmann::json::parse(ReadWholeFile(c.out_path()), nullptr, /*allow_exceptions=*/false);
  }
  ChildProcess& StartWorker(const std::string& name, std::vector<std::string> extra = {}) {
    std::vector<std::string> args = {
        "worker",      "--listen=127.0.0.1:0",  "--coordinator=" + coordinator_,
        "--threads=1", "--data_root=" + Root(), "--cluster_secret_file=" + SecretFile()};
    args.insert(args.end(), extra.begin(), extra.end());
    return Start(name, args);
  }
  // Waits until `child`'s log contains `text`.
  void WaitForLog(ChildProcess& child, const std::string& text, double seconds = 30.0) {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
    while (ReadWholeFile(child.err_path()).find(text) == std::string::npos) {
      ASSERT_FALSE(child.Exited()) << child.command() << " " << DescribeStatus(child.status())
                                   << " before logging \"" << text << "\"";
      ASSERT_LT(std::chrono::steady_clock::now(), deadline)
          << child.command() << " did not log \"" << text << "\" within " << seconds << " s";
      std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
  }
  // `muonps submit`; the job id.
  std::string Submit(const std::string& name) {
    ChildProcess& submit =
        Start("submit-" + name, {"submit", Path(name + ".json"), "--coordinator=" + coordinator_});
    EXPECT_EQ(Finish(submit), 0) << ReadWholeFile(submit.err_path());
    std::string id = ReadWholeFile(submit.out_path());
    while (!id.empty() && std::isspace(static_cast<unsigned char>(id.back()))) id.pop_back();
    EXPECT_FALSE(id.empty());
    return id;
  }
  // `muonps watch ID --json`, running.
  ChildProcess& Watch(const std::string& id) {
    return Start("watch-" + id, {"watch", id, "--coordinator=" + coordinator_, "--json"});
  }
  // `muonps status ID --json`: the job.
  v1::Job Status(const std::string& id) {
    ChildProcess& status = Start(absl::StrCat("status-", id, "-", children_.size()),
                                 {"status", id, "--coordinator=" + coordinator_, "--json"});
    EXPECT_EQ(Finish(status), 0) << ReadWholeFile(status.err_path());
    v1::Job job;
    EXPECT_TRUE(
        google::protobuf::util::JsonStringToMessage(ReadWholeFile(status.out_path()), &job).ok())
        << ReadWholeFile(status.out_path());
    return job;
  }

  // Waits until the events in `out` (of a watching `child`) show `step`
  // completed or the job ended; the latest job seen. Fails after `seconds`.
  v1::Job WaitForStep(ChildProcess& child, const std::string& out, int64_t step,
                      double seconds = 60.0) {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
    while (true) {
      const std::vector<v1::WatchJobResponse> events = ReadEvents(out);
      if (!events.empty()) {
        const v1::Job& job = events.back().job();
        if (job.progress().step() >= step || Ended(job.state())) return job;
      }
      if (child.Exited() || std::chrono::steady_clock::now() > deadline) {
        ADD_FAILURE() << child.command() << " " << DescribeStatus(child.status()) << " before step "
                      << step;
        return events.empty() ? v1::Job() : events.back().job();
      }
      std::this_thread::sleep_for(std::chrono::milliseconds(10));
    }
  }

  std::string corpus_;
  std::string coordinator_;
  std::vector<std::unique_ptr<ChildProcess>> children_;
};

}  // namespace muonps

#endif  // MUONPS_TESTS_CLUSTER_FIXTURE_H_
