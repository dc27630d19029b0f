// `muonps local`: a coordinator, shards and workers as processes on loopback.
#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <deque>
#include <filesystem>
#include <fstream>
#include <map>
#include <optional>
#include <sstream>
#include <thread>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "cli/client.h"
#include "cli/cluster_cli.h"
#include "cli/security_flags.h"
#include "cli/tls_flags.h"
#include "common/job_spec.h"
#include "common/parallel.h"
#include "common/status_macros.h"
#include "data/token_source.h"
#include "rpc/auth.h"

ABSL_DECLARE_FLAG(std::string, coordinator);
ABSL_DECLARE_FLAG(std::string, resume);
ABSL_DECLARE_FLAG(bool, json);
ABSL_DECLARE_FLAG(int, shards);
ABSL_DECLARE_FLAG(int, workers);
ABSL_DECLARE_FLAG(std::string, log_dir);
ABSL_DECLARE_FLAG(bool, metrics);

namespace muonps {
namespace {

// How `local` restarts a service that died, as Kubernetes restarts a pod's
// container: after a delay that doubles with each restart in the last
// minute, up to a cap; a service that dies more often than that is left
// down and the job stopped.
constexpr auto kFirstRestartDelay = std::chrono::milliseconds(500);
constexpr auto kMaxRestartDelay = std::chrono::seconds(8);
constexpr int kMaxRestartsPerMinute = 6;

class LocalCluster {
 public:
  explicit LocalCluster(std::string log_dir) : log_dir_(std::move(log_dir)) {}
  ~LocalCluster() { Stop(); }

  // Starts `muonps ARGS...` with its output in log_dir/NAME.log, in its own
  // process group (Ctrl-C reaches only `local`), killed if `local` dies.
  absl::Status Spawn(const std::string& name, std::vector<std::string> args) {
    const std::string exe = std::filesystem::read_symlink("/proc/self/exe").string();
    args.insert(args.begin(), exe);
    // Every member speaks the transport `local` itself was given.
    for (std::string& flag : TlsFlagsForChildren()) args.push_back(std::move(flag));
    for (std::string& flag : SecurityFlagsForChildren()) args.push_back(std::move(flag));
    Child child;
    child.name = name;
    child.args = std::move(args);
    child.log = absl::StrCat(log_dir_, "/", name, ".log");
    MUONPS_RETURN_IF_ERROR(Start(child, /*append=*/false));
    children_.push_back(std::move(child));
    return absl::OkStatus();
  }

  // Replaces the flag `--NAME=...` of child `name` for its restarts (a
  // coordinator comes back on the port its members know).
  void SetRestartFlag(const std::string& name, const std::string& flag, const std::string& value) {
    for (Child& c : children_) {
      if (c.name != name) continue;
      for (std::string& a : c.args) {
        if (absl::StartsWith(a, "--" + flag + "=")) a = absl::StrCat("--", flag, "=", value);
      }
    }
  }

  // Reads a port file written by a child, waiting up to `seconds`.
  absl::StatusOr<int> WaitPort(const std::string& file, const std::string& name, double seconds) {
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
    while (std::chrono::steady_clock::now() < deadline) {
      std::ifstream in(file);
      int port = 0;
      if (in >> port && port > 0) return port;
      if (absl::Status st = CheckAlive(); !st.ok()) return st;
      std::this_thread::sleep_for(std::chrono::milliseconds(50));
    }
    return absl::DeadlineExceededError(absl::StrCat(name, " did not start within ", seconds, " s"));
  }

  // An error naming the first child that exited, with the end of its log.
  absl::Status CheckAlive() {
    for (Child& c : children_) {
      if (c.exited) continue;
      int status = 0;
      if (waitpid(c.pid, &status, WNOHANG) == c.pid) {
        c.exited = true;
        return Exited(c, status);
      }
    }
    return absl::OkStatus();
  }

