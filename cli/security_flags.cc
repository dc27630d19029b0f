#include "cli/security_flags.h"

#include <cstdlib>
#include <filesystem>

#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/memory_limit.h"

ABSL_FLAG(std::string, cluster_secret_file, "",
          "coordinator, shard, worker: file whose first line is the cluster's shared secret; "
          "members need it to register (empty: anyone who reaches the coordinator may). "
          "Env MUONPS_CLUSTER_SECRET_FILE");
ABSL_FLAG(std::string, tokens_file, "",
          "coordinator: file of 'TOKEN NAME [admin]' lines; every JobService call then needs "
          "a bearer token and users see and cancel only their own jobs (empty: anonymous). "
          "Env MUONPS_TOKENS_FILE");
ABSL_FLAG(std::string, token_file, "",
          "client commands: file whose first line is your bearer token (or $MUONPS_TOKEN)");
ABSL_FLAG(std::string, data_root, "",
          "worker: comma-separated directories a job's data.path must resolve under "
          "(symlinks followed); a job without data.path reads the bundled corpus. "
          "Env MUONPS_DATA_ROOT");
ABSL_FLAG(std::string, checkpoint_root, "",
          "coordinator, shard: the directory every checkpoint.dir and resume directory must "
          "resolve under (empty: jobs may not write or read checkpoints). "
          "Env MUONPS_CHECKPOINT_ROOT");
ABSL_FLAG(std::string, memory_limit, "",
          "coordinator, shard, worker: memory this process may use, e.g. 24G (default: the "
          "cgroup's limit, else the machine's memory); jobs that would not fit are refused at "
          "submit. Env MUONPS_MEMORY_LIMIT");
ABSL_FLAG(int, max_queued_jobs, 64,
          "coordinator: most queued jobs; more submits are RESOURCE_EXHAUSTED. "
          "Env MUONPS_MAX_QUEUED_JOBS");
ABSL_FLAG(double, task_timeout_seconds, 600.0,
          "coordinator: a worker that holds a task this long without reporting loses it to "
          "another worker (0: no deadline). Env MUONPS_TASK_TIMEOUT_SECONDS");

namespace muonps {

absl::StatusOr<std::string> ClusterSecretFromFlags() {
  const std::string path = absl::GetFlag(FLAGS_cluster_secret_file);
  if (path.empty()) return std::string();
  return ReadSecretFile(path, "--cluster_secret_file");
}

absl::StatusOr<std::shared_ptr<const UserTokens>> UserTokensFromFlags() {
  const std::string path = absl::GetFlag(FLAGS_tokens_file);
  if (path.empty()) return std::shared_ptr<const UserTokens>();
  absl::StatusOr<UserTokens> tokens = UserTokens::Load(path);
  if (!tokens.ok()) return tokens.status();
  return std::make_shared<const UserTokens>(std::move(*tokens));
}

absl::StatusOr<std::string> ClientTokenFromFlags() {
  if (const char* token = std::getenv("MUONPS_TOKEN"); token != nullptr && *token != '\0') {
    return std::string(token);
  }
  const std::string path = absl::GetFlag(FLAGS_token_file);
  if (path.empty()) return std::string();
  return ReadSecretFile(path, "--token_file");
}

std::vector<std::string> DataRootsFromFlags() {
  return absl::StrSplit(absl::GetFlag(FLAGS_data_root), ',', absl::SkipEmpty());
}

std::string CheckpointRootFromFlags() { return absl::GetFlag(FLAGS_checkpoint_root); }

absl::StatusOr<int64_t> MemoryLimitFromFlags() {
  const std::string text = absl::GetFlag(FLAGS_memory_limit);
  if (text.empty()) return DetectedMemoryLimitBytes();
  absl::StatusOr<int64_t> bytes = ParseMemorySize(text);
  if (!bytes.ok()) return bytes.status();
  return *bytes == 0 ? DetectedMemoryLimitBytes() : *bytes;
}

int MaxQueuedJobsFromFlags() { return absl::GetFlag(FLAGS_max_queued_jobs); }
double TaskTimeoutFromFlags() { return absl::GetFlag(FLAGS_task_timeout_seconds); }

std::vector<std::string> SecurityFlagsForChildren() {
  std::vector<std::string> out;
  if (const std::string v = absl::GetFlag(FLAGS_memory_limit); !v.empty()) {
    out.push_back("--memory_limit=" + v);
  }
  return out;
}

}  // namespace muonps
