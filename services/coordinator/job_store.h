// The coordinator's durable state: every job it remembers (spec, owner,
// state, progress, placement, last checkpoint), whether a cancel was asked
// for, and each job's latest watch events, in one SQLite file
// (`--state_dir`/coordinator.db; WAL journal, synchronous=FULL, so a commit
// survives the process being killed at any instant and the machine losing
// power after it returned).
//
// A file that is not an SQLite database, one written by another program
// (its application_id and meta table are checked), one of a newer format, or
// one that fails SQLite's quick_check is refused with an error naming it:
// nothing is overwritten.
#ifndef MUONPS_SERVICES_COORDINATOR_JOB_STORE_H_
#define MUONPS_SERVICES_COORDINATOR_JOB_STORE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "muonps/v1/coordinator.pb.h"

struct sqlite3;

namespace muonps {

// One job as stored.
struct StoredJob {
  int64_t seq = 0;  // submission order (also the job id's sequence number)
  v1::Job job;
  bool cancel_requested = false;
  // The latest events, oldest first; events_total counts every event ever
  // appended (the sequence number of the next one).
  std::vector<v1::WatchJobResponse> events;
  int64_t events_total = 0;
};

class JobStore {
 public:
  // The file under `state_dir` (created, mode 0700, when missing).
  static constexpr const char* kFileName = "coordinator.db";

  // Opens or creates `state_dir`/coordinator.db and reads every job in it.
  static absl::StatusOr<std::unique_ptr<JobStore>> Open(const std::string& state_dir);
  ~JobStore();
  JobStore(const JobStore&) = delete;
  JobStore& operator=(const JobStore&) = delete;

  const std::string& path() const { return path_; }

  // Every job read by Open, in submission order, with at most `max_events`
  // of its latest events.
  absl::StatusOr<std::vector<StoredJob>> Load(size_t max_events) const;

  // Writes `job` (inserted, or replacing the stored one) and, when `event`
  // is not null, appends it as event number `event_seq` and drops that
  // job's events older than the latest `keep_events`. One transaction.
  absl::Status Save(int64_t seq, const v1::Job& job, bool cancel_requested,
                    const v1::WatchJobResponse* event, int64_t event_seq, size_t keep_events);

  // Deletes the job and its events.
  absl::Status Forget(const std::string& job_id);

 private:
  JobStore(std::string path, sqlite3* db) : path_(std::move(path)), db_(db) {}
  absl::Status Exec(const char* sql) const;
  absl::Status Error(const std::string& what) const;

  const std::string path_;
  sqlite3* const db_;
};

}  // namespace muonps

#endif  // MUONPS_SERVICES_COORDINATOR_JOB_STORE_H_
