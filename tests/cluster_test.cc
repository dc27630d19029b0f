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
namespace {

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
};

// A one-line description of a wait status, for messages.
std::string DescribeStatus(std::optional<int> status) {
  if (!status.has_value()) return "still running";
  if (WIFEXITED(*status)) return absl::StrCat("exited with ", WEXITSTATUS(*status));
  if (WIFSIGNALED(*status)) return absl::StrCat("killed by signal ", WTERMSIG(*status));
  return absl::StrCat("wait status ", *status);
}

// The events of a `muonps watch --json` (or `local --json`) output file so
// far: one WatchJobResponse per complete line.
std::vector<v1::WatchJobResponse> ReadEvents(const std::string& path) {
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

bool Ended(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

// Compares `what` of two flat buffers tensor by tensor, bit for bit; an
// empty expected buffer means the optimizer keeps none.
void ExpectSameBits(const std::vector<float>& want, const std::vector<float>& got,
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
uint64_t Bits(double x) {
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
        if (log.size() > 3000) log = "..." + log.substr(log.size() - 3000);
        std::fprintf(stderr, "---- %s (%s)\n%s\n", child->command().c_str(),
                     DescribeStatus(child->status()).c_str(), log.c_str());
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
                "max_position_embeddings": 64, "balancing": "%s"},
      "optimizer": {"name": "%s"},
      "schedule": {"total_steps": %d, "warmup_steps": 4},
      "data": {"path": "%s", "sampling": "random", "eval_every": %d, "eval_windows": 8},
      "batch": {"slots": 5, "micro_batch": 2},
      "checkpoint": {"dir": "%s", "every_steps": %d, "keep_last": 0},
      "seed": 11})",
                                           name, o.balancing, o.optimizer, o.total_steps, corpus_,
                                           o.eval_every, CheckpointRoot(name), o.every_steps);
    return path;
  }
  std::string CheckpointRoot(const std::string& name) const { return Path(name + "-ckpt"); }
  std::string CheckpointOf(const std::string& name, int64_t step) const {
    return CheckpointRoot(name) + "/" + CheckpointName(step);
  }

  // Starts `muonps ARGS...` with stdout in NAME.out and stderr in NAME.log.
  ChildProcess& Start(const std::string& name, std::vector<std::string> args) {
    args.insert(args.begin(), MUONPS_BINARY);
    children_.push_back(
        std::make_unique<ChildProcess>(std::move(args), Path(name + ".out"), Path(name + ".log")));
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
                                     "--log_dir=" + Path("local-" + name)};
    if (!resume.empty()) args.push_back("--resume=" + resume);
    EXPECT_EQ(Run("local-" + name, args), 0) << ReadWholeFile(Path("local-" + name + ".log"));
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

  // Starts the coordinator with short leases; returns its address.
  std::string StartCoordinator(int min_shards) {
    const std::string port_file = Path("coordinator.port");
    ChildProcess& c =
        Start("coordinator", {"coordinator", "--listen=127.0.0.1:0", "--port_file=" + port_file,
                              absl::StrCat("--min_shards=", min_shards), "--lease_seconds=1.5",
                              "--heartbeat_seconds=0.25"});
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
    std::vector<std::string> args = {"shard", "--listen=127.0.0.1:0",
                                     "--coordinator=" + coordinator_, "--threads=1"};
    args.insert(args.end(), extra.begin(), extra.end());
    return Start(absl::StrCat("shard-", i), args);
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
    std::vector<std::string> args = {"worker", "--listen=127.0.0.1:0",
                                     "--coordinator=" + coordinator_, "--threads=1"};
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

// --- 1. Any layout of shards and workers equals `muonps train` ---------------

struct LayoutCase {
  const char* name;
  int shards, workers, threads;  // threads: per service in `local`
  const char* optimizer;
  const char* balancing;
};

// For gtest's messages and ctest's test names.
void PrintTo(const LayoutCase& c, std::ostream* os) { *os << c.name; }

class ClusterLayoutTest : public ClusterTest, public ::testing::WithParamInterface<LayoutCase> {};

TEST_P(ClusterLayoutTest, CheckpointIsBitIdenticalToTrain) {
  const LayoutCase& c = GetParam();
  JobOptions o;
  o.optimizer = c.optimizer;
  o.balancing = c.balancing;
  WriteJob("train", o);
  WriteJob("cluster", o);
  const std::string want = Train("train");
  Local("cluster", c.shards, c.workers, c.threads);
  ExpectSameCheckpoint(want, CheckpointOf("cluster", 20));
  const absl::StatusOr<v1::TrainerState> state = ReadTrainerState(CheckpointOf("cluster", 20));
  ASSERT_TRUE(state.ok()) << state.status();
  EXPECT_EQ(state->step(), 20);
  EXPECT_TRUE(fs::exists(CheckpointOf("cluster", 20) + "/model.safetensors.index.json"))
      << "not the sharded layout";
}

INSTANTIATE_TEST_SUITE_P(
    Layouts, ClusterLayoutTest,
    ::testing::Values(LayoutCase{"Muon1Shard1Worker", 1, 1, 2, "muon", "aux_free_bias"},
                      LayoutCase{"Muon1Shard1WorkerOneThread", 1, 1, 1, "muon", "aux_free_bias"},
                      LayoutCase{"Muon2Shards3Workers", 2, 3, 1, "muon", "aux_free_bias"},
                      LayoutCase{"Muon2Shards3WorkersTwoThreads", 2, 3, 2, "muon", "aux_free_bias"},
                      LayoutCase{"Muon3Shards2Workers", 3, 2, 1, "muon", "aux_free_bias"},
                      LayoutCase{"AdamW2Shards3Workers", 2, 3, 1, "adamw", "aux_free_bias"},
                      LayoutCase{"AuxLoss3Shards2Workers", 3, 2, 1, "muon", "aux_loss"}),
    [](const ::testing::TestParamInfo<LayoutCase>& info) { return info.param.name; });

// --- 2. Resume from one layout into the other ---------------------------------

TEST_F(ClusterTest, ResumeFromTrainCheckpointIsBitIdentical) {
  const JobOptions o;
  for (const char* name : {"train", "half", "cluster"}) WriteJob(name, o);
  const std::string want = Train("train");
  const std::string half = Train("half", /*until=*/10);
  ASSERT_EQ(half, CheckpointOf("half", 10));
  ASSERT_TRUE(fs::exists(half + "/model.safetensors")) << "not the single-file layout";
  Local("cluster", /*shards=*/2, /*workers=*/2, /*threads=*/1, /*resume=*/half);
  ExpectSameCheckpoint(want, CheckpointOf("cluster", 20));
}

TEST_F(ClusterTest, TrainResumesFromClusterCheckpointBitIdentically) {
  JobOptions o;
  WriteJob("train", o);
  WriteJob("half", o);
  WriteJob("resumed", o);
  o.every_steps = 10;
  WriteJob("cluster", o);
  const std::string want = Train("train");
  Local("cluster", /*shards=*/2, /*workers=*/2);
  ASSERT_TRUE(fs::exists(CheckpointOf("cluster", 10) + "/model.safetensors.index.json"));
  // The intermediate sharded checkpoint equals the trainer's at that step too.
  ExpectSameCheckpoint(Train("half", /*until=*/10), CheckpointOf("cluster", 10));
  ExpectSameCheckpoint(want, CheckpointOf("cluster", 20));
  ExpectSameCheckpoint(want, Train("resumed", 0, CheckpointOf("cluster", 10)));
}

// --- 3. Workers that die mid-step, and one that joins mid-job -----------------

// Worker A (registered first, so it gets slots 0-1 as one prefix-summed push
// per step) SIGKILLs itself after its 7th push, i.e. during step 7 after its
// gradient reached the shards and before it reported the slots; its lease
// runs out and B redoes the task (the shards take the repeated push as the
// same one). Worker C joins at step 8 and takes part in the later steps. 40
// steps leave C time to register on a busy machine.
TEST_F(ClusterTest, WorkerKilledAfterPushAndWorkerJoiningMidJobStillBitIdentical) {
  JobOptions o;
  o.total_steps = 40;
  WriteJob("train", o);
  WriteJob("cluster", o);
  StartCoordinator(/*min_shards=*/2);
  StartShard(0);
  StartShard(1);
  ChildProcess& a = StartWorker("worker-a", {"--crash_after_pushes=7"});
  WaitForLog(a, "registered as");
  ChildProcess& b = StartWorker("worker-b");
  WaitForLog(b, "registered as");
  const std::string id = Submit("cluster");
  ChildProcess& watch = Watch(id);

  const v1::Job at8 = WaitForStep(watch, watch.out_path(), 8);
  ASSERT_EQ(at8.state(), v1::JOB_STATE_RUNNING) << "the job ended before step 8";
  ASSERT_TRUE(a.Exited()) << "worker A survived 7 pushes";
  ASSERT_TRUE(WIFSIGNALED(*a.status()) && WTERMSIG(*a.status()) == SIGKILL)
      << "worker A " << DescribeStatus(a.status());
  EXPECT_NE(ReadWholeFile(a.err_path()).find("crash_after_pushes: killing this worker after 7"),
            std::string::npos);
  // A registered first, as worker-0; its lease ran out and its task moved.
  const std::string log = ReadWholeFile(Path("coordinator.log"));
  const size_t expired = log.find("coordinator: worker-0 (");
  ASSERT_NE(expired, std::string::npos) << log;
  EXPECT_NE(log.substr(expired, log.find('\n', expired) - expired).find("lease expired"),
            std::string::npos)
      << log;
  ChildProcess& c = StartWorker("worker-c");

  EXPECT_EQ(Finish(watch), 0) << "watch: the job did not succeed";
  const std::vector<v1::WatchJobResponse> events = ReadEvents(watch.out_path());
  ASSERT_FALSE(events.empty());
  const v1::Job& last = events.back().job();
  EXPECT_EQ(last.state(), v1::JOB_STATE_SUCCEEDED) << last.error();
  EXPECT_EQ(last.progress().step(), 40);
  // B and C computed the last step.
  EXPECT_EQ(last.progress().workers(), 2);
  EXPECT_FALSE(b.Exited());
  EXPECT_FALSE(c.Exited());
  ExpectSameCheckpoint(Train("train"), CheckpointOf("cluster", 40));
}

// The test itself SIGKILLs a worker while step 6 is being computed (pulling,
// computing or pushing, whatever it was doing); the other finishes the job.
TEST_F(ClusterTest, WorkerSigkilledDuringAStepStillBitIdentical) {
  const JobOptions o;
  WriteJob("train", o);
  WriteJob("cluster", o);
  StartCoordinator(/*min_shards=*/2);
  StartShard(0);
  StartShard(1);
  ChildProcess& a = StartWorker("worker-a");
  ChildProcess& b = StartWorker("worker-b");
  const std::string id = Submit("cluster");
  ChildProcess& watch = Watch(id);

  const v1::Job at5 = WaitForStep(watch, watch.out_path(), 5);
  ASSERT_EQ(at5.state(), v1::JOB_STATE_RUNNING) << "the job ended before step 5";
  ASSERT_LT(at5.progress().step(), 20);
  b.Signal(SIGKILL);
  ASSERT_TRUE(b.Wait(10.0).has_value());
  EXPECT_TRUE(WIFSIGNALED(*b.status()) && WTERMSIG(*b.status()) == SIGKILL);

  EXPECT_EQ(Finish(watch), 0) << "watch: the job did not succeed";
  const std::vector<v1::WatchJobResponse> events = ReadEvents(watch.out_path());
  ASSERT_FALSE(events.empty());
  EXPECT_EQ(events.back().job().state(), v1::JOB_STATE_SUCCEEDED) << events.back().job().error();
  EXPECT_EQ(events.back().job().progress().workers(), 1);
  EXPECT_FALSE(a.Exited());
  ExpectSameCheckpoint(Train("train"), CheckpointOf("cluster", 20));
}

// --- 4. Cancel -----------------------------------------------------------------

// A running job stops with a checkpoint of its last completed step, equal to
// `muonps train --until` that step. Validation runs after every step (and
// takes a good part of it), so the cancel often arrives during one.
TEST_F(ClusterTest, CancelRunningJobCheckpointsTheLastCompletedStep) {
  JobOptions o;
  o.total_steps = 400;
  o.eval_every = 1;
  WriteJob("train", o);
  WriteJob("cluster", o);
  StartCoordinator(/*min_shards=*/2);
  StartShard(0);
  StartShard(1);
  StartWorker("worker-a");
  StartWorker("worker-b");
  const std::string id = Submit("cluster");
  ChildProcess& watch = Watch(id);
  const v1::Job at3 = WaitForStep(watch, watch.out_path(), 3);
  ASSERT_EQ(at3.state(), v1::JOB_STATE_RUNNING);

  EXPECT_EQ(Run("cancel", {"cancel", id, "--coordinator=" + coordinator_}), 0)
      << ReadWholeFile(Path("cancel.log"));
  EXPECT_EQ(Finish(watch), 4) << "watch of a cancelled job";
  const v1::Job job = Status(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_CANCELLED);
  const int64_t step = job.progress().step();
  EXPECT_GE(step, 3);
  EXPECT_LT(step, 400);
  EXPECT_EQ(job.last_checkpoint(), CheckpointOf("cluster", step));
  absl::StatusOr<std::string> newest = LatestCheckpoint("cluster");
  ASSERT_TRUE(newest.ok()) << newest.status();
  EXPECT_EQ(*newest, CheckpointOf("cluster", step))
      << "the newest checkpoint is not of step " << step << ", the last completed";
  const absl::StatusOr<v1::TrainerState> state = ReadTrainerState(*newest);
  ASSERT_TRUE(state.ok()) << state.status();
  ExpectSameCheckpoint(Train("train", /*until=*/state->step()), *newest);
}

// A queued job is cancelled at once; the running one carries on to success.
TEST_F(ClusterTest, CancelQueuedJobLeavesTheRunningJobAlone) {
  JobOptions o;
  o.total_steps = 40;  // still running after the cancel and status calls below
  WriteJob("first", o);
  WriteJob("second", o);
  StartCoordinator(/*min_shards=*/1);
  StartShard(0);
  StartWorker("worker-a");
  const std::string first = Submit("first");
  const std::string second = Submit("second");
  ChildProcess& watch = Watch(first);
  const v1::Job at1 = WaitForStep(watch, watch.out_path(), 1);
  ASSERT_EQ(at1.state(), v1::JOB_STATE_RUNNING);

  ChildProcess& cancel =
      Start("cancel", {"cancel", second, "--coordinator=" + coordinator_, "--json"});
  ASSERT_EQ(Finish(cancel), 0) << ReadWholeFile(cancel.err_path());
  v1::Job cancelled;
  ASSERT_TRUE(
      google::protobuf::util::JsonStringToMessage(ReadWholeFile(cancel.out_path()), &cancelled)
          .ok())
      << ReadWholeFile(cancel.out_path());
  EXPECT_EQ(cancelled.state(), v1::JOB_STATE_CANCELLED) << "not cancelled at once";
  EXPECT_EQ(Status(second).state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(Status(first).state(), v1::JOB_STATE_RUNNING);

  EXPECT_EQ(Finish(watch), 0) << "the first job did not succeed";
  EXPECT_EQ(Status(first).state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(Status(second).state(), v1::JOB_STATE_CANCELLED);
  EXPECT_FALSE(fs::exists(CheckpointRoot("second")));
  EXPECT_TRUE(fs::exists(CheckpointOf("first", 40)));
}

// --- 5. Members on other BLAS kernels ----------------------------------------

// For every OpenBLAS kernel this CPU can run, a shard started on it joins a
// cluster whose coordinator runs the default kernel. Either its fingerprint
// is the coordinator's, and then a job with one shard on each kernel equals
// `muonps train` bit for bit; or it is refused by name (both kernels and
// both fingerprints in its exit message) before it computes anything.
TEST_F(ClusterTest, ShardOnAnotherBlasKernelIsRefusedByNameOrBitIdentical) {
  const nlohmann::json own = NumericsOf("");
  ASSERT_TRUE(own.is_object()) << "muonps numerics --json";
  const std::string own_core = own.value("blas_core", ""), own_fp = own.value("fingerprint", "");
  ASSERT_EQ(own_fp.size(), 16u);
  StartCoordinator(/*min_shards=*/2);
  std::vector<std::string> same;
  int refused = 0;
  for (const std::string& core : own["runnable_blas_cores"].get<std::vector<std::string>>()) {
    const nlohmann::json theirs = NumericsOf(core);
    ASSERT_TRUE(theirs.is_object()) << core;
    ASSERT_EQ(theirs.value("blas_core", ""), core) << "--blas_core=" << core << " was not applied";
    if (theirs.value("fingerprint", "") == own_fp) {
      if (core != own_core) same.push_back(core);
      continue;
    }
    SCOPED_TRACE(core + " against " + own_core);
    ChildProcess& shard = StartShard(100 + refused, {"--blas_core=" + core});
    EXPECT_EQ(Finish(shard, 30.0), 1) << ReadWholeFile(shard.err_path());
    const std::string log = ReadWholeFile(shard.err_path());
    for (const std::string& name : {core, own_core, theirs.value("fingerprint", ""), own_fp}) {
      EXPECT_NE(log.find(name), std::string::npos) << "\"" << name << "\" not in: " << log;
    }
    EXPECT_EQ(log.find("registered as"), std::string::npos) << log;
    ++refused;
  }
  std::printf("kernel %s (fingerprint %s): %d kernels refused, identical: %s\n", own_core.c_str(),
              own_fp.c_str(), refused, absl::StrJoin(same, ", ").c_str());
  if (same.empty()) return;
  // A mixed cluster that the fingerprints admit must indeed agree.
  JobOptions o;
  o.total_steps = 8;
  o.every_steps = 8;
  WriteJob("train", o);
  WriteJob("cluster", o);
  StartShard(0);
  StartShard(1, {"--blas_core=" + same.front()});
  StartWorker("worker-a", {"--blas_core=" + same.back()});
  const std::string id = Submit("cluster");
  ChildProcess& watch = Watch(id);
  EXPECT_EQ(Finish(watch), 0) << "the mixed-kernel job did not succeed";
  ExpectSameCheckpoint(Train("train"), CheckpointOf("cluster", 8));
}

// A resume from a checkpoint that records other numerics continues, and says
// that the continuation cannot be bit-identical to an uninterrupted run; the
// new checkpoint records this process's numerics.
TEST_F(ClusterTest, ResumeUnderOtherNumericsSaysSo) {
  const JobOptions o;
  WriteJob("half", o);
  const std::string half = Train("half", /*until=*/10);
  ASSERT_FALSE(half.empty());
  const std::string state_path = half + "/trainer_state.json";
  nlohmann::json state =
      nlohmann::json::parse(ReadWholeFile(state_path), nullptr, /*allow_exceptions=*/false);
  ASSERT_TRUE(state.is_object());
  ASSERT_TRUE(state.contains("numerics")) << state.dump();
  const std::string own_fp = state["numerics"].value("fingerprint", "");
  ASSERT_EQ(own_fp.size(), 16u);
  state["numerics"]["blas_core"] = "Sandybridge";
  state["numerics"]["fingerprint"] = "0123456789abcdef";
  std::ofstream(state_path, std::ios::trunc) << state.dump(2);
  ASSERT_EQ(Run("resume", {"train", Path("half.json"), "--quiet", "--resume=" + half}), 0)
      << ReadWholeFile(Path("resume.log"));
  const std::string log = ReadWholeFile(Path("resume.log"));
  EXPECT_NE(log.find("note: the checkpoint was computed with BLAS kernel Sandybridge, "
                     "fingerprint 0123456789abcdef"),
            std::string::npos)
      << log;
  EXPECT_NE(log.find("not bit-identical"), std::string::npos) << log;
  const absl::StatusOr<v1::TrainerState> done = ReadTrainerState(CheckpointOf("half", 20));
  ASSERT_TRUE(done.ok()) << done.status();
  EXPECT_EQ(done->numerics().fingerprint(), own_fp);
}

// --- 6. `muonps local` stops every process it started --------------------------

// The processes of the cluster `local` started with log directory `log_dir`:
// the coordinator names its port file there, shards and workers its address.
std::vector<pid_t> LocalClusterProcesses(const std::string& log_dir) {
  std::vector<pid_t> pids = ProcessesMentioning("--port_file=" + log_dir + "/coordinator.port");
  int port = 0;
  std::ifstream(log_dir + "/coordinator.port") >> port;
  if (port > 0) {
    for (pid_t pid : ProcessesMentioning(absl::StrCat("--coordinator=127.0.0.1:", port))) {
      pids.push_back(pid);
    }
  }
  return pids;
}

std::string PidList(const std::vector<pid_t>& pids) {
  std::string s;
  for (pid_t pid : pids) absl::StrAppend(&s, s.empty() ? "" : ", ", pid);
  return s;
}

TEST_F(ClusterTest, LocalLeavesNoProcessBehind) {
  JobOptions o;
  o.total_steps = 5;
  WriteJob("cluster", o);
  Local("cluster", /*shards=*/2, /*workers=*/2);
  const std::string log_dir = Path("local-cluster");
  ASSERT_TRUE(fs::exists(log_dir + "/coordinator.port"));
  const std::vector<pid_t> left = LocalClusterProcesses(log_dir);
  EXPECT_TRUE(left.empty()) << "still running: " << PidList(left);
}

// Ctrl-C cancels the job, which checkpoints its last completed step; local
// exits 130 and stops the cluster.
TEST_F(ClusterTest, LocalInterruptedCheckpointsAndLeavesNoProcessBehind) {
  JobOptions o;
  o.total_steps = 400;
  WriteJob("train", o);
  WriteJob("cluster", o);
  const std::string log_dir = Path("local-cluster");
  ChildProcess& local = Start("local", {"local", Path("cluster.json"), "--shards=2", "--workers=2",
                                        "--threads=1", "--json", "--log_dir=" + log_dir});
  const v1::Job at3 = WaitForStep(local, local.out_path(), 3);
  ASSERT_EQ(at3.state(), v1::JOB_STATE_RUNNING);
  const std::vector<pid_t> running = LocalClusterProcesses(log_dir);
  EXPECT_EQ(running.size(), 5u) << "a coordinator, 2 shards and 2 workers; found "
                                << PidList(running);

  local.Signal(SIGINT);
  EXPECT_EQ(Finish(local), 130);
  const std::vector<pid_t> left = LocalClusterProcesses(log_dir);
  EXPECT_TRUE(left.empty()) << "still running: " << PidList(left);

  const std::vector<v1::WatchJobResponse> events = ReadEvents(local.out_path());
  ASSERT_FALSE(events.empty());
  const v1::Job& job = events.back().job();
  EXPECT_EQ(job.state(), v1::JOB_STATE_CANCELLED);
  const int64_t step = job.progress().step();
  EXPECT_EQ(job.last_checkpoint(), CheckpointOf("cluster", step));
  absl::StatusOr<std::string> newest = LatestCheckpoint("cluster");
  ASSERT_TRUE(newest.ok()) << "no checkpoint written: " << newest.status();
  EXPECT_EQ(*newest, CheckpointOf("cluster", step));
  const absl::StatusOr<v1::TrainerState> state = ReadTrainerState(*newest);
  ASSERT_TRUE(state.ok()) << state.status();
  ExpectSameCheckpoint(Train("train", /*until=*/state->step()), *newest);
}

}  // namespace
}  // namespace muonps