  // Restarts the children that exited, each after its delay (see
  // kFirstRestartDelay); an error naming a child that exited more than
  // kMaxRestartsPerMinute times in the last minute. Called from one thread.
  absl::Status Supervise() {
    const auto now = std::chrono::steady_clock::now();
    for (Child& c : children_) {
      if (!c.exited) {
        int status = 0;
        if (waitpid(c.pid, &status, WNOHANG) != c.pid) continue;
        c.exited = true;
        while (!c.restarts.empty() && now - c.restarts.front() > std::chrono::minutes(1)) {
          c.restarts.pop_front();
        }
        if (static_cast<int>(c.restarts.size()) >= kMaxRestartsPerMinute) {
          c.given_up = true;
          return absl::UnavailableError(absl::StrCat(Exited(c, status).message(), "\n(",
                                                     c.restarts.size(),
                                                     " restarts in the last minute: left down)"));
        }
        auto delay = kFirstRestartDelay * (1 << c.restarts.size());
        if (delay > kMaxRestartDelay) delay = kMaxRestartDelay;
        c.restart_at = now + delay;
        std::fprintf(stderr, "\nmuonps local: %s exited (%s); restarting it in %.1f s\n",
                     c.name.c_str(), Describe(status).c_str(),
                     std::chrono::duration<double>(delay).count());
      } else if (!c.given_up && c.restart_at.has_value() && now >= *c.restart_at) {
        c.restart_at.reset();
        c.restarts.push_back(now);
        if (absl::Status st = Start(c, /*append=*/true); !st.ok()) return st;
        ++restarts_;
      }
    }
    return absl::OkStatus();
  }

  // Restarts so far (Supervise).
  int restarts() const { return restarts_; }

  // SIGTERM to every child, SIGKILL to those still running after 10 s.
  void Stop() {
    for (Child& c : children_) {
      if (!c.exited) kill(c.pid, SIGTERM);
    }
    const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(10);
    for (Child& c : children_) {
      while (!c.exited) {
        int status = 0;
        if (waitpid(c.pid, &status, WNOHANG) == c.pid) {
          c.exited = true;
        } else if (std::chrono::steady_clock::now() > deadline) {
          kill(c.pid, SIGKILL);
          waitpid(c.pid, &status, 0);
          c.exited = true;
        } else {
          std::this_thread::sleep_for(std::chrono::milliseconds(20));
        }
      }
    }
  }

 private:
  struct Child {
    std::string name;
    std::vector<std::string> args;  // argv, the executable first
    pid_t pid = -1;
    std::string log;
    bool exited = false;
    bool given_up = false;
    std::optional<std::chrono::steady_clock::time_point> restart_at;
    std::deque<std::chrono::steady_clock::time_point> restarts;  // in the last minute
  };

  // Forks and execs `c`; its log is truncated first, or appended to on a
  // restart.
  absl::Status Start(Child& c, bool append) {
    const pid_t parent = getpid();
    std::vector<char*> argv;
    argv.reserve(c.args.size() + 1);
    for (std::string& a : c.args) argv.push_back(a.data());
    argv.push_back(nullptr);
    const pid_t pid = fork();
    if (pid < 0) return absl::InternalError("fork failed");
    if (pid == 0) {
      setpgid(0, 0);
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(1);
      const int fd = open(c.log.c_str(), O_WRONLY | O_CREAT | (append ? O_APPEND : O_TRUNC), 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        close(fd);
      }
      if (append) {
        static const char kMark[] = "---- muonps local: restarted\n";
        (void)!write(2, kMark, sizeof(kMark) - 1);
      }
      execv(argv[0], argv.data());
      _exit(127);
    }
    c.pid = pid;
    c.exited = false;
    return absl::OkStatus();
  }

  static std::string Describe(int status) {
    if (WIFSIGNALED(status)) return absl::StrCat("killed by signal ", WTERMSIG(status));
    if (WIFEXITED(status)) return absl::StrCat("exit status ", WEXITSTATUS(status));
    return absl::StrCat("status ", status);
  }

  static absl::Status Exited(const Child& c, int status) {
    std::ifstream in(c.log);
    std::stringstream text;
    text << in.rdbuf();
    std::string tail = text.str();
    if (tail.size() > 2000) tail = tail.substr(tail.size() - 2000);
    return absl::InternalError(absl::StrCat(c.name, " exited (", Describe(status), "); its log ",
                                            c.log, " ends:\n", tail));
  }

