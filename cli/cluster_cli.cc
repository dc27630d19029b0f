#include "cli/cluster_cli.h"

#include <fcntl.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <thread>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "cli/progress.h"
#include "common/job_spec.h"
#include "common/parallel.h"
#include "google/protobuf/util/json_util.h"
#include "muonps/v1/coordinator.grpc.pb.h"
#include "muonps/v1/shard.grpc.pb.h"
#include "services/coordinator/coordinator.h"
#include "services/coordinator/placement.h"
#include "services/server/grpc_server.h"
#include "services/server/membership.h"
#include "services/server/metrics.h"
#include "services/server/rpc_util.h"
#include "services/shard/shard_service.h"
#include "workers/worker/worker.h"

ABSL_FLAG(std::string, listen, "",
          "host:port to serve on (coordinator default 127.0.0.1:7070, shard and worker "
          "127.0.0.1:0 = a free port; 0.0.0.0:PORT in a cluster). Env MUONPS_LISTEN");
ABSL_FLAG(std::string, advertise, "",
          "host:port other members use to reach this shard or worker (default: the bound address). "
          "Env MUONPS_ADVERTISE");
ABSL_FLAG(std::string, coordinator, "",
          "Coordinator host:port (default 127.0.0.1:7070). Env MUONPS_COORDINATOR");
ABSL_FLAG(int, min_shards, 1, "Coordinator: start a job once this many shards are registered. Env MUONPS_MIN_SHARDS");
ABSL_FLAG(double, lease_seconds, 3.0, "Coordinator: a member's lease after its last heartbeat. Env MUONPS_LEASE_SECONDS");
ABSL_FLAG(double, heartbeat_seconds, 0.5, "Coordinator: how often members heartbeat. Env MUONPS_HEARTBEAT_SECONDS");
ABSL_FLAG(std::string, port_file, "", "Write the bound port to this file once serving");
ABSL_FLAG(bool, json, false, "Client commands: print JSON for scripts");
ABSL_FLAG(int, shards, 1, "local: optimizer shards to start");
ABSL_FLAG(int, workers, 1, "local: workers to start");
ABSL_FLAG(std::string, log_dir, "", "local: directory for the services' logs (default: a new /tmp/muonps-local-*)");
ABSL_FLAG(int64_t, crash_after_pushes, 0,
          "worker (fault injection for tests): SIGKILL itself after this many gradient pushes");
ABSL_FLAG(std::string, metrics_listen, "",
          "host:port of the Prometheus /metrics endpoint (port 0 = a free port; empty = none). "
          "Env MUONPS_METRICS_LISTEN");
ABSL_FLAG(std::string, metrics_port_file, "", "Write the metrics endpoint's port to this file once serving");
ABSL_FLAG(double, peak_tflops, 0.0,
          "worker: peak TFLOP/s of its compute, for the model FLOPs utilisation metric (0 = unknown). "
          "Env MUONPS_PEAK_TFLOPS");
ABSL_FLAG(bool, metrics, false,
          "local: give every service a /metrics endpoint on a free port and write their addresses to "
          "LOG_DIR/prometheus_targets.json (Prometheus file_sd format)");
ABSL_DECLARE_FLAG(std::string, resume);
ABSL_DECLARE_FLAG(int, threads);

