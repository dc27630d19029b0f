#include "cli/help.h"

#include <cstdio>
#include <string_view>
#include <vector>

#include "absl/flags/reflection.h"
#include "absl/strings/str_cat.h"

namespace muonps {
namespace {

struct CommandHelp {
  const char* name;
  const char* usage;  // after "muonps "
  const char* about;
  std::vector<const char*> flags;
};

// Flags of every command that serves or dials gRPC (cli/tls_flags.cc).
#define MUONPS_TLS_FLAGS "tls_cert", "tls_key", "tls_ca", "tls_server_name"

// Flags every service takes.
#define MUONPS_SERVICE_FLAGS \
  "listen", "port_file", "metrics_listen", "metrics_port_file", "blas_core", MUONPS_TLS_FLAGS

const std::vector<CommandHelp>& Commands() {
  static const auto* commands = new std::vector<CommandHelp>{
      {"train",
       "train [JOB.json] [--resume DIR] [--until STEP] [--threads N] [--log_jsonl PATH]",
       "Train in one process; without JOB.json, the default job (default model on the fortunes "
       "corpus).",
       {"resume", "until", "threads", "log_jsonl", "quiet", "blas_core"}},
      {"local",
       "local [JOB.json] [--shards N] [--workers M] [--resume DIR]",
       "The same training as a cluster of processes on loopback: a coordinator, N optimizer "
       "shards and M workers; submits the job, watches it to the end, stops everything.",
       {"shards", "workers", "resume", "threads", "log_dir", "metrics", "json", "blas_core",
        "checkpoint_root", "data_root", "memory_limit", MUONPS_TLS_FLAGS}},
      {"coordinator",
       "coordinator [--listen HOST:PORT] [--min_shards N]",
       "Run the coordinator: takes jobs, leases members, places tensors, plans steps.",
       {"min_shards", "lease_seconds", "heartbeat_seconds", "cluster_secret_file", "tokens_file",
        "checkpoint_root", "memory_limit", "max_queued_jobs", "task_timeout_seconds", "state_dir",
        "plan_ahead", MUONPS_SERVICE_FLAGS}},
      {"shard",
       "shard --coordinator HOST:PORT [--listen HOST:PORT] [--advertise HOST:PORT]",
       "Run an optimizer shard: holds whole tensors and their optimizer state, applies steps.",
       {"coordinator", "advertise", "threads", "device", "cluster_secret_file", "checkpoint_root",
        "memory_limit", "drain_seconds", MUONPS_SERVICE_FLAGS}},
      {"worker",
       "worker --coordinator HOST:PORT [--threads N]",
       "Run a stateless worker: pulls parameters, computes slots, pushes gradients.",
       {"coordinator", "advertise", "threads", "device", "peak_tflops", "overlap_push",
        "crash_after_pushes", "cluster_secret_file", "data_root", "memory_limit",
        MUONPS_SERVICE_FLAGS}},
      {"submit",
       "submit JOB.json [--resume DIR]",
       "Queue a job at the coordinator; prints its id.",
       {"coordinator", "resume", "json", "token_file", MUONPS_TLS_FLAGS}},
      {"watch",
       "watch ID",
       "Live progress of a job until it ends (exit 0 succeeded, 1 failed, 4 cancelled).",
       {"coordinator", "json", "after_seq", "token_file", MUONPS_TLS_FLAGS}},
      {"list",
       "list",
       "Every job the coordinator knows, oldest first.",
       {"coordinator", "json", "token_file", MUONPS_TLS_FLAGS}},
      {"status",
       "status ID",
       "One job's state and progress.",
       {"coordinator", "json", "token_file", MUONPS_TLS_FLAGS}},
      {"cancel",
       "cancel ID",
       "Cancel a queued or running job.",
       {"coordinator", "json", "token_file", MUONPS_TLS_FLAGS}},
      {"validate",
       "validate JOB.json",
       "Check a job file; print it with every default filled in.",
       {}},
      {"defaults",
       "defaults [--preset default|small|moonlight-tiny|moonlight-16b-a3b]",
       "Print the default job, or a preset, as JSON.",
       {"preset"}},
      {"plan",
       "plan JOB.json --workers N --shards M [--link_gbps B] [--worker_gflops F]",
       "What the job costs on a cluster of that shape: bytes pulled and pushed and compute per "
       "worker, memory and Newton-Schulz per shard, step time with and without overlap, and the "
       "bottleneck.",
       {"workers", "shards", "link_gbps", "worker_gflops", "shard_gflops"}},
      {"numerics",
       "numerics [--json] [--blas_core CORE]",
       "This machine's numerics: BLAS kernel, fingerprint, and the kernels the CPU can run. "
       "Members of a cluster must agree.",
       {"json", "blas_core"}},
      {"version",
       "version",
       "Print the version, the BLAS kernel and the numerics fingerprint.",
       {}},
      {"help", "help [COMMAND]", "This overview, or one command's usage and flags.", {}},
  };
  return *commands;
}

#undef MUONPS_SERVICE_FLAGS
#undef MUONPS_TLS_FLAGS

const CommandHelp* Find(std::string_view name) {
  for (const CommandHelp& c : Commands()) {
    if (name == c.name) return &c;
  }
  return nullptr;
}

// Flags that abseil itself defines and handles.
bool IsAbseilBuiltin(std::string_view name) {
  for (std::string_view b :
       {"helpfull", "helpshort", "helppackage", "helpon", "helpmatch", "version", "only_check_args",
        "flagfile", "fromenv", "tryfromenv", "undefok"}) {
    if (name == b) return true;
  }
  return false;
}

// The flag name of a command-line argument ("--a=b" -> "a"), "" when the
// argument is not a flag.
std::string FlagName(std::string_view arg) {
  if (arg.size() < 2 || arg[0] != '-' || arg == "--") return "";
  arg.remove_prefix(arg[1] == '-' ? 2 : 1);
  return std::string(arg.substr(0, arg.find('=')));
}

bool KnownFlag(const std::string& name) {
  if (absl::FindCommandLineFlag(name) != nullptr || IsAbseilBuiltin(name)) return true;
  // --noquiet for a bool flag.
  return name.size() > 2 && name.compare(0, 2, "no") == 0 &&
         absl::FindCommandLineFlag(name.substr(2)) != nullptr;
}

}  // namespace

std::string UsageMessage() {
  std::string text =
      "Mixture-of-Experts training with the Muon optimizer. `muonps help COMMAND` prints one "
      "command's usage and flags.\n\n";
  for (const CommandHelp& c : Commands()) absl::StrAppend(&text, "  muonps ", c.usage, "\n");
  return text;
}

int PrintHelp(const std::string& command) {
  if (command.empty()) {
    std::printf("muonps: Mixture-of-Experts training with the Muon optimizer.\n\nCommands:\n");
    for (const CommandHelp& c : Commands()) {
      std::printf("  %-12s %s\n", c.name, c.about);
    }
    std::printf(
        "\n`muonps help COMMAND` (or `muonps COMMAND --help`) prints a command's usage and flags.\n"
        "Client commands take --coordinator HOST:PORT (default $MUONPS_COORDINATOR, then\n"
        "127.0.0.1:7070); service flags also come from MUONPS_<FLAG> variables.\n"
        "Services and clients speak mutual TLS with --tls_cert, --tls_key and --tls_ca\n"
        "(plaintext without them, meant for loopback).\n");
    return 0;
  }
  const CommandHelp* c = Find(command);
  if (c == nullptr) {
    std::fprintf(stderr, "muonps: error: unknown command \"%s\"; `muonps help` lists them\n",
                 command.c_str());
    return 2;
  }
  std::printf("usage: muonps %s\n\n%s\n", c->usage, c->about);
  if (!c->flags.empty()) std::printf("\nFlags:\n");
  for (const char* name : c->flags) {
    const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
    if (flag == nullptr) continue;
    std::printf("  --%s (default: %s)\n      %s\n", name,
                flag->DefaultValue().empty() ? "\"\"" : flag->DefaultValue().c_str(),
                flag->Help().c_str());
  }
  return 0;
}

bool FlagGiven(int argc, char** argv, const std::string& name) {
  for (int i = 1; i < argc; ++i) {
    if (std::string_view(argv[i]) == "--") break;
    if (FlagName(argv[i]) == name) return true;
  }
  return false;
}

std::optional<int> PreParseCommandLine(int argc, char** argv) {
  std::string command;
  bool help = false;
  std::vector<std::string> positional;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--") break;
    const std::string name = FlagName(arg);
    if (name.empty()) {
      positional.emplace_back(arg);
      continue;
    }
    if (name == "help" || name == "h") {
      help = true;
      continue;
    }
    if (KnownFlag(name)) {
      // "--flag value": the next argument is the value, not a command.
      const absl::CommandLineFlag* flag = absl::FindCommandLineFlag(name);
      if (arg.find('=') == std::string_view::npos && flag != nullptr && !flag->IsOfType<bool>()) {
        ++i;
      }
      continue;
    }
    {
      std::fprintf(stderr, "muonps: error: unknown flag --%s; `muonps help%s%s` lists the flags\n",
                   name.c_str(), positional.empty() ? "" : " ",
                   positional.empty() ? "" : positional[0].c_str());
      return 2;
    }
  }
  if (!positional.empty()) command = positional[0];
  if (command == "help") return PrintHelp(positional.size() > 1 ? positional[1] : "");
  if (help) return PrintHelp(command);
  if (!command.empty() && Find(command) == nullptr) {
    std::fprintf(stderr, "muonps: error: unknown command \"%s\"; `muonps help` lists them\n",
                 command.c_str());
    return 2;
  }
  return std::nullopt;
}

}  // namespace muonps
