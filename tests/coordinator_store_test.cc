// The coordinator with a job store (--state_dir): a new coordinator on the
// same store lists every job as it was, queues the queued ones again in
// their order, keeps job ids unique, and lets a watcher resume from an event
// sequence number.
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

}  // namespace
}  // namespace muonps
