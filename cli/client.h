// What the client commands and `muonps local` share: a JobService stub for
// --coordinator, calls with a deadline, submitting and watching a job, and
// the process's Ctrl-C / SIGTERM count.
#ifndef MUONPS_CLI_CLIENT_H_
#define MUONPS_CLI_CLIENT_H_

#include <functional>
#include <memory>
#include <optional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "muonps/v1/coordinator.grpc.pb.h"

namespace muonps {

// --coordinator, else MUONPS_COORDINATOR (read as that flag), else 127.0.0.1:7070.
std::string CoordinatorAddress();
std::unique_ptr<v1::JobService::Stub> JobStub();
// Runs `rpc` with a 30 s deadline; errors name the coordinator and `name`.
absl::Status Call(const std::function<grpc::Status(grpc::ClientContext*)>& rpc, const char* name);
// Submits `spec` (resuming from `resume` when not empty); the job id.
absl::StatusOr<std::string> Submit(const v1::JobSpec& spec, const std::string& resume);
// Streams the job's events until it ends, printing them (JSON lines with
// `json`, else a progress display on stderr); `poll`, when given, runs every
// 100 ms meanwhile on another thread. Starts with a snapshot of the job, or
// with the events after `after_seq` when set (-1: every event the
// coordinator holds). Reconnects, resuming after the last event received,
// when the coordinator goes away mid-watch. Returns the final job.
absl::StatusOr<v1::Job> Watch(const std::string& job_id, bool json,
                              const std::function<void()>& poll = nullptr,
                              std::optional<int64_t> after_seq = std::nullopt);
// Exit status of a watched job: 0 succeeded, 1 failed, 4 cancelled.
int ExitStatusOf(v1::JobState state);
// One line of protobuf JSON (proto field names).
std::string OneLineJson(const google::protobuf::Message& message);
const char* StateName(v1::JobState state);

// SIGINT and SIGTERM only count (SignalCount()) from then on.
void InstallSignalHandlers();
int SignalCount();

}  // namespace muonps

#endif  // MUONPS_CLI_CLIENT_H_
