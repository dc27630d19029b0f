// The coordinator's job store (services/coordinator/job_store.h) against
// real SQLite files: what is saved reads back after reopening, old events are
// pruned, forgotten jobs are gone, a process SIGKILLed in the middle of
// writing leaves a file that opens intact, and files that are not the
// store's (another program's database, garbage, a damaged page) are refused
// with a message naming them, and left as they were.
#include "services/coordinator/job_store.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <signal.h>
#include <sqlite3.h>
#include <sys/wait.h>
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <string>
#include <thread>

#include "tests/process_util.h"
#include "tests/test_util.h"

namespace muonps {
namespace {

using ::testing::HasSubstr;

class JobStoreTest : public testing_util::TempDirTest {
 protected:
  std::string Dir() const { return Path("state"); }
  std::string File() const { return Dir() + "/" + JobStore::kFileName; }

  static v1::Job MakeJob(const std::string& id, v1::JobState state, int64_t step) {
    v1::Job job;
    job.set_job_id(id);
    job.set_name("job " + id);
    job.set_state(state);
    job.mutable_spec()->mutable_schedule()->set_total_steps(100);
    job.mutable_progress()->set_step(step);
    job.set_owner("alice");
    return job;
  }
  static v1::WatchJobResponse Event(const v1::Job& job, int64_t seq) {
    v1::WatchJobResponse e;
    e.set_kind(v1::JOB_EVENT_KIND_STEP);
    *e.mutable_job() = job;
    e.set_seq(seq);
    return e;
  }
};

TEST_F(JobStoreTest, WhatIsSavedReadsBackAfterReopening) {
  {
    absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(Dir());
    ASSERT_TRUE(store.ok()) << store.status();
    for (int j = 1; j <= 3; ++j) {
      const std::string id = "job-" + std::to_string(j);
      for (int e = 0; e < 10; ++e) {
        const v1::Job job = MakeJob(id, v1::JOB_STATE_RUNNING, e);
        const v1::WatchJobResponse event = Event(job, e);
        ASSERT_TRUE((*store)->Save(j, job, /*cancel_requested=*/j == 2, &event, e, 4).ok());
      }
    }
    // A save without an event changes the job only.
    ASSERT_TRUE((*store)
                    ->Save(3, MakeJob("job-3", v1::JOB_STATE_SUCCEEDED, 100), false, nullptr, 0, 4)
                    .ok());
    ASSERT_TRUE((*store)->Forget("job-1").ok());
  }
  absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(Dir());
  ASSERT_TRUE(store.ok()) << store.status();
  absl::StatusOr<std::vector<StoredJob>> jobs = (*store)->Load(100);
  ASSERT_TRUE(jobs.ok()) << jobs.status();
  ASSERT_EQ(jobs->size(), 2u);
  EXPECT_EQ((*jobs)[0].job.job_id(), "job-2");
  EXPECT_EQ((*jobs)[0].seq, 2);
  EXPECT_TRUE((*jobs)[0].cancel_requested);
  EXPECT_EQ((*jobs)[0].job.owner(), "alice");
  EXPECT_EQ((*jobs)[0].events_total, 10);
  // keep_events 4: events 6..9 remain, oldest first.
  ASSERT_EQ((*jobs)[0].events.size(), 4u);
  EXPECT_EQ((*jobs)[0].events.front().seq(), 6);
  EXPECT_EQ((*jobs)[0].events.back().job().progress().step(), 9);
  EXPECT_EQ((*jobs)[1].job.job_id(), "job-3");
  EXPECT_EQ((*jobs)[1].job.state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_FALSE((*jobs)[1].cancel_requested);
  // Load's own bound on events.
  absl::StatusOr<std::vector<StoredJob>> two = (*store)->Load(2);
  ASSERT_TRUE(two.ok());
  ASSERT_EQ((*two)[0].events.size(), 2u);
  EXPECT_EQ((*two)[0].events.front().seq(), 8);
}

TEST_F(JobStoreTest, GarbageIsRefusedByNameAndLeftAsItWas) {
  std::filesystem::create_directories(Dir());
  const std::string garbage(4096, 'x');
  std::ofstream(File()) << garbage;
  absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(Dir());
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr(File()));
  EXPECT_THAT(store.status().message(), HasSubstr("not a muonps coordinator database"));
  EXPECT_EQ(testing_util::ReadWholeFile(File()), garbage);
}

TEST_F(JobStoreTest, AnotherProgramsDatabaseIsRefused) {
  std::filesystem::create_directories(Dir());
  sqlite3* db = nullptr;
  ASSERT_EQ(sqlite3_open(File().c_str(), &db), SQLITE_OK);
  ASSERT_EQ(sqlite3_exec(db, "CREATE TABLE notes(text TEXT); INSERT INTO notes VALUES('mine');",
                         nullptr, nullptr, nullptr),
            SQLITE_OK);
  sqlite3_close(db);
  absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(Dir());
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr(File()));
  EXPECT_THAT(store.status().message(), HasSubstr("another program"));
  // Still the other program's, untouched.
  ASSERT_EQ(sqlite3_open(File().c_str(), &db), SQLITE_OK);
  sqlite3_stmt* q = nullptr;
  ASSERT_EQ(sqlite3_prepare_v2(db, "SELECT count(*) FROM sqlite_schema", -1, &q, nullptr),
            SQLITE_OK);
  ASSERT_EQ(sqlite3_step(q), SQLITE_ROW);
  EXPECT_EQ(sqlite3_column_int(q, 0), 1);
  sqlite3_finalize(q);
  sqlite3_close(db);
}

TEST_F(JobStoreTest, ADamagedFileIsRefusedByName) {
  {
    absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(Dir());
    ASSERT_TRUE(store.ok()) << store.status();
    // Enough rows for several pages.
    for (int j = 0; j < 200; ++j) {
      v1::Job job = MakeJob("job-" + std::to_string(j), v1::JOB_STATE_QUEUED, 0);
      job.add_notes(std::string(200, 'n'));
      ASSERT_TRUE((*store)->Save(j, job, false, nullptr, 0, 4).ok());
    }
  }  // closing checkpoints the WAL into the file
  // Overwrite every page after the first (the schema) with 0xff.
  std::fstream f(File(), std::ios::in | std::ios::out | std::ios::binary);
  f.seekg(0, std::ios::end);
  const int64_t size = f.tellg();
  ASSERT_GT(size, 3 * 4096);
  f.seekp(4096);
  const std::string junk(static_cast<size_t>(size - 4096), '\xff');
  f.write(junk.data(), static_cast<std::streamsize>(junk.size()));
  f.close();
  absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(Dir());
  ASSERT_FALSE(store.ok());
  EXPECT_THAT(store.status().message(), HasSubstr(File()));
  EXPECT_THAT(store.status().message(), HasSubstr("refusing to use it"));
}

// A child process writes jobs as fast as it can and is SIGKILLed mid-write,
// several times over: each time the file opens, passes its check, and holds
// a prefix of what was written (every job that was saved, each whole).
TEST_F(JobStoreTest, AProcessKilledMidWriteLeavesAnIntactFile) {
  for (int round = 0; round < 4; ++round) {
    const pid_t pid = fork();
    ASSERT_GE(pid, 0);
    if (pid == 0) {
      absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(Dir());
      if (!store.ok()) _exit(3);
      for (int64_t j = 0;; ++j) {
        const int64_t seq = round * 1000000 + j;
        v1::Job job = MakeJob("job-" + std::to_string(seq), v1::JOB_STATE_RUNNING, j);
        job.add_notes(std::string(3000, 'n'));
        const v1::WatchJobResponse event = Event(job, 0);
        if (!(*store)->Save(seq, job, false, &event, 0, 4).ok()) _exit(4);
      }
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(150 + 70 * round));
    kill(pid, SIGKILL);
    int status = 0;
    waitpid(pid, &status, 0);
    ASSERT_TRUE(WIFSIGNALED(status)) << "the writer exited by itself: " << status;
    absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(Dir());
    ASSERT_TRUE(store.ok()) << store.status();
    absl::StatusOr<std::vector<StoredJob>> jobs = (*store)->Load(10);
    ASSERT_TRUE(jobs.ok()) << jobs.status();
    EXPECT_FALSE(jobs->empty());
    for (const StoredJob& s : *jobs) {
      EXPECT_EQ(s.job.notes(0).size(), 3000u);
      ASSERT_EQ(s.events.size(), 1u);
      EXPECT_EQ(s.events[0].job().job_id(), s.job.job_id());
    }
  }
}

}  // namespace
}  // namespace muonps
