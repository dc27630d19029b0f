// The cluster's lifecycle against real processes: cancelling running and queued
// jobs, members on other numerics, and `muonps local` leaving no process behind.
#include "tests/cluster_fixture.h"

namespace muonps {
namespace {

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
    SCOPED_TRACE(absl::StrCat(core, " against ", own_core));
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
  ChildProcess& local = StartLocal("cluster", log_dir);
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

// A job's checkpoint directory may hold directories muonps did not write:
// pruning never counts or removes them, and publishing never replaces one.
TEST_F(ClusterTest, CheckpointsNeverTouchDirectoriesMuonpsDidNotWrite) {
  JobOptions o;
  o.total_steps = 6;
  o.every_steps = 2;
  o.keep_last = 1;
  WriteJob("cluster", o);
  const std::string foreign = CheckpointOf("cluster", 1);
  fs::create_directories(foreign);
  std::ofstream(foreign + "/precious") << "not muonps's";
  Local("cluster", 1, 1);
  EXPECT_TRUE(fs::exists(foreign + "/precious"));
  EXPECT_TRUE(fs::exists(CheckpointOf("cluster", 6)));
  EXPECT_FALSE(fs::exists(CheckpointOf("cluster", 2)));  // pruned: muonps wrote it
  EXPECT_FALSE(fs::exists(CheckpointOf("cluster", 4)));

  // A directory of the name the next checkpoint would take: the job fails
  // saying so, and the directory is as it was.
  WriteJob("taken", o);
  const std::string taken = CheckpointOf("taken", 2);
  fs::create_directories(taken);
  std::ofstream(taken + "/precious") << "not muonps's";
  const int status = Run("local-taken", {"local", Path("taken.json"), "--shards=1", "--workers=1",
                                         "--threads=1", "--log_dir=" + Path("local-taken"),
                                         "--checkpoint_root=" + Root(), "--data_root=" + Root()});
  EXPECT_NE(status, 0);
  EXPECT_NE(ReadWholeFile(Path("local-taken.log")).find("was not written by muonps"),
            std::string::npos)
      << ReadWholeFile(Path("local-taken.log"));
  EXPECT_EQ(ReadWholeFile(taken + "/precious"), "not muonps's");
}

}  // namespace
}  // namespace muonps
