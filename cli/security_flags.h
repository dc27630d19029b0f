// The flags that say who may call and what a job may touch (rpc/auth.h,
// common/confine.h, services/coordinator/admission.h).
#ifndef MUONPS_CLI_SECURITY_FLAGS_H_
#define MUONPS_CLI_SECURITY_FLAGS_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "rpc/auth.h"

namespace muonps {

// --cluster_secret_file: the secret ("" when the flag is empty).
absl::StatusOr<std::string> ClusterSecretFromFlags();
// --tokens_file: the users (null when the flag is empty).
absl::StatusOr<std::shared_ptr<const UserTokens>> UserTokensFromFlags();
// The client's bearer token: $MUONPS_TOKEN, else the first line of
// --token_file ("" when neither is set).
absl::StatusOr<std::string> ClientTokenFromFlags();
// --data_root (comma-separated), --checkpoint_root.
std::vector<std::string> DataRootsFromFlags();
std::string CheckpointRootFromFlags();
// --memory_limit, or the cgroup's limit when empty.
absl::StatusOr<int64_t> MemoryLimitFromFlags();
// --max_queued_jobs, --task_timeout_seconds.
int MaxQueuedJobsFromFlags();
double TaskTimeoutFromFlags();

// The flags `muonps local` passes on as given to the processes it starts
// (it makes its own cluster secret and roots).
std::vector<std::string> SecurityFlagsForChildren();

}  // namespace muonps

#endif  // MUONPS_CLI_SECURITY_FLAGS_H_