namespace muonps {
namespace {

std::atomic<int> g_signals{0};

void OnSignal(int) { g_signals.fetch_add(1); }

void InstallSignalHandlers() {
  struct sigaction action = {};
  action.sa_handler = OnSignal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}

void LogLine(const std::string& line) {
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
}

std::string CoordinatorAddress() {
  const std::string flag = absl::GetFlag(FLAGS_coordinator);
  return flag.empty() ? "127.0.0.1:7070" : flag;
}

std::string ListenAddress(const std::string& fallback) {
  const std::string flag = absl::GetFlag(FLAGS_listen);
  return flag.empty() ? fallback : flag;
}

absl::Status WritePortFile(int port) {
  const std::string path = absl::GetFlag(FLAGS_port_file);
  if (path.empty()) return absl::OkStatus();
  const std::string tmp = path + ".tmp";
  {
    std::ofstream out(tmp);
    out << port << "\n";
    if (!out) return absl::InternalError(absl::StrCat("cannot write ", tmp));
  }
  std::error_code ec;
  std::filesystem::rename(tmp, path, ec);
  if (ec) return absl::InternalError(absl::StrCat("cannot write ", path, ": ", ec.message()));
  return absl::OkStatus();
}

// The process's metrics registry and, when --metrics_listen is set, its
// endpoint (the port goes to --metrics_port_file).
struct ProcessMetrics {
  std::shared_ptr<prometheus::Registry> registry = std::make_shared<prometheus::Registry>();
  std::unique_ptr<MetricsEndpoint> endpoint;
};

absl::StatusOr<std::unique_ptr<ProcessMetrics>> StartMetrics() {
  auto metrics = std::make_unique<ProcessMetrics>();
  const std::string address = absl::GetFlag(FLAGS_metrics_listen);
  if (address.empty()) return metrics;
  absl::StatusOr<std::unique_ptr<MetricsEndpoint>> endpoint =
      MetricsEndpoint::Start(address, metrics->registry);
  if (!endpoint.ok()) return endpoint.status();
  metrics->endpoint = std::move(*endpoint);
  const std::string file = absl::GetFlag(FLAGS_metrics_port_file);
  if (!file.empty()) {
    std::ofstream out(file + ".tmp");
    out << metrics->endpoint->port() << "\n";
    out.close();
    std::error_code ec;
    std::filesystem::rename(file + ".tmp", file, ec);
    if (ec) return absl::InternalError(absl::StrCat("cannot write ", file));
  }
  LogLine(absl::StrCat("metrics on http://", address.substr(0, address.rfind(':')), ":",
                       metrics->endpoint->port(), "/metrics"));
  return metrics;
}

void WaitForSignal() {
  while (g_signals.load() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
}

std::string OneLineJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(message, &out, options);
  return out;
}

const char* StateName(v1::JobState state) {
  switch (state) {
    case v1::JOB_STATE_QUEUED: return "QUEUED";
    case v1::JOB_STATE_RUNNING: return "RUNNING";
    case v1::JOB_STATE_SUCCEEDED: return "SUCCEEDED";
    case v1::JOB_STATE_FAILED: return "FAILED";
    case v1::JOB_STATE_CANCELLED: return "CANCELLED";
    default: return "UNSPECIFIED";
  }
}

bool Ended(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

// Exit status of a watched job: 0 succeeded, 1 failed, 4 cancelled.
int ExitStatusOf(v1::JobState state) {
  if (state == v1::JOB_STATE_SUCCEEDED) return 0;
  if (state == v1::JOB_STATE_CANCELLED) return 4;
  return 1;
}

// ---------------------------------------------------------------------------
// Services

int ServeCoordinator() {
  CoordinatorOptions options;
  options.min_shards = absl::GetFlag(FLAGS_min_shards);
  options.lease_seconds = absl::GetFlag(FLAGS_lease_seconds);
  options.heartbeat_seconds = absl::GetFlag(FLAGS_heartbeat_seconds);
  options.log = [](const std::string& line) { LogLine("coordinator: " + line); };
  if (options.lease_seconds <= options.heartbeat_seconds || options.heartbeat_seconds <= 0) {
    return Fail(absl::InvalidArgumentError(
        "--lease_seconds must be larger than --heartbeat_seconds, which must be > 0"));
  }
  InstallSignalHandlers();
  absl::StatusOr<std::unique_ptr<ProcessMetrics>> metrics = StartMetrics();
  if (!metrics.ok()) return Fail(metrics.status());
  options.metrics = (*metrics)->registry;
  Coordinator coordinator(options);
  GrpcServerOptions server_options;
  server_options.address = ListenAddress("127.0.0.1:7070");
  server_options.metrics = (*metrics)->registry;
  absl::StatusOr<std::unique_ptr<GrpcServer>> server = GrpcServer::Start(
      server_options, {coordinator.job_service(), coordinator.cluster_service()});
  if (!server.ok()) return Fail(server.status());
  if (absl::Status st = WritePortFile((*server)->port()); !st.ok()) return Fail(st);
  (*server)->SetServing(true);
  LogLine(absl::StrCat("muonps coordinator: serving on ", server_options.address, " (port ",
                       (*server)->port(), ")"));
  WaitForSignal();
  LogLine("muonps coordinator: shutting down");
  (*server)->SetServing(false);
  coordinator.Shutdown();
  (*server)->Shutdown(1.0);
  return 0;
}

int ServeShard() {
  ApplyThreadsFlag();
  InstallSignalHandlers();
  absl::StatusOr<std::unique_ptr<ProcessMetrics>> metrics = StartMetrics();
  if (!metrics.ok()) return Fail(metrics.status());
  ShardServiceImpl service((*metrics)->registry);
  GrpcServerOptions server_options;
  server_options.address = ListenAddress("127.0.0.1:0");
  server_options.metrics = (*metrics)->registry;
  absl::StatusOr<std::unique_ptr<GrpcServer>> server = GrpcServer::Start(server_options, {&service});
  if (!server.ok()) return Fail(server.status());
  const std::string advertise =
      absl::GetFlag(FLAGS_advertise).empty() ? (*server)->address() : absl::GetFlag(FLAGS_advertise);
  Membership membership(Membership::Kind::kShard, CoordinatorAddress(), advertise, 0);
  std::thread registering([&] {
    absl::Status st = membership.Start(3600.0);
    if (!st.ok()) {
      LogLine(absl::StrCat("muonps shard: ", st.message()));
      return;
    }
    LogLine(absl::StrCat("muonps shard: registered as ", membership.member_id(), ", serving on ",
                         advertise, " with ", NumThreads(), " threads"));
    (*server)->SetServing(true);
  });
  if (absl::Status st = WritePortFile((*server)->port()); !st.ok()) return Fail(st);
  WaitForSignal();
  LogLine("muonps shard: shutting down");
  membership.Stop();
  registering.join();
  service.Shutdown();
  (*server)->Shutdown(1.0);
  return 0;
}

int ServeWorker() {
  ApplyThreadsFlag();
  InstallSignalHandlers();
  absl::StatusOr<std::unique_ptr<ProcessMetrics>> metrics = StartMetrics();
  if (!metrics.ok()) return Fail(metrics.status());
  GrpcServerOptions server_options;
  server_options.address = ListenAddress("127.0.0.1:0");
  server_options.metrics = (*metrics)->registry;
  absl::StatusOr<std::unique_ptr<GrpcServer>> server = GrpcServer::Start(server_options, {});
  if (!server.ok()) return Fail(server.status());
  if (absl::Status st = WritePortFile((*server)->port()); !st.ok()) return Fail(st);
  WorkerOptions options;
  options.coordinator = CoordinatorAddress();
  options.address =
      absl::GetFlag(FLAGS_advertise).empty() ? (*server)->address() : absl::GetFlag(FLAGS_advertise);
  options.threads = NumThreads();
  options.crash_after_pushes = absl::GetFlag(FLAGS_crash_after_pushes);
  options.log = [](const std::string& line) { LogLine("muonps worker: " + line); };
  options.register_timeout_seconds = 3600.0;
  options.metrics = (*metrics)->registry;
  options.peak_flops = absl::GetFlag(FLAGS_peak_tflops) * 1e12;
  options.on_registered = [&] { (*server)->SetServing(true); };
  std::atomic<bool> stop{false};
  std::thread watcher([&] {
    WaitForSignal();
    stop.store(true);
  });
  Worker worker(options);
  absl::Status st = worker.Run(stop);
  if (!st.ok()) {
    g_signals.fetch_add(1);
    watcher.join();
    return Fail(st);
  }
  watcher.join();
  (*server)->Shutdown(1.0);
  return 0;
}

// ---------------------------------------------------------------------------
// Client commands

std::unique_ptr<v1::JobService::Stub> JobStub() {
  return v1::JobService::NewStub(MakeChannel(CoordinatorAddress()));
}

absl::Status Call(const std::function<grpc::Status(grpc::ClientContext*)>& rpc, const char* name) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(30.0));
  return FromGrpcStatus(rpc(&context), absl::StrCat("coordinator ", CoordinatorAddress(), ": ", name));
}

absl::StatusOr<std::string> Submit(const v1::JobSpec& spec, const std::string& resume) {
  auto stub = JobStub();
  v1::SubmitJobRequest request;
  *request.mutable_spec() = spec;
  request.set_resume_from(resume);
  v1::SubmitJobResponse response;
  absl::Status st = Call([&](grpc::ClientContext* c) { return stub->SubmitJob(c, request, &response); },
                         "SubmitJob");
  if (!st.ok()) return st;
  return response.job_id();
}

StepReport ToStepReport(const v1::Job& job) {
  const v1::JobProgress& p = job.progress();
  StepReport r;
  r.step = p.step();
  r.total_steps = p.total_steps();
  r.loss = p.loss();
  if (p.has_val_loss() && p.val_step() == p.step()) r.val_loss = p.val_loss();
  r.grad_norm = p.grad_norm();
  r.lr = p.lr();
  r.step_seconds = p.step_seconds();
  const v1::JobSpec& s = job.spec();
  r.tokens = static_cast<int64_t>(s.batch().slots()) * s.batch().micro_batch() *
             s.model().max_position_embeddings();
  r.max_load_ratio = p.max_load_ratio();
  return r;
}

// Streams the job's events until it ends, printing them (JSON lines with
// `json`); `poll`, when given, runs every 100 ms meanwhile on another thread.
// Returns the final job.
absl::StatusOr<v1::Job> Watch(const std::string& job_id, bool json,
                              const std::function<void()>& poll = nullptr) {
  auto stub = JobStub();
  grpc::ClientContext context;
  v1::WatchJobRequest request;
  request.set_job_id(job_id);
  std::unique_ptr<grpc::ClientReader<v1::WatchJobResponse>> reader = stub->WatchJob(&context, request);
  std::atomic<bool> done{false};
  std::thread poller;
  if (poll) {
    poller = std::thread([&] {
      while (!done.load()) {
        poll();
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
  }
  ProgressDisplay display(json ? nullptr : stderr, "");
  v1::WatchJobResponse event;
  v1::Job last;
  bool begun = false;
  while (reader->Read(&event)) {
    last = event.job();
    if (json) {
      std::cout << OneLineJson(event) << std::endl;
      continue;
    }
    switch (event.kind()) {
      case v1::JOB_EVENT_KIND_SNAPSHOT:
      case v1::JOB_EVENT_KIND_STATE:
        display.Abort();
        std::fprintf(stderr, "%s (%s): %s%s%s\n", last.job_id().c_str(), last.name().c_str(),
                     StateName(last.state()), last.error().empty() ? "" : ": ",
                     last.error().c_str());
        break;
      case v1::JOB_EVENT_KIND_PLACEMENT: {
        std::vector<v1::ShardPlacement> shards(last.placement().begin(), last.placement().end());
        std::fprintf(stderr, "placement from step %lld:\n%s",
                     static_cast<long long>(last.start_step()), FormatPlacement(shards).c_str());
        break;
      }
      case v1::JOB_EVENT_KIND_STEP:
        if (!begun) {
          display.Begin(last.start_step(), last.progress().total_steps());
          begun = true;
        }
        display.Step(ToStepReport(last));
        break;
      case v1::JOB_EVENT_KIND_CHECKPOINT:
        display.Abort();
        std::fprintf(stderr, "checkpoint: %s\n", last.last_checkpoint().c_str());
        break;
      default:
        break;
    }
  }
  done.store(true);
  if (poller.joinable()) poller.join();
  display.Abort();
  absl::Status st = FromGrpcStatus(reader->Finish(), absl::StrCat("coordinator ", CoordinatorAddress(), ": WatchJob"));
  if (!st.ok()) return st;
  if (!json && Ended(last.state())) {
    const v1::JobProgress& p = last.progress();
    std::fprintf(stderr, "%s %s at step %lld/%lld: loss %.4f", last.job_id().c_str(),
                 StateName(last.state()), static_cast<long long>(p.step()),
                 static_cast<long long>(p.total_steps()), p.loss());
    if (p.has_val_loss()) std::fprintf(stderr, ", val loss %.4f (step %lld)", p.val_loss(), static_cast<long long>(p.val_step()));
    std::fprintf(stderr, ", %.0f tokens/s in %.1f s\n", p.tokens_per_second(),
                 last.started_at() > 0 ? last.ended_at() - last.started_at() : 0.0);
    if (!last.last_checkpoint().empty()) std::fprintf(stderr, "checkpoint: %s\n", last.last_checkpoint().c_str());
  }
  return last;
}

int SubmitCommand(const std::vector<std::string>& args) {
  if (args.size() != 1) {
    std::fprintf(stderr, "usage: muonps submit JOB.json [--resume DIR] [--coordinator HOST:PORT] [--json]\n");
    return 2;
  }
  absl::StatusOr<v1::JobSpec> spec = LoadJobSpecFile(args[0]);
  if (!spec.ok()) return Fail(spec.status());
  absl::StatusOr<std::string> id = Submit(*spec, absl::GetFlag(FLAGS_resume));
  if (!id.ok()) return Fail(id.status());
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << "{\"job_id\":\"" << *id << "\"}" << std::endl;
  } else {
    std::cout << *id << std::endl;
  }
  return 0;
}

int WatchCommand(const std::vector<std::string>& args) {
  if (args.size() != 1) {
    std::fprintf(stderr, "usage: muonps watch JOB_ID [--coordinator HOST:PORT] [--json]\n");
    return 2;
  }
  absl::StatusOr<v1::Job> job = Watch(args[0], absl::GetFlag(FLAGS_json));
  if (!job.ok()) return Fail(job.status());
  return ExitStatusOf(job->state());
}

int ListCommand() {
  auto stub = JobStub();
  v1::ListJobsRequest request;
  v1::ListJobsResponse response;
  absl::Status st = Call([&](grpc::ClientContext* c) { return stub->ListJobs(c, request, &response); },
                         "ListJobs");
  if (!st.ok()) return Fail(st);
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << OneLineJson(response) << std::endl;
    return 0;
  }
  std::printf("%-12s %-16s %-10s %13s %8s %8s\n", "JOB", "NAME", "STATE", "STEP", "LOSS", "VAL");
  for (const v1::Job& j : response.jobs()) {
    const v1::JobProgress& p = j.progress();
    std::printf("%-12s %-16s %-10s %6lld/%-6lld %8.4f %8s\n", j.job_id().c_str(), j.name().c_str(),
                StateName(j.state()), static_cast<long long>(p.step()),
                static_cast<long long>(p.total_steps()), p.loss(),
                p.has_val_loss() ? absl::StrFormat("%.4f", p.val_loss()).c_str() : "-");
  }
  return 0;
}

int StatusCommand(const std::vector<std::string>& args) {
  if (args.size() != 1) {
    std::fprintf(stderr, "usage: muonps status JOB_ID [--coordinator HOST:PORT] [--json]\n");
    return 2;
  }
  auto stub = JobStub();
  v1::GetJobRequest request;
  request.set_job_id(args[0]);
  v1::GetJobResponse response;
  absl::Status st = Call([&](grpc::ClientContext* c) { return stub->GetJob(c, request, &response); },
                         "GetJob");
  if (!st.ok()) return Fail(st);
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << OneLineJson(response.job()) << std::endl;
    return 0;
  }
  const v1::Job& j = response.job();
  const v1::JobProgress& p = j.progress();
  std::printf("job:        %s (%s)\nstate:      %s%s%s\nstep:       %lld/%lld\n", j.job_id().c_str(),
              j.name().c_str(), StateName(j.state()), j.error().empty() ? "" : ": ", j.error().c_str(),
              static_cast<long long>(p.step()), static_cast<long long>(p.total_steps()));
  if (p.step() > j.start_step()) {
    std::printf("loss:       %.4f\nlr:         %.3e\ngrad norm:  %.3f\ntokens/s:   %.0f\nETA:        %.0f s\n",
                p.loss(), p.lr(), p.grad_norm(), p.tokens_per_second(), p.eta_seconds());
  }
  if (p.has_val_loss()) std::printf("val loss:   %.4f (step %lld)\n", p.val_loss(), static_cast<long long>(p.val_step()));
  if (!j.last_checkpoint().empty()) std::printf("checkpoint: %s\n", j.last_checkpoint().c_str());
  if (j.placement_size() > 0) {
    std::vector<v1::ShardPlacement> shards(j.placement().begin(), j.placement().end());
    std::printf("placement:\n%s", FormatPlacement(shards).c_str());
  }
  return 0;
}

int CancelCommand(const std::vector<std::string>& args) {
  if (args.size() != 1) {
    std::fprintf(stderr, "usage: muonps cancel JOB_ID [--coordinator HOST:PORT] [--json]\n");
    return 2;
  }
  auto stub = JobStub();
  v1::CancelJobRequest request;
  request.set_job_id(args[0]);
  v1::CancelJobResponse response;
  absl::Status st = Call([&](grpc::ClientContext* c) { return stub->CancelJob(c, request, &response); },
                         "CancelJob");
  if (!st.ok()) return Fail(st);
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << OneLineJson(response.job()) << std::endl;
  } else {
    std::printf("%s: cancel requested (%s)\n", args[0].c_str(), StateName(response.job().state()));
  }
  return 0;
}

