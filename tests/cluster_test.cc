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
// validation every 5 steps so evaluation tasks run too; one layout moves
// parameters and gradients in bf16 (transfer.dtype).
#include "tests/cluster_fixture.h"

namespace muonps {
namespace {

// --- 1. Any layout of shards and workers equals `muonps train` ---------------

struct LayoutCase {
  const char* name;
  int shards, workers, threads;  // threads: per service in `local`
  const char* optimizer;
  const char* balancing;
  const char* transfer_dtype = "f32";
  const char* attention = "mha";
  double qk_clip_tau = 0.0;
  int replicas = 1;
};

// For gtest's messages and ctest's test names.
void PrintTo(const LayoutCase& c, std::ostream* os) { *os << c.name; }

class ClusterLayoutTest : public ClusterTest, public ::testing::WithParamInterface<LayoutCase> {};

TEST_P(ClusterLayoutTest, CheckpointIsBitIdenticalToTrain) {
  const LayoutCase& c = GetParam();
  JobOptions o;
  o.optimizer = c.optimizer;
  o.balancing = c.balancing;
  o.transfer_dtype = c.transfer_dtype;
  o.attention = c.attention;
  o.qk_clip_tau = c.qk_clip_tau;
  WriteJob("train", o);
  o.replicas = c.replicas;
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
                      LayoutCase{"AuxLoss3Shards2Workers", 3, 2, 1, "muon", "aux_loss"},
                      // Prefix-summed and per-slot pushes in bf16 meet on the shards.
                      LayoutCase{"Bf16Muon2Shards2Workers", 2, 2, 1, "muon", "aux_free_bias",
                                 "bf16"},
                      // MLA with QK-Clip: the maxima travel worker -> coordinator
                      // -> shards, and every shard rescales its own heads.
                      LayoutCase{"MlaQkClip2Shards3Workers", 2, 3, 1, "muon", "aux_free_bias",
                                 "f32", "mla", 0.25},
                      // ... and the replicas rescale theirs alike.
                      LayoutCase{"MlaQkClip3Shards2Workers2Copies", 3, 2, 1, "muon",
                                 "aux_free_bias", "f32", "mla", 0.25, 2}),
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
  // A's lease ran out and its task moved.
  const std::string a_log = ReadWholeFile(a.err_path());
  const size_t as = a_log.find("registered as ") + std::string("registered as ").size();
  const std::string a_id = a_log.substr(as, a_log.find(' ', as) - as);
  const std::string log = ReadWholeFile(Path("coordinator.log"));
  const size_t expired = log.find("coordinator: " + a_id + " (");
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

}  // namespace
}  // namespace muonps
