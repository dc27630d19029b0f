// The cluster commands of the muonps binary:
//   coordinator | shard | worker          run one service
//   submit | watch | list | status | cancel   talk to a coordinator
//   local                                 a whole cluster on loopback
#ifndef MUONPS_CLI_CLUSTER_CLI_H_
#define MUONPS_CLI_CLUSTER_CLI_H_

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace muonps {

// Runs `command` (one of the above) with its positional arguments; returns
// the process exit status. -1 when `command` is not a cluster command.
int RunClusterCommand(const std::string& command, const std::vector<std::string>& args);

// Flags that may also come from the environment, as MUONPS_<NAME upper-cased>.
const std::vector<std::string>& EnvironmentFlags();

// Prints "muonps: error: MESSAGE" and returns the exit status: 2 for invalid
// input, 1 otherwise.
int Fail(const absl::Status& status);

// `muonps local` (cli/local_cluster.cc).
int LocalCommand(const std::vector<std::string>& args);

// Sets the compute threads from --threads, else MUONPS_THREADS, else all cores.
void ApplyThreadsFlag();

}  // namespace muonps

#endif  // MUONPS_CLI_CLUSTER_CLI_H_