// ---------------------------------------------------------------------------
// local: a whole cluster of processes on loopback

class LocalCluster {
 public:
  explicit LocalCluster(std::string log_dir) : log_dir_(std::move(log_dir)) {}
  ~LocalCluster() { Stop(); }

  // Starts `muonps ARGS...` with its output in log_dir/NAME.log, in its own
  // process group (Ctrl-C reaches only `local`), killed if `local` dies.
  absl::Status Spawn(const std::string& name, std::vector<std::string> args) {
    const std::string exe = std::filesystem::read_symlink("/proc/self/exe").string();
    const std::string log = absl::StrCat(log_dir_, "/", name, ".log");
    args.insert(args.begin(), exe);
    const pid_t parent = getpid();
    const pid_t pid = fork();
    if (pid < 0) return absl::InternalError("fork failed");
    if (pid == 0) {
      setpgid(0, 0);
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(1);
      const int fd = open(log.c_str(), O_WRONLY | O_CREAT | O_TRUNC, 0644);
      if (fd >= 0) {
        dup2(fd, 1);
        dup2(fd, 2);
        close(fd);
      }
      std::vector<char*> argv;
      for (std::string& a : args) argv.push_back(a.data());
      argv.push_back(nullptr);
      execv(exe.c_str(), argv.data());
      _exit(127);
    }
    children_.push_back({name, pid, log});
    return absl::OkStatus();
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
        std::ifstream in(c.log);
        std::stringstream text;
        text << in.rdbuf();
        std::string tail = text.str();
        if (tail.size() > 2000) tail = tail.substr(tail.size() - 2000);
        return absl::InternalError(absl::StrCat(c.name, " exited (status ", status, "); its log ",
                                                c.log, " ends:\n", tail));
      }
    }
    return absl::OkStatus();
  }

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
    pid_t pid;
    std::string log;
    bool exited = false;
  };
  std::string log_dir_;
  std::vector<Child> children_;
};

