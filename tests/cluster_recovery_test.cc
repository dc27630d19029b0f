// Recovery without a person, against real processes: a shard SIGKILLed in
// the middle of a job, a coordinator SIGKILLed while one job runs and
// another is queued, and a seeded chaos run that SIGKILLs random processes
// and restarts them as Kubernetes would. Each job must end SUCCEEDED with a
// final checkpoint equal, bit for bit, to `muonps train` of the same job.
#include <gmock/gmock.h>

#include <algorithm>
#include <cstdlib>
#include <map>
#include <random>

#include "muonps/v1/coordinator.grpc.pb.h"
#include "rpc/rpc_util.h"
#include "tests/cluster_fixture.h"

namespace muonps {
namespace {

// The RECOVERY events among `events`.
std::vector<v1::Job> Recoveries(const std::vector<v1::WatchJobResponse>& events) {
  std::vector<v1::Job> out;
  for (const v1::WatchJobResponse& e : events) {
    if (e.kind() == v1::JOB_EVENT_KIND_RECOVERY) out.push_back(e.job());
  }
  return out;
}

// A shard SIGKILLed at step 6 of 30 (checkpoints every 4 steps): once its
// lease lapses the coordinator places the tensors on the live shards (the
// survivor and a replacement), loads them from the checkpoint of step 4 and
// goes on; nobody resubmits anything.
TEST_F(ClusterTest, ShardSigkilledMidJobIsRecoveredBitIdentically) {
  JobOptions o;
  o.total_steps = 30;
  o.every_steps = 4;
  WriteJob("train", o);
  WriteJob("cluster", o);
  StartCoordinator(/*min_shards=*/2);
  StartShard(0);
  ChildProcess& doomed = StartShard(1);
  StartWorker("worker-a");
  StartWorker("worker-b");
  const std::string id = Submit("cluster");
  ChildProcess& watch = Watch(id);
  const v1::Job at6 = WaitForStep(watch, watch.out_path(), 6);
  ASSERT_EQ(at6.state(), v1::JOB_STATE_RUNNING);
  doomed.Signal(SIGKILL);
  ASSERT_TRUE(doomed.Wait(10.0).has_value());
  StartShard(2);  // the replacement, as a StatefulSet restarts the pod

  EXPECT_EQ(Finish(watch), 0) << ReadWholeFile(watch.err_path());
  const v1::Job job = Status(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error();
  EXPECT_GE(job.recoveries(), 1);
  EXPECT_LE(job.steps_lost(), 4 * job.recoveries()) << job.last_recovery();
  EXPECT_THAT(job.last_recovery(), testing::HasSubstr("recovered in"));
  const std::vector<v1::Job> recoveries = Recoveries(ReadEvents(watch.out_path()));
  ASSERT_FALSE(recoveries.empty()) << "no RECOVERY event in the watch";
  EXPECT_GT(recoveries.front().last_recovery_seconds(), 0.0);
  std::printf("shard SIGKILL at step %lld: %s\n", static_cast<long long>(at6.progress().step()),
              job.last_recovery().c_str());
  ExpectSameCheckpoint(Train("train"), CheckpointOf("cluster", o.total_steps));
}

// Two shard deaths timing alone would reach only by chance, placed by fail
// points (common/failpoint.h): one shard SIGKILLs itself in the middle of an
// ApplyStep (its other tensors not yet updated, while the other shard
// applied the whole step), its replacement between the files of its part of
// a checkpoint written in the background. Neither half-updated state nor the
// half-written checkpoint is used: each recovery loads the last published
// checkpoint, and the job ends with the bits of an undisturbed run.
TEST_F(ClusterTest, ShardKilledInsideApplyStepThenInsideACheckpointWrite) {
  JobOptions o;
  o.total_steps = 36;
  o.every_steps = 4;
  WriteJob("train", o);
  WriteJob("cluster", o);
  StartCoordinator(/*min_shards=*/2);
  StartShard(0);
  // The 40th tensor update: in the apply of step 2 at the latest (the model
  // has more than 20 trainable tensors, which two shards share).
  ChildProcess& in_apply = StartShard("shard-1", {}, {"MUONPS_FAILPOINTS=shard.apply_tensor@40"});
  StartWorker("worker-a");
  StartWorker("worker-b");
  const std::string id = Submit("cluster");
  ChildProcess& watch = Watch(id);
  ASSERT_TRUE(in_apply.Wait(60.0).has_value()) << "the fail point in ApplyStep was not reached";
  EXPECT_THAT(ReadWholeFile(in_apply.err_path()),
              testing::HasSubstr("fail point shard.apply_tensor"));
  // Its replacement dies writing the first checkpoint part it is asked for.
  ChildProcess& in_write = StartShard("shard-2", {}, {"MUONPS_FAILPOINTS=checkpoint.shard_file@1"});
  ASSERT_TRUE(in_write.Wait(60.0).has_value()) << "the fail point in a checkpoint was not reached";
  EXPECT_THAT(ReadWholeFile(in_write.err_path()),
              testing::HasSubstr("fail point checkpoint.shard_file"));
  StartShard(3);

  EXPECT_EQ(Finish(watch), 0) << ReadWholeFile(watch.err_path());
  const v1::Job job = Status(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error();
  EXPECT_GE(job.recoveries(), 2) << job.last_recovery();
  std::printf(
      "shard killed in ApplyStep, then in a checkpoint write: %d recoveries, %lld steps "
      "lost; %s\n",
      job.recoveries(), static_cast<long long>(job.steps_lost()), job.last_recovery().c_str());
  ExpectSameCheckpoint(Train("train"), CheckpointOf("cluster", o.total_steps));
}

// The pid of a `muonps ROLE` process of the `local` cluster with log
// directory `log_dir`; -1 if none.
pid_t LocalService(const std::string& log_dir, const std::string& role) {
  int port = 0;
  std::ifstream(log_dir + "/coordinator.port") >> port;
  const std::string needle = role == "coordinator" ? "--port_file=" + log_dir + "/coordinator.port"
                                                   : absl::StrCat("--coordinator=127.0.0.1:", port);
  for (pid_t pid : testing_util::ProcessesMentioning(needle)) {
    const std::string cmdline = ReadWholeFile(absl::StrCat("/proc/", pid, "/cmdline"));
    const size_t first = cmdline.find('\0');
    if (first != std::string::npos &&
        cmdline.compare(first + 1, role.size() + 1, std::string(role) + '\0') == 0) {
      return pid;
    }
  }
  return -1;
}

// `muonps local` restarts its services as Kubernetes restarts pods: a shard
// and then the coordinator SIGKILLed mid-job come back by themselves, the
// job recovers (its tensors placed again, the coordinator continuing from
// its store), and local exits 0 with the bits of an undisturbed run.
TEST_F(ClusterTest, LocalRestartsTheServicesThatDie) {
  JobOptions o;
  o.total_steps = 40;
  o.every_steps = 4;
  WriteJob("train", o);
  WriteJob("cluster", o);
  const std::string log_dir = Path("local-cluster");
  ChildProcess& local = StartLocal("cluster", log_dir);
  const v1::Job at5 = WaitForStep(local, local.out_path(), 5);
  ASSERT_EQ(at5.state(), v1::JOB_STATE_RUNNING);
  const pid_t shard = LocalService(log_dir, "shard");
  ASSERT_GT(shard, 0) << "no shard of the local cluster found";
  ASSERT_EQ(kill(shard, SIGKILL), 0);
  const v1::Job recovered = WaitForStep(local, local.out_path(), at5.progress().step() + 6);
  ASSERT_EQ(recovered.state(), v1::JOB_STATE_RUNNING);
  EXPECT_GE(recovered.recoveries(), 1);
  const pid_t coordinator = LocalService(log_dir, "coordinator");
  ASSERT_GT(coordinator, 0) << "no coordinator of the local cluster found";
  ASSERT_EQ(kill(coordinator, SIGKILL), 0);

  EXPECT_EQ(Finish(local), 0) << ReadWholeFile(local.err_path());
  const std::string log = ReadWholeFile(local.err_path());
  EXPECT_THAT(log, testing::HasSubstr("shard-"));
  EXPECT_THAT(log, testing::HasSubstr("coordinator exited (killed by signal 9); restarting it"));
  const std::vector<v1::WatchJobResponse> events = ReadEvents(local.out_path());
  ASSERT_FALSE(events.empty());
  const v1::Job& job = events.back().job();
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error();
  EXPECT_GE(job.recoveries(), 2) << job.last_recovery();
  std::printf("local, shard and coordinator SIGKILLed: %d recoveries, %lld steps lost; %s\n",
              job.recoveries(), static_cast<long long>(job.steps_lost()),
              job.last_recovery().c_str());
  ExpectSameCheckpoint(Train("train"), CheckpointOf("cluster", o.total_steps));
}

// The coordinator SIGKILLed at step 8 of 30 while a second job is queued,
// and started again on the same address and --state_dir: the running job
// continues by itself from the shards' own state (no step lost, unless the
// kill fell inside an ApplyStep, when it goes back to the last checkpoint),
// the watcher reconnects and sees it to the end, and the queued job runs
// next. Both equal `muonps train` bit for bit.
TEST_F(ClusterTest, CoordinatorSigkilledContinuesItsJobsFromTheStore) {
  JobOptions o;
  o.total_steps = 30;
  o.every_steps = 4;
  WriteJob("train", o);
  WriteJob("first", o);
  WriteJob("second", o);
  const std::string state = "--state_dir=" + Path("state");
  StartCoordinator(/*min_shards=*/2, {state}, "coordinator-1");
  ChildProcess* coordinator = children_.back().get();
  const std::string address = coordinator_;
  StartShard(0);
  StartShard(1);
  StartWorker("worker-a");
  StartWorker("worker-b");
  const std::string first = Submit("first");
  const std::string second = Submit("second");
  ChildProcess& watch = Watch(first);
  const v1::Job at8 = WaitForStep(watch, watch.out_path(), 8);
  ASSERT_EQ(at8.state(), v1::JOB_STATE_RUNNING);
  coordinator->Signal(SIGKILL);
  ASSERT_TRUE(coordinator->Wait(10.0).has_value());
  StartCoordinator(/*min_shards=*/2, {state, "--listen=" + address}, "coordinator-2");
  ASSERT_EQ(coordinator_, address);

  EXPECT_EQ(Finish(watch), 0) << ReadWholeFile(watch.err_path());
  EXPECT_THAT(ReadWholeFile(watch.err_path()), testing::HasSubstr("reconnecting"));
  const v1::Job job = Status(first);
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error();
  EXPECT_EQ(job.recoveries(), 1) << job.last_recovery();
  EXPECT_LE(job.steps_lost(), 4) << job.last_recovery();
  EXPECT_THAT(job.last_recovery(), testing::HasSubstr("the coordinator restarted"));
  std::printf("coordinator SIGKILL: %s\n", job.last_recovery().c_str());
  // No event skipped across the reconnect: sequence numbers follow on.
  const std::vector<v1::WatchJobResponse> events = ReadEvents(watch.out_path());
  for (size_t i = 2; i < events.size(); ++i) {
    EXPECT_EQ(events[i].seq(), events[i - 1].seq() + 1) << "event " << i;
    EXPECT_EQ(events[i].missed(), 0);
  }
  ASSERT_EQ(Recoveries(events).size(), 1u);

  ChildProcess& watch_second = Watch(second);
  EXPECT_EQ(Finish(watch_second), 0) << ReadWholeFile(watch_second.err_path());
  EXPECT_EQ(Status(second).state(), v1::JOB_STATE_SUCCEEDED);
  const std::string want = Train("train");
  ExpectSameCheckpoint(want, CheckpointOf("first", o.total_steps));
  ExpectSameCheckpoint(want, CheckpointOf("second", o.total_steps));
}

// SIGTERM to a shard (a rolling update): it tells the coordinator it is
// leaving, the coordinator checkpoints at the next step boundary, loads the
// job on the other shards from that checkpoint and drops it on the leaving
// one, which then exits 0. No step is computed again.
TEST_F(ClusterTest, ShardSigtermHandsItsTensorsOverWithoutLosingAStep) {
  JobOptions o;
  o.total_steps = 30;
  WriteJob("train", o);
  WriteJob("cluster", o);
  StartCoordinator(/*min_shards=*/2);
  StartShard(0);
  ChildProcess& leaving = StartShard(1);
  StartWorker("worker-a");
  StartWorker("worker-b");
  const std::string id = Submit("cluster");
  ChildProcess& watch = Watch(id);
  const v1::Job at6 = WaitForStep(watch, watch.out_path(), 6);
  ASSERT_EQ(at6.state(), v1::JOB_STATE_RUNNING);
  // A spare that registers after the job started: the leaving shard is
  // surely one of the job's two.
  ChildProcess& spare = StartShard(2);
  WaitForLog(spare, "registered as");
  leaving.Signal(SIGTERM);
  EXPECT_EQ(Finish(leaving, 60.0), 0) << ReadWholeFile(leaving.err_path());
  EXPECT_THAT(ReadWholeFile(leaving.err_path()), testing::HasSubstr("handing job"));

  EXPECT_EQ(Finish(watch), 0) << ReadWholeFile(watch.err_path());
  const v1::Job job = Status(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error();
  EXPECT_EQ(job.recoveries(), 1) << job.last_recovery();
  EXPECT_EQ(job.steps_lost(), 0) << job.last_recovery();
  EXPECT_THAT(job.last_recovery(), testing::HasSubstr("is leaving"));
  std::printf("shard SIGTERM: %s\n", job.last_recovery().c_str());
  ExpectSameCheckpoint(Train("train"), CheckpointOf("cluster", o.total_steps));
}

// With recovery.replicas 2 each tensor has a copy on the next shard of a
// ring (placement.h), updated every step. Two shards SIGKILLed together
// that are not neighbours in the ring (the placement's first and third of
// four) leave a copy of every tensor: the two survivors write a checkpoint
// of the step they hold and the job continues from it on them and two
// replacements, computing no step again, to the bits of an undisturbed run.
TEST_F(ClusterTest, TwoShardsKilledAtOnceLoseNoStepWithTwoCopies) {
  JobOptions o;
  o.total_steps = 30;
  o.every_steps = 10;
  o.replicas = 2;
  WriteJob("train", o);
  WriteJob("cluster", o);
  // The job is placed on all four; two replacements (as a StatefulSet
  // restarts its pods) make four again after the loss.
  StartCoordinator(/*min_shards=*/4);
  std::vector<ChildProcess*> shards;
  for (int i = 0; i < 4; ++i) shards.push_back(&StartShard(i));
  for (ChildProcess* s : shards) WaitForLog(*s, "registered as");
  StartWorker("worker-a");
  StartWorker("worker-b");
  const std::string id = Submit("cluster");
  ChildProcess& watch = Watch(id);
  const v1::Job at6 = WaitForStep(watch, watch.out_path(), 6);
  ASSERT_EQ(at6.state(), v1::JOB_STATE_RUNNING);
  ASSERT_EQ(at6.placement_size(), 4);
  std::vector<ChildProcess*> doomed;
  for (int k : {0, 2}) {
    const v1::ShardPlacement& p = at6.placement(k);
    EXPECT_GT(p.replicas_size(), 0);
    for (ChildProcess* s : shards) {
      if (ReadWholeFile(s->err_path()).find("registered as " + p.shard_id() + ",") !=
          std::string::npos) {
        doomed.push_back(s);
      }
    }
  }
  ASSERT_EQ(doomed.size(), 2u);
  for (ChildProcess* s : doomed) s->Signal(SIGKILL);
  for (ChildProcess* s : doomed) ASSERT_TRUE(s->Wait(10.0).has_value());
  StartShard(4);
  StartShard(5);

  EXPECT_EQ(Finish(watch), 0) << ReadWholeFile(watch.err_path());
  const v1::Job job = Status(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error();
  EXPECT_GE(job.recoveries(), 1);
  EXPECT_EQ(job.steps_lost(), 0) << job.last_recovery();
  EXPECT_THAT(job.last_recovery(), testing::HasSubstr("the surviving copies hold step"));
  std::printf("two shards SIGKILLed at once, 2 copies: %s\n", job.last_recovery().c_str());
  ExpectSameCheckpoint(Train("train"), CheckpointOf("cluster", o.total_steps));
}

// A shard with a copy of each of its tensors elsewhere SIGKILLs itself in
// the middle of an ApplyStep (a fail point): the others applied the step,
// so the survivors hold the step after the one the coordinator saw end, and
// the job continues from there without computing any step again.
TEST_F(ClusterTest, ShardKilledInsideApplyStepLosesNoStepWithTwoCopies) {
  JobOptions o;
  o.total_steps = 24;
  o.every_steps = 10;
  o.replicas = 2;
  WriteJob("train", o);
  WriteJob("cluster", o);
  StartCoordinator(/*min_shards=*/3);
  std::vector<ChildProcess*> shards = {&StartShard(0), &StartShard(1)};
  // The 100th tensor update: in the apply of step 3 or so.
  shards.push_back(&StartShard("shard-2", {}, {"MUONPS_FAILPOINTS=shard.apply_tensor@100"}));
  for (ChildProcess* s : shards) WaitForLog(*s, "registered as");
  StartWorker("worker-a");
  StartWorker("worker-b");
  const std::string id = Submit("cluster");
  ChildProcess& watch = Watch(id);
  ASSERT_TRUE(shards[2]->Wait(60.0).has_value()) << "the fail point in ApplyStep was not reached";
  EXPECT_THAT(ReadWholeFile(shards[2]->err_path()),
              testing::HasSubstr("fail point shard.apply_tensor"));
  StartShard(3);  // its replacement

  EXPECT_EQ(Finish(watch), 0) << ReadWholeFile(watch.err_path());
  const v1::Job job = Status(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error();
  EXPECT_GE(job.recoveries(), 1);
  EXPECT_EQ(job.steps_lost(), 0) << job.last_recovery();
  EXPECT_THAT(job.last_recovery(), testing::HasSubstr("the surviving copies hold step"));
  std::printf("shard killed inside ApplyStep, 2 copies: %s\n", job.last_recovery().c_str());
  ExpectSameCheckpoint(Train("train"), CheckpointOf("cluster", o.total_steps));
}

// An environment variable as a number, or `fallback`.
int64_t EnvOr(const char* name, int64_t fallback) {
  const char* v = std::getenv(name);
  return v != nullptr && *v != '\0' ? std::strtoll(v, nullptr, 10) : fallback;
}

// A chaos run, seeded (MUONPS_CHAOS_SEED, default 1) so that a failure can be
// replayed: one job on 3 shards and 3 workers while a driver SIGKILLs a
// random process (worker, shard or coordinator, the role drawn first) at a
// random moment once the job has moved on since the last kill, at least
// MUONPS_CHAOS_KILLS (default 12) times, restarting each at once as
// Kubernetes would (the coordinator on its address and --state_dir, the
// others on new ports). The job must end SUCCEEDED, its final model and
// optimizer tensors equal to the undisturbed `muonps train`. Prints a table
// of kills by role, steps lost and recovery seconds.
class ClusterChaosTest : public ClusterTest {};

TEST_F(ClusterChaosTest, RandomKillsLeaveTheBitsUnchanged) {
  const uint64_t seed = static_cast<uint64_t>(EnvOr("MUONPS_CHAOS_SEED", 1));
  const int kills = static_cast<int>(EnvOr("MUONPS_CHAOS_KILLS", 12));
  std::mt19937_64 rng(seed);
  JobOptions o;
  o.total_steps = 40 * std::max(kills, 1);
  o.every_steps = 5;
  o.eval_every = 20;
  WriteJob("train", o);
  WriteJob("chaos", o);
  const std::string state = "--state_dir=" + Path("state");
  StartCoordinator(/*min_shards=*/3, {state}, "coordinator-0");
  const std::string address = coordinator_;
  std::map<std::string, ChildProcess*> procs;  // role-index -> running process
  procs["coordinator"] = children_.back().get();
  for (int i = 0; i < 3; ++i) procs[absl::StrCat("shard-", i)] = &StartShard(i);
  for (int i = 0; i < 3; ++i) {
    procs[absl::StrCat("worker-", i)] = &StartWorker(absl::StrCat("worker-", i));
  }
  const std::string id = Submit("chaos");
  std::map<std::string, int> killed;  // by role
  std::map<std::string, int> restarts;
  int64_t last_step = -1;
  int recoveries_seen = 0;
  std::vector<double> recovery_seconds;
  // Polled in-process (a `muonps status` per poll would pile up processes).
  auto job_now = [&] {
    auto stub = v1::JobService::NewStub(MakeChannel(address));
    grpc::ClientContext context;
    context.set_deadline(DeadlineIn(5.0));
    v1::GetJobRequest request;
    request.set_job_id(id);
    v1::GetJobResponse response;
    const grpc::Status status = stub->GetJob(&context, request, &response);
    // While the coordinator restarts: running, no progress.
    if (!status.ok()) response.mutable_job()->set_state(v1::JOB_STATE_RUNNING);
    // Each recovery's duration, as the polls see them.
    if (response.job().recoveries() > recoveries_seen) {
      recoveries_seen = response.job().recoveries();
      recovery_seconds.push_back(response.job().last_recovery_seconds());
    }
    return response.job();
  };
  const auto begin = std::chrono::steady_clock::now();
  for (int k = 0; k < kills; ++k) {
    // Wait until the job has moved on by a few steps since the last kill.
    v1::Job job;
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(90);
    while (true) {
      job = job_now();
      if (Ended(job.state()) ||
          (job.state() == v1::JOB_STATE_RUNNING && job.progress().step() >= last_step + 3)) {
        break;
      }
      ASSERT_LT(std::chrono::steady_clock::now(), deadline)
          << "no progress after kill " << k << ": " << job.DebugString();
      std::this_thread::sleep_for(std::chrono::milliseconds(100));
    }
    ASSERT_FALSE(Ended(job.state()))
        << "the job ended after " << k << " of " << kills << " kills: " << job.error();
    last_step = job.progress().step();
    std::this_thread::sleep_for(
        std::chrono::milliseconds(std::uniform_int_distribution<int>(0, 1500)(rng)));
    const char* roles[] = {"coordinator", "shard", "worker"};
    const std::string role = roles[std::uniform_int_distribution<int>(0, 2)(rng)];
    const std::string victim =
        role == "coordinator"
            ? role
            : absl::StrCat(role, "-", std::uniform_int_distribution<int>(0, 2)(rng));
    ChildProcess* p = procs[victim];
    ASSERT_FALSE(p->Exited()) << victim << " died by itself: " << DescribeStatus(p->status());
    p->Signal(SIGKILL);
    ASSERT_TRUE(p->Wait(10.0).has_value());
    ++killed[role];
    const std::string name = absl::StrCat(victim, "-r", ++restarts[victim]);
    if (role == "coordinator") {
      StartCoordinator(3, {state, "--listen=" + address}, name);
      ASSERT_EQ(coordinator_, address);
      procs[victim] = children_.back().get();
    } else if (role == "shard") {
      procs[victim] = &StartShard(name, {});
    } else {
      procs[victim] = &StartWorker(name);
    }
  }
  // The job runs to its end.
  v1::Job job;
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(300);
  while (!Ended((job = job_now()).state())) {
    ASSERT_LT(std::chrono::steady_clock::now(), deadline) << job.DebugString();
    std::this_thread::sleep_for(std::chrono::milliseconds(200));
  }
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - begin).count();
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error();

  std::sort(recovery_seconds.begin(), recovery_seconds.end());
  const double median =
      recovery_seconds.empty() ? 0.0 : recovery_seconds[recovery_seconds.size() / 2];
  std::printf(
      "chaos seed %llu: %d kills in %.0f s (coordinator %d, shard %d, worker %d); "
      "%d recoveries, %lld steps computed again of %d; recovery seconds median %.1f, max "
      "%.1f\n",
      static_cast<unsigned long long>(seed), kills, seconds, killed["coordinator"], killed["shard"],
      killed["worker"], job.recoveries(), static_cast<long long>(job.steps_lost()), o.total_steps,
      median, recovery_seconds.empty() ? 0.0 : recovery_seconds.back());
  EXPECT_GE(job.recoveries(), killed["coordinator"]) << "every coordinator restart is a recovery";
  ExpectSameCheckpoint(Train("train"), CheckpointOf("chaos", o.total_steps));
}

}  // namespace
}  // namespace muonps