  std::string log_dir_;
  std::vector<Child> children_;
  int restarts_ = 0;
};

}  // namespace

int LocalCommand(const std::vector<std::string>& args) {
  if (args.size() > 1) {
    std::fprintf(stderr,
                 "usage: muonps local [--shards N] [--workers M] [JOB.json] [--resume DIR]\n");
    return 2;
  }
  absl::StatusOr<v1::JobSpec> spec = args.empty() ? DefaultJobSpec() : LoadJobSpecFile(args[0]);
  if (!spec.ok()) return Fail(spec.status());
  const int shards = absl::GetFlag(FLAGS_shards), workers = absl::GetFlag(FLAGS_workers);
  if (shards < 1 || workers < 1) {
    return Fail(absl::InvalidArgumentError("--shards and --workers must be at least 1"));
  }
  std::string log_dir = absl::GetFlag(FLAGS_log_dir);
  if (log_dir.empty()) {
    char pattern[] = "/tmp/muonps-local-XXXXXX";
    if (mkdtemp(pattern) == nullptr)
      return Fail(absl::InternalError("cannot create a log directory"));
    log_dir = pattern;
  } else {
    std::error_code ec;
    std::filesystem::create_directories(log_dir, ec);
  }
  ApplyThreadsFlag();
  const int cores = NumThreads();
  InstallSignalHandlers();
  LocalCluster cluster(log_dir);
  // The coordinator's job store lives as long as this cluster: a store left
  // by an earlier `local` in the same directory is removed.
  for (const char* file : {"coordinator.db", "coordinator.db-wal", "coordinator.db-shm"}) {
    std::error_code ec;
    std::filesystem::remove(absl::StrCat(log_dir, "/coordinator-state/", file), ec);
  }
  const std::string port_file = log_dir + "/coordinator.port";
  std::filesystem::remove(port_file);
  const bool with_metrics = absl::GetFlag(FLAGS_metrics);
  std::vector<std::pair<std::string, std::string>> metric_files;  // (role, port file)
  auto metrics_flags = [&](const std::string& name, const std::string& role) {
    std::vector<std::string> flags;
    if (!with_metrics) return flags;
    const std::string file = absl::StrCat(log_dir, "/", name, ".metrics_port");
    std::filesystem::remove(file);
    metric_files.emplace_back(role, file);
    flags.emplace_back("--metrics_listen=127.0.0.1:0");
    flags.push_back("--metrics_port_file=" + file);
    return flags;
  };
  auto with = [](std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  // The services accept only each other: a fresh cluster secret, readable by
  // this user only. Checkpoints under --checkpoint_root (default: the working
  // directory), data under --data_root (default: the working directory) and
  // the bundled fortunes corpus.
  const std::string secret_file = log_dir + "/cluster.secret";
  {
    std::ofstream out(secret_file, std::ios::trunc);
    out << RandomHex(24) << "\n";
    out.close();
    std::error_code ec;
    std::filesystem::permissions(
        secret_file, std::filesystem::perms::owner_read | std::filesystem::perms::owner_write, ec);
    if (!out || ec) return Fail(absl::InternalError("cannot write " + secret_file));
  }
  std::error_code cwd_ec;
  const std::string cwd = std::filesystem::current_path(cwd_ec).string();
  const std::string checkpoint_root =
      CheckpointRootFromFlags().empty() ? cwd : CheckpointRootFromFlags();
  std::vector<std::string> data_roots = DataRootsFromFlags();
  if (data_roots.empty()) data_roots.push_back(cwd);
  data_roots.emplace_back(kDefaultCorpusPath);
  const std::vector<std::string> member_flags = {"--cluster_secret_file=" + secret_file};
  const std::vector<std::string> storage_flags = {"--checkpoint_root=" + checkpoint_root};
  const std::vector<std::string> data_flags = {"--data_root=" + absl::StrJoin(data_roots, ",")};
  if (absl::Status st = cluster.Spawn(
          "coordinator",
          with(with(with({"coordinator", "--listen=127.0.0.1:0", "--port_file=" + port_file,
                          absl::StrCat("--min_shards=", shards),
                          // a restarted coordinator continues the job
                          "--state_dir=" + log_dir + "/coordinator-state"},
                         metrics_flags("coordinator", "coordinator")),
                    member_flags),
               storage_flags));
      !st.ok()) {
    return Fail(st);
  }
  absl::StatusOr<int> port = cluster.WaitPort(port_file, "coordinator", 30.0);
  if (!port.ok()) return Fail(port.status());
  const std::string coordinator = absl::StrCat("127.0.0.1:", *port);
  cluster.SetRestartFlag("coordinator", "listen", coordinator);
  absl::SetFlag(&FLAGS_coordinator, coordinator);
  for (int i = 0; i < shards; ++i) {
    const std::string name = absl::StrCat("shard-", i);
    absl::Status st = cluster.Spawn(
        name, with(with(with({"shard", "--listen=127.0.0.1:0", "--coordinator=" + coordinator,
                              absl::StrCat("--threads=", cores),
                              // stopped together with its coordinator:
                              // nothing to hand a job over to
                              "--drain_seconds=0"},
                             metrics_flags(name, "shard")),
                        member_flags),
                   storage_flags));
    if (!st.ok()) return Fail(st);
  }
  const int worker_threads = std::max(1, cores / workers);
  for (int i = 0; i < workers; ++i) {
    const std::string name = absl::StrCat("worker-", i);
    absl::Status st = cluster.Spawn(
        name, with(with(with({"worker", "--listen=127.0.0.1:0", "--coordinator=" + coordinator,
                              absl::StrCat("--threads=", worker_threads)},
                             metrics_flags(name, "worker")),
                        member_flags),
                   data_flags));
    if (!st.ok()) return Fail(st);
  }
  std::fprintf(
      stderr,
      "muonps local: coordinator on %s, %d shard(s), %d worker(s) x %d thread(s); logs in %s\n",
      coordinator.c_str(), shards, workers, worker_threads, log_dir.c_str());
  // Wait until every member registered, so the job uses all shards.
  auto stub = JobStub();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (true) {
    if (SignalCount() > 0) return 130;
    if (absl::Status st = cluster.CheckAlive(); !st.ok()) return Fail(st);
    v1::GetClusterRequest request;
    v1::GetClusterResponse response;
    absl::Status st =
        Call([&](grpc::ClientContext* c) { return stub->GetCluster(c, request, &response); },
             "GetCluster");
    if (st.ok() && response.shards_size() >= shards && response.workers_size() >= workers) break;
    if (std::chrono::steady_clock::now() > deadline) {
      return Fail(absl::DeadlineExceededError(absl::StrCat(
          "the cluster did not form within 60 s (", response.shards_size(), " shard(s), ",
          response.workers_size(), " worker(s) registered); see ", log_dir)));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  if (with_metrics) {
    // Prometheus file_sd targets, one group per role.
    std::map<std::string, std::vector<std::string>> targets;
    for (const auto& [role, file] : metric_files) {
      absl::StatusOr<int> metrics_port = cluster.WaitPort(file, role + " metrics", 30.0);
      if (!metrics_port.ok()) return Fail(metrics_port.status());
      targets[role].push_back(absl::StrCat("\"127.0.0.1:", *metrics_port, "\""));
    }
    std::string json = "[";
    for (const auto& [role, list] : targets) {
      if (json.size() > 1) json += ",";
      json += absl::StrCat("{\"targets\":[", absl::StrJoin(list, ","), "],\"labels\":{\"role\":\"",
                           role, "\"}}");
    }
    json += "]\n";
    const std::string targets_file = log_dir + "/prometheus_targets.json";
    std::ofstream(targets_file + ".tmp") << json;
    std::filesystem::rename(targets_file + ".tmp", targets_file);
    std::fprintf(stderr, "muonps local: metrics targets in %s\n", targets_file.c_str());
  }
  absl::StatusOr<std::string> id = Submit(*spec, absl::GetFlag(FLAGS_resume));
  if (!id.ok()) return Fail(id.status());
  // First Ctrl-C: cancel the job (it checkpoints) and keep watching to its
  // end; second: stop everything now.
  bool cancelled = false;
  std::atomic<bool> lost{false};
  absl::StatusOr<v1::Job> job = Watch(*id, absl::GetFlag(FLAGS_json), [&] {
    const int signals = SignalCount();
    if (signals >= 2) {
      cluster.Stop();
      std::_Exit(130);
    }
    auto cancel = [&] {
      auto cancel_stub = JobStub();
      v1::CancelJobRequest request;
      request.set_job_id(*id);
      v1::CancelJobResponse response;
      (void)Call(
          [&](grpc::ClientContext* c) { return cancel_stub->CancelJob(c, request, &response); },
          "CancelJob");
    };
    if (signals == 1 && !cancelled) {
      cancelled = true;
      std::fprintf(stderr, "\nmuonps local: cancelling %s (Ctrl-C again to stop at once)\n",
                   id->c_str());
      cancel();
    }
    // A service of this cluster died: it is restarted and the job recovers
    // (a shard's tensors move, a coordinator continues from its store). One
    // that keeps dying is left down and the job cancelled with a checkpoint
    // instead of waiting for it forever.
    if (!lost.load()) {
      absl::Status alive = cluster.Supervise();
      if (!alive.ok()) {
        lost.store(true);
        std::fprintf(stderr, "\nmuonps local: %s\nmuonps local: cancelling %s\n",
                     std::string(alive.message()).c_str(), id->c_str());
        cancel();
      }
    }
  });
  cluster.Stop();
  if (!job.ok()) return Fail(job.status());
  if (cancelled) return 130;
  if (lost.load()) return 1;
  return ExitStatusOf(job->state());
}

}  // namespace muonps
