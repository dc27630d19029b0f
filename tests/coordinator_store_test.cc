// The coordinator with a job store (--state_dir): a new coordinator on the
// same store lists every job as it was, queues the queued ones again in
// their order, keeps job ids unique, and lets a watcher resume from an event
// sequence number.
#include <cstdlib>
#include <cstring>

#include "tests/coordinator_fixture.h"

namespace muonps {
namespace {

class CoordinatorStoreTest : public CoordinatorTest {
 protected:
  // A coordinator on the store in Path("state") that starts no job (it
  // waits for 5 shards).
  void StartOnStore() {
    absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(Path("state"));
    ASSERT_TRUE(store.ok()) << store.status();
    std::shared_ptr<JobStore> shared = std::move(*store);
    StartCoordinator(0.1, 1.0, /*min_shards=*/5, true,
                     [&](CoordinatorOptions* o) { o->store = shared; });
  }
  // Stops the coordinator as a process exit would (its store closes).
  void StopCoordinator() {
    coordinator_->Shutdown();
    server_->Shutdown();
    coordinator_.reset();
    server_.reset();
  }
  // The job as the store holds it (no coordinator running).
  v1::Job GetStoredJob(const std::string& id) {
    absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(Path("state"));
    EXPECT_TRUE(store.ok()) << store.status();
    if (!store.ok()) return {};
    absl::StatusOr<std::vector<StoredJob>> jobs = (*store)->Load(16);
    EXPECT_TRUE(jobs.ok()) << jobs.status();
    if (jobs.ok()) {
      for (const StoredJob& j : *jobs) {
        if (j.job.job_id() == id) return j.job;
      }
    }
    ADD_FAILURE() << "no stored job " << id;
    return {};
  }
  std::vector<v1::Job> List() {
    grpc::ClientContext context;
    v1::ListJobsResponse response;
    EXPECT_TRUE(jobs_->ListJobs(&context, {}, &response).ok());
    return {response.jobs().begin(), response.jobs().end()};
  }
  grpc::Status WatchAfter(const std::string& id, int64_t after,
                          std::vector<v1::WatchJobResponse>* events) {
    grpc::ClientContext context;
    context.set_deadline(DeadlineIn(10.0));
    v1::WatchJobRequest request;
    request.set_job_id(id);
    request.set_after_seq(after);
    auto reader = jobs_->WatchJob(&context, request);
    v1::WatchJobResponse event;
    while (reader->Read(&event)) events->push_back(event);
    return reader->Finish();
  }
};

TEST_F(CoordinatorStoreTest, JobsOutliveTheCoordinator) {
  StartOnStore();
  std::vector<std::string> ids(3);
  for (std::string& id : ids) ASSERT_TRUE(Submit(TinyJob(4, ""), &id).ok());
  ASSERT_TRUE(Cancel(ids[1]).ok());
  StopCoordinator();

  StartOnStore();
  const std::vector<v1::Job> jobs = List();
  ASSERT_EQ(jobs.size(), 3u);
  for (size_t i = 0; i < 3; ++i) EXPECT_EQ(jobs[i].job_id(), ids[i]);
  EXPECT_EQ(jobs[0].state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(jobs[1].state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(jobs[2].state(), v1::JOB_STATE_QUEUED);
  // A new job gets an id never used, numbered after the stored ones.
  std::string next;
  ASSERT_TRUE(Submit(TinyJob(4, ""), &next).ok());
  for (const std::string& id : ids) EXPECT_NE(next, id);
  EXPECT_THAT(next, testing::EndsWith("-000004"));

  // The cancelled job's events: QUEUED (0) and CANCELLED (1), each once,
  // resumable after any of them; a number beyond them is OUT_OF_RANGE.
  std::vector<v1::WatchJobResponse> events;
  ASSERT_TRUE(WatchAfter(ids[1], -1, &events).ok());
  ASSERT_EQ(events.size(), 2u);
  EXPECT_EQ(events[0].seq(), 0);
  EXPECT_EQ(events[0].job().state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(events[1].seq(), 1);
  EXPECT_EQ(events[1].job().state(), v1::JOB_STATE_CANCELLED);
  EXPECT_EQ(events[0].missed() + events[1].missed(), 0);
  events.clear();
  ASSERT_TRUE(WatchAfter(ids[1], 0, &events).ok());
  ASSERT_EQ(events.size(), 1u);
  EXPECT_EQ(events[0].seq(), 1);
  events.clear();
  const grpc::Status beyond = WatchAfter(ids[1], 2, &events);
  EXPECT_EQ(beyond.error_code(), grpc::StatusCode::OUT_OF_RANGE) << Describe(beyond);
  EXPECT_TRUE(events.empty());

  // The queued jobs are still queued, in their order: cancelling the first
  // leaves the third queued.
  ASSERT_TRUE(Cancel(ids[0]).ok());
  EXPECT_EQ(GetJob(ids[2]).state(), v1::JOB_STATE_QUEUED);
}

// A restarted coordinator takes the running job up from the shards only when
// they all hold the same step. Here one shard went back to an older step
// while no coordinator ran (as a shard restored from an older state would):
// its state is refused, not merged, every shard loads the last checkpoint,
// and the job ends with the single-process trainer's bits.
TEST_F(CoordinatorStoreTest, AShardBackAtAnOlderStepIsRefusedNotMerged) {
  auto start = [&] {
    absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(Path("state"));
    ASSERT_TRUE(store.ok()) << store.status();
    std::shared_ptr<JobStore> shared = std::move(*store);
    StartCoordinator(0.1, 3.0, /*min_shards=*/2, true,
                     [&](CoordinatorOptions* o) { o->store = shared; });
  };
  start();
  coordinator_address_ = server_->address();
  StartShards(2);
  StartWorkers(2);
  const v1::JobSpec spec = TinyJob(24, Path("cluster"));  // checkpoints every 2 steps
  std::string id;
  ASSERT_TRUE(Submit(spec, &id).ok());
  ASSERT_TRUE(WaitFor([&] { return GetJob(id).progress().step() >= 5; }, 60.0));
  StopCoordinator();
  const v1::Job stopped = GetStoredJob(id);
  ASSERT_EQ(stopped.state(), v1::JOB_STATE_RUNNING);
  ASSERT_FALSE(stopped.last_checkpoint().empty());
  const int64_t at = stopped.progress().step();

  // Shard 1 goes back to step 2 (it keeps its tensors, with the state of
  // the checkpoint of step 2).
  ASSERT_EQ(stopped.placement_size(), 2);
  const std::string secret = "test-secret";
  shards_[1]->service.SetMemberSecret(secret);
  auto stub = v1::ShardService::NewStub(MakeChannel(shards_[1]->server->address()));
  grpc::ClientContext context;
  context.AddMetadata(kMemberSecretHeader, secret);
  v1::LoadJobRequest back;
  back.set_job_id(id);
  *back.mutable_spec() = stopped.spec();
  for (const v1::ShardPlacement& p : stopped.placement()) {
    if (p.address() == shards_[1]->server->address()) *back.mutable_tensors() = p.tensors();
  }
  ASSERT_GT(back.tensors_size(), 0);
  back.set_resume_from(Path("cluster/step-00000002"));
  back.set_replace(true);
  back.set_reload(true);
  back.set_job_key("stale");
  v1::LoadJobResponse loaded;
  const grpc::Status status = stub->LoadJob(&context, back, &loaded);
  ASSERT_TRUE(status.ok()) << Describe(status);
  ASSERT_EQ(loaded.version(), 2);
  ASSERT_GT(at, 2);

  start();
  ASSERT_TRUE(WaitFor([&] { return GetJob(id).state() != v1::JOB_STATE_RUNNING; }, 120.0));
  const v1::Job job = GetJob(id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error();
  EXPECT_GE(job.recoveries(), 1);
  // Loaded from a checkpoint (one every 2 steps), not from the shards'
  // steps. When the coordinator stopped right on a checkpointed step, that
  // checkpoint is the shards' step and nothing is computed again.
  const std::string& said = job.last_recovery();
  const size_t from = said.find("continuing from step ");
  ASSERT_NE(from, std::string::npos) << said;
  const int64_t continued = std::atoll(said.c_str() + from + std::strlen("continuing from step "));
  EXPECT_EQ(continued % 2, 0) << said;
  EXPECT_LE(continued, at) << said;
  std::printf("shard 1 back at step 2, shard 0 at step %lld: %s\n", static_cast<long long>(at),
              job.last_recovery().c_str());

  // The same job in one process.
  v1::JobSpec single = spec;
  single.mutable_checkpoint()->set_dir(Path("trainer"));
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(single, {});
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  absl::StatusOr<TrainSummary> summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  const TrainingState got = ReadWholeCheckpoint(job.last_checkpoint(), spec),
                      want = ReadWholeCheckpoint(summary->last_checkpoint, spec);
  EXPECT_EQ(got.trainer.step(), 24);
  for (auto [a, b] : {std::pair{&got.params, &want.params},
                      {&got.momentum, &want.momentum},
                      {&got.exp_avg, &want.exp_avg},
                      {&got.exp_avg_sq, &want.exp_avg_sq}}) {
    ASSERT_EQ(a->size(), b->size());
    EXPECT_EQ(std::memcmp(a->data(), b->data(), a->size() * sizeof(float)), 0);
  }
}

}  // namespace
}  // namespace muonps
