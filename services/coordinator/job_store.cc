#include "services/coordinator/job_store.h"

#include <sqlite3.h>
#include <sys/stat.h>

#include <cerrno>
#include <cstring>
#include <map>
#include <utility>

#include "absl/strings/str_cat.h"

namespace muonps {
namespace {

// PRAGMA application_id of a muonps coordinator database ("MuPS").
constexpr int kApplicationId = 0x4D755053;
constexpr int kFormat = 1;

// One prepared statement, finalized on scope exit.
class Statement {
 public:
  Statement(sqlite3* db, const char* sql) {
    rc_ = sqlite3_prepare_v2(db, sql, -1, &stmt_, nullptr);
  }
  ~Statement() { sqlite3_finalize(stmt_); }
  Statement(const Statement&) = delete;
  Statement& operator=(const Statement&) = delete;
  bool ok() const { return rc_ == SQLITE_OK; }
  sqlite3_stmt* get() const { return stmt_; }
  void Bind(int i, int64_t v) { sqlite3_bind_int64(stmt_, i, v); }
  void Bind(int i, const std::string& v) {
    sqlite3_bind_blob(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  }
  void BindText(int i, const std::string& v) {
    sqlite3_bind_text(stmt_, i, v.data(), static_cast<int>(v.size()), SQLITE_TRANSIENT);
  }
  int Step() { return sqlite3_step(stmt_); }
  int64_t Int(int col) const { return sqlite3_column_int64(stmt_, col); }
  std::string Blob(int col) const {
    const void* p = sqlite3_column_blob(stmt_, col);
    const int n = sqlite3_column_bytes(stmt_, col);
    return p == nullptr ? std::string() : std::string(static_cast<const char*>(p), n);
  }

 private:
  sqlite3_stmt* stmt_ = nullptr;
  int rc_ = SQLITE_OK;
};

}  // namespace

JobStore::~JobStore() { sqlite3_close_v2(db_); }

absl::Status JobStore::Error(const std::string& what) const {
  return absl::InternalError(absl::StrCat(path_, ": ", what, ": ", sqlite3_errmsg(db_)));
}

absl::Status JobStore::Exec(const char* sql) const {
  char* message = nullptr;
  const int rc = sqlite3_exec(db_, sql, nullptr, nullptr, &message);
  if (rc == SQLITE_OK) return absl::OkStatus();
  std::string text = message != nullptr ? message : sqlite3_errstr(rc);
  sqlite3_free(message);
  return absl::InternalError(absl::StrCat(path_, ": ", text));
}

absl::StatusOr<std::unique_ptr<JobStore>> JobStore::Open(const std::string& state_dir) {
  if (state_dir.empty()) return absl::InvalidArgumentError("--state_dir: must not be empty");
  if (::mkdir(state_dir.c_str(), 0700) != 0 && errno != EEXIST) {
    return absl::FailedPreconditionError(
        absl::StrCat("--state_dir ", state_dir, ": cannot create: ", std::strerror(errno)));
  }
  const std::string path = absl::StrCat(state_dir, "/", kFileName);
  struct stat st {};
  const bool existed = ::stat(path.c_str(), &st) == 0;
  if (existed && !S_ISREG(st.st_mode)) {
    return absl::FailedPreconditionError(absl::StrCat(path, ": not a regular file"));
  }
  sqlite3* db = nullptr;
  const int rc = sqlite3_open_v2(
      path.c_str(), &db,
      SQLITE_OPEN_READWRITE | SQLITE_OPEN_CREATE | SQLITE_OPEN_FULLMUTEX | SQLITE_OPEN_NOFOLLOW,
      nullptr);
  if (rc != SQLITE_OK) {
    std::string message = db != nullptr ? sqlite3_errmsg(db) : sqlite3_errstr(rc);
    sqlite3_close_v2(db);
    return absl::FailedPreconditionError(absl::StrCat(path, ": cannot open: ", message));
  }
  std::unique_ptr<JobStore> store(new JobStore(path, db));
  sqlite3_busy_timeout(db, 5000);
  auto refuse = [&](const std::string& why) {
    return absl::FailedPreconditionError(
        absl::StrCat(path, ": ", why, "; refusing to use it (move it away to start afresh)"));
  };
  // The first read of a file that is not a database fails here.
  int64_t application_id = 0, tables = 0;
  {
    Statement q(db, "PRAGMA application_id");
    if (!q.ok() || q.Step() != SQLITE_ROW) {
      return refuse(absl::StrCat("not a muonps coordinator database (", sqlite3_errmsg(db), ")"));
    }
    application_id = q.Int(0);
  }
  {
    Statement q(db, "SELECT count(*) FROM sqlite_schema");
    if (!q.ok() || q.Step() != SQLITE_ROW) {
      return refuse(absl::StrCat("unreadable (", sqlite3_errmsg(db), ")"));
    }
    tables = q.Int(0);
  }
  if (tables == 0 && application_id == 0) {
    // A new (or empty) file: create the schema.
    absl::Status made = store->Exec(
        absl::StrCat(
            "PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL; PRAGMA application_id=",
            kApplicationId,
            "; BEGIN;"
            " CREATE TABLE meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);"
            " INSERT INTO meta VALUES('format', '",
            kFormat,
            "');"
            " CREATE TABLE jobs(job_id TEXT PRIMARY KEY, seq INTEGER NOT NULL UNIQUE,"
            "   cancel_requested INTEGER NOT NULL, job BLOB NOT NULL);"
            " CREATE TABLE events(job_id TEXT NOT NULL, seq INTEGER NOT NULL, event BLOB NOT NULL,"
            "   PRIMARY KEY(job_id, seq));"
            " COMMIT;")
            .c_str());
    if (!made.ok()) return made;
    return store;
  }
  if (application_id != kApplicationId) {
    return refuse(absl::StrCat("an SQLite database of another program (application_id ",
                               application_id, ")"));
  }
  {
    Statement q(db, "PRAGMA quick_check");
    if (!q.ok() || q.Step() != SQLITE_ROW) {
      return refuse(absl::StrCat("cannot be checked (", sqlite3_errmsg(db), ")"));
    }
    const std::string verdict = q.Blob(0);
    if (verdict != "ok") return refuse(absl::StrCat("corrupt: ", verdict.substr(0, 200)));
  }
  {
    Statement q(db, "SELECT value FROM meta WHERE key = 'format'");
    if (!q.ok() || q.Step() != SQLITE_ROW) return refuse("no format record in its meta table");
    const std::string format = q.Blob(0);
    if (format != std::to_string(kFormat)) {
      return refuse(
          absl::StrCat("format ", format.substr(0, 32), ", this muonps reads format ", kFormat));
    }
  }
  if (absl::Status st = store->Exec("PRAGMA journal_mode=WAL; PRAGMA synchronous=FULL;");
      !st.ok()) {
    return st;
  }
  // Every row must parse: a damaged row refuses the file rather than
  // silently losing a job.
  if (absl::StatusOr<std::vector<StoredJob>> jobs = store->Load(1); !jobs.ok()) {
    return refuse(std::string(jobs.status().message()));
  }
  return store;
}

absl::StatusOr<std::vector<StoredJob>> JobStore::Load(size_t max_events) const {
  std::vector<StoredJob> jobs;
  std::map<std::string, size_t> index;
  {
    Statement q(db_, "SELECT seq, cancel_requested, job, job_id FROM jobs ORDER BY seq");
    if (!q.ok()) return Error("reading jobs");
    int rc = SQLITE_ROW;
    while ((rc = q.Step()) == SQLITE_ROW) {
      StoredJob s;
      s.seq = q.Int(0);
      s.cancel_requested = q.Int(1) != 0;
      const std::string id = q.Blob(3);
      if (!s.job.ParseFromString(q.Blob(2)) || s.job.job_id() != id) {
        return absl::DataLossError(absl::StrCat("job row ", s.seq, " does not parse"));
      }
      index[id] = jobs.size();
      jobs.push_back(std::move(s));
    }
    if (rc != SQLITE_DONE) return Error("reading jobs");
  }
  {
    Statement q(db_, "SELECT job_id, seq, event FROM events ORDER BY job_id, seq");
    if (!q.ok()) return Error("reading events");
    int rc = SQLITE_ROW;
    while ((rc = q.Step()) == SQLITE_ROW) {
      auto it = index.find(q.Blob(0));
      if (it == index.end()) continue;  // left by a job being forgotten
      StoredJob& s = jobs[it->second];
      v1::WatchJobResponse event;
      if (!event.ParseFromString(q.Blob(2))) {
        return absl::DataLossError(
            absl::StrCat("event ", q.Int(1), " of job ", it->first, " does not parse"));
      }
      s.events.push_back(std::move(event));
      s.events_total = q.Int(1) + 1;
    }
    if (rc != SQLITE_DONE) return Error("reading events");
  }
  for (StoredJob& s : jobs) {
    if (s.events.size() > max_events) {
      s.events.erase(s.events.begin(),
                     s.events.begin() + static_cast<std::ptrdiff_t>(s.events.size() - max_events));
    }
  }
  return jobs;
}

absl::Status JobStore::Save(int64_t seq, const v1::Job& job, bool cancel_requested,
                            const v1::WatchJobResponse* event, int64_t event_seq,
                            size_t keep_events) {
  if (absl::Status st = Exec("BEGIN IMMEDIATE"); !st.ok()) return st;
  auto fail = [&](const std::string& what) {
    absl::Status st = Error(what);
    (void)Exec("ROLLBACK");
    return st;
  };
  {
    Statement q(db_,
                "INSERT OR REPLACE INTO jobs(job_id, seq, cancel_requested, job) "
                "VALUES(?1, ?2, ?3, ?4)");
    if (!q.ok()) return fail("writing a job");
    q.BindText(1, job.job_id());
    q.Bind(2, seq);
    q.Bind(3, cancel_requested ? 1 : 0);
    q.Bind(4, job.SerializeAsString());
    if (q.Step() != SQLITE_DONE) return fail("writing a job");
  }
  if (event != nullptr) {
    {
      Statement q(db_, "INSERT OR REPLACE INTO events(job_id, seq, event) VALUES(?1, ?2, ?3)");
      if (!q.ok()) return fail("writing an event");
      q.BindText(1, job.job_id());
      q.Bind(2, event_seq);
      q.Bind(3, event->SerializeAsString());
      if (q.Step() != SQLITE_DONE) return fail("writing an event");
    }
    {
      Statement q(db_, "DELETE FROM events WHERE job_id = ?1 AND seq <= ?2");
      if (!q.ok()) return fail("pruning events");
      q.BindText(1, job.job_id());
      q.Bind(2, event_seq - static_cast<int64_t>(keep_events));
      if (q.Step() != SQLITE_DONE) return fail("pruning events");
    }
  }
  return Exec("COMMIT");
}

absl::Status JobStore::Forget(const std::string& job_id) {
  if (absl::Status st = Exec("BEGIN IMMEDIATE"); !st.ok()) return st;
  for (const char* sql :
       {"DELETE FROM events WHERE job_id = ?1", "DELETE FROM jobs WHERE job_id = ?1"}) {
    Statement q(db_, sql);
    if (!q.ok()) {
      (void)Exec("ROLLBACK");
      return Error("forgetting a job");
    }
    q.BindText(1, job_id);
    if (q.Step() != SQLITE_DONE) {
      absl::Status st = Error("forgetting a job");
      (void)Exec("ROLLBACK");
      return st;
    }
  }
  return Exec("COMMIT");
}

}  // namespace muonps