int LocalCommand(const std::vector<std::string>& args) {
  if (args.size() > 1) {
    std::fprintf(stderr, "usage: muonps local [--shards N] [--workers M] [JOB.json] [--resume DIR]\n");
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
    if (mkdtemp(pattern) == nullptr) return Fail(absl::InternalError("cannot create a log directory"));
    log_dir = pattern;
  } else {
    std::error_code ec;
    std::filesystem::create_directories(log_dir, ec);
  }
  ApplyThreadsFlag();
  const int cores = NumThreads();
  InstallSignalHandlers();
  LocalCluster cluster(log_dir);
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
    flags.push_back("--metrics_listen=127.0.0.1:0");
    flags.push_back("--metrics_port_file=" + file);
    return flags;
  };
  auto with = [](std::vector<std::string> a, const std::vector<std::string>& b) {
    a.insert(a.end(), b.begin(), b.end());
    return a;
  };
  if (absl::Status st = cluster.Spawn(
          "coordinator", with({"coordinator", "--listen=127.0.0.1:0", "--port_file=" + port_file,
                               absl::StrCat("--min_shards=", shards)},
                              metrics_flags("coordinator", "coordinator")));
      !st.ok()) {
    return Fail(st);
  }
  absl::StatusOr<int> port = cluster.WaitPort(port_file, "coordinator", 30.0);
  if (!port.ok()) return Fail(port.status());
  const std::string coordinator = absl::StrCat("127.0.0.1:", *port);
  absl::SetFlag(&FLAGS_coordinator, coordinator);
  for (int i = 0; i < shards; ++i) {
    const std::string name = absl::StrCat("shard-", i);
    absl::Status st = cluster.Spawn(
        name, with({"shard", "--listen=127.0.0.1:0", "--coordinator=" + coordinator,
                    absl::StrCat("--threads=", cores)},
                   metrics_flags(name, "shard")));
    if (!st.ok()) return Fail(st);
  }
  const int worker_threads = std::max(1, cores / workers);
  for (int i = 0; i < workers; ++i) {
    const std::string name = absl::StrCat("worker-", i);
    absl::Status st = cluster.Spawn(
        name, with({"worker", "--listen=127.0.0.1:0", "--coordinator=" + coordinator,
                    absl::StrCat("--threads=", worker_threads)},
                   metrics_flags(name, "worker")));
    if (!st.ok()) return Fail(st);
  }
  std::fprintf(stderr, "muonps local: coordinator on %s, %d shard(s), %d worker(s) x %d thread(s); logs in %s\n",
               coordinator.c_str(), shards, workers, worker_threads, log_dir.c_str());
  // Wait until every member registered, so the job uses all shards.
  auto stub = JobStub();
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(60);
  while (true) {
    if (g_signals.load() > 0) return 130;
    if (absl::Status st = cluster.CheckAlive(); !st.ok()) return Fail(st);
    v1::GetClusterRequest request;
    v1::GetClusterResponse response;
    absl::Status st = Call([&](grpc::ClientContext* c) { return stub->GetCluster(c, request, &response); },
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
    const int signals = g_signals.load();
    if (signals >= 2) {
      cluster.Stop();
      std::_Exit(130);
    }
    auto cancel = [&] {
      auto cancel_stub = JobStub();
      v1::CancelJobRequest request;
      request.set_job_id(*id);
      v1::CancelJobResponse response;
      (void)Call([&](grpc::ClientContext* c) { return cancel_stub->CancelJob(c, request, &response); },
                 "CancelJob");
    };
    if (signals == 1 && !cancelled) {
      cancelled = true;
      std::fprintf(stderr, "\nmuonps local: cancelling %s (Ctrl-C again to stop at once)\n", id->c_str());
      cancel();
    }
    // A service of this cluster died (nothing restarts it here): stop the
    // job with a checkpoint instead of waiting for it forever.
    if (!lost.load()) {
      absl::Status alive = cluster.CheckAlive();
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

}  // namespace

const std::vector<std::string>& EnvironmentFlags() {
  static const std::vector<std::string>* flags = new std::vector<std::string>{
      "listen",        "advertise",         "coordinator",    "min_shards",
      "lease_seconds", "heartbeat_seconds", "metrics_listen", "peak_tflops"};
  return *flags;
}

int Fail(const absl::Status& status) {
  std::fprintf(stderr, "muonps: error: %s\n", std::string(status.message()).c_str());
  return status.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
}

void ApplyThreadsFlag() {
  int threads = absl::GetFlag(FLAGS_threads);
  if (threads <= 0) {
    if (const char* env = std::getenv("MUONPS_THREADS")) threads = std::atoi(env);
  }
  if (threads <= 0) threads = static_cast<int>(sysconf(_SC_NPROCESSORS_ONLN));
  SetNumThreads(threads);
}

int RunClusterCommand(const std::string& command, const std::vector<std::string>& args) {
  if (command == "coordinator") return ServeCoordinator();
  if (command == "shard") return ServeShard();
  if (command == "worker") return ServeWorker();
  if (command == "submit") return SubmitCommand(args);
  if (command == "watch") return WatchCommand(args);
  if (command == "list") return ListCommand();
  if (command == "status") return StatusCommand(args);
  if (command == "cancel") return CancelCommand(args);
  if (command == "local") return LocalCommand(args);
  return -1;
}

}  // namespace muonps
