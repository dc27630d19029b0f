#include "cli/cluster_cli.h"

#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <csignal>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <thread>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "cli/client.h"
#include "cli/cuda_plugin.h"
#include "cli/security_flags.h"
#include "cli/tls_flags.h"
#include "common/job_spec.h"
#include "common/numerics.h"
#include "common/parallel.h"
#include "muonps/v1/coordinator.grpc.pb.h"
#include "muonps/v1/shard.grpc.pb.h"
#include "optim/orthogonalizer.h"
#include "rpc/grpc_server.h"
#include "rpc/membership.h"
#include "rpc/metrics.h"
#include "rpc/rpc_util.h"
#include "services/coordinator/coordinator.h"
#include "services/coordinator/placement.h"
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
ABSL_FLAG(int, min_shards, 1,
          "Coordinator: start a job once this many shards are registered. Env MUONPS_MIN_SHARDS");
ABSL_FLAG(double, lease_seconds, 3.0,
          "Coordinator: a member's lease after its last heartbeat. Env MUONPS_LEASE_SECONDS");
ABSL_FLAG(double, heartbeat_seconds, 0.5,
          "Coordinator: how often members heartbeat. Env MUONPS_HEARTBEAT_SECONDS");
ABSL_FLAG(std::string, state_dir, "",
          "Coordinator: directory of its job store (coordinator.db, SQLite): jobs outlive the "
          "process and a restarted coordinator continues the running one (empty: jobs live in "
          "memory only). Env MUONPS_STATE_DIR");
ABSL_FLAG(double, drain_seconds, 120.0,
          "shard: on SIGTERM, wait this long at most for the coordinator to hand the held job "
          "to the other shards before exiting. Env MUONPS_DRAIN_SECONDS");
ABSL_FLAG(std::string, port_file, "", "Write the bound port to this file once serving");
ABSL_FLAG(int64_t, after_seq, -2,
          "watch: start with the events after this sequence number (-1: every event the "
          "coordinator still holds) instead of a snapshot of the job");
ABSL_FLAG(bool, json, false, "Client commands: print JSON for scripts");
ABSL_FLAG(int, shards, 1, "local: optimizer shards to start; plan: shards of the cluster");
ABSL_FLAG(int, workers, 1, "local: workers to start; plan: workers of the cluster");
ABSL_FLAG(std::string, log_dir, "",
          "local: directory for the services' logs (default: a new /tmp/muonps-local-*)");
ABSL_FLAG(int64_t, crash_after_pushes, 0,
          "worker (fault injection for tests): SIGKILL itself after this many gradient pushes");
ABSL_FLAG(std::string, device, "auto",
          "worker, shard: where they compute: cpu, cuda (a worker's lanes spread over every "
          "visible GPU; a shard's Newton-Schulz on GPU 0; refused when none is usable), or auto "
          "(cuda when a GPU is visible and this binary was built with CUDA, else cpu)");
ABSL_FLAG(bool, overlap_push, true,
          "worker: stream each tensor's gradient to the shards while the backward pass runs "
          "(false: push after it)");
ABSL_FLAG(bool, plan_ahead, true,
          "coordinator: hand out each step's tasks before the previous step is applied, so that "
          "workers pull each tensor as the shards update it (false: after the apply)");
ABSL_FLAG(std::string, metrics_listen, "",
          "host:port of the Prometheus /metrics endpoint (port 0 = a free port; empty = none). "
          "Env MUONPS_METRICS_LISTEN");
ABSL_FLAG(std::string, metrics_port_file, "",
          "Write the metrics endpoint's port to this file once serving");
ABSL_FLAG(
    double, peak_tflops, 0.0,
    "worker: peak TFLOP/s of its compute, for the model FLOPs utilisation metric (0 = unknown). "
    "Env MUONPS_PEAK_TFLOPS");
ABSL_FLAG(
    bool, metrics, false,
    "local: give every service a /metrics endpoint on a free port and write their addresses to "
    "LOG_DIR/prometheus_targets.json (Prometheus file_sd format)");
ABSL_DECLARE_FLAG(std::string, resume);
ABSL_DECLARE_FLAG(int, threads);

namespace muonps {
namespace {

void LogLine(const std::string& line) {
  std::fprintf(stderr, "%s\n", line.c_str());
  std::fflush(stderr);
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
  while (SignalCount() == 0) std::this_thread::sleep_for(std::chrono::milliseconds(100));
}

// ---------------------------------------------------------------------------
// Services

int ServeCoordinator() {
  CoordinatorOptions options;
  options.min_shards = absl::GetFlag(FLAGS_min_shards);
  options.lease_seconds = absl::GetFlag(FLAGS_lease_seconds);
  options.heartbeat_seconds = absl::GetFlag(FLAGS_heartbeat_seconds);
  options.log = [](const std::string& line) { LogLine("coordinator: " + line); };
  {
    absl::StatusOr<std::string> secret = ClusterSecretFromFlags();
    if (!secret.ok()) return Fail(secret.status());
    options.cluster_secret = *secret;
    absl::StatusOr<std::shared_ptr<const UserTokens>> users = UserTokensFromFlags();
    if (!users.ok()) return Fail(users.status());
    options.users = *users;
    absl::StatusOr<int64_t> memory = MemoryLimitFromFlags();
    if (!memory.ok()) return Fail(memory.status());
    options.memory_limit_bytes = *memory;
    options.checkpoint_root = CheckpointRootFromFlags();
    options.max_queued_jobs = MaxQueuedJobsFromFlags();
    options.task_timeout_seconds = TaskTimeoutFromFlags();
    options.plan_ahead = absl::GetFlag(FLAGS_plan_ahead);
    if (const std::string dir = absl::GetFlag(FLAGS_state_dir); !dir.empty()) {
      absl::StatusOr<std::unique_ptr<JobStore>> store = JobStore::Open(dir);
      if (!store.ok()) return Fail(store.status());
      options.store = std::move(*store);
      LogLine(absl::StrCat("coordinator: job store ", options.store->path()));
    }
  }
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
  absl::StatusOr<std::unique_ptr<GrpcServer>> server =
      GrpcServer::Start(server_options, {coordinator.job_service(), coordinator.cluster_service()});
  if (!server.ok()) return Fail(server.status());
  if (absl::Status st = WritePortFile((*server)->port()); !st.ok()) return Fail(st);
  (*server)->SetServing(true);
  LogLine(absl::StrCat("muonps coordinator: serving on ", server_options.address, " (port ",
                       (*server)->port(), "); the cluster computes with ",
                       DescribeNumerics(LocalNumerics())));
  if (options.users == nullptr) {
    LogLine("muonps coordinator: no --tokens_file: every caller is an anonymous admin");
  }
  if (options.cluster_secret.empty()) {
    LogLine(
        "muonps coordinator: no --cluster_secret_file: anyone who reaches this port may "
        "register as a member");
  }
  WaitForSignal();
  LogLine("muonps coordinator: shutting down");
  (*server)->SetServing(false);
  coordinator.Shutdown();
  (*server)->Shutdown(1.0);
  return 0;
}

// --device for `role`: how many CUDA devices it computes on (0: the CPU),
// or why it cannot (an unknown value; cuda asked for but none usable).
absl::StatusOr<int> DevicesFromFlag(const std::string& role) {
  const std::string device = absl::GetFlag(FLAGS_device);
  if (device != "cpu" && device != "cuda" && device != "auto") {
    return absl::InvalidArgumentError(
        absl::StrCat("--device: \"", device, "\" is not cpu, cuda or auto"));
  }
  if (device == "cpu") return 0;
  std::string why;
  int gpus = 0;
  absl::StatusOr<const CudaPlugin*> plugin = CudaPlugin::Load();
  if (plugin.ok()) {
    gpus = (*plugin)->VisibleDevices(&why);
  } else {
    why = std::string(plugin.status().message());
  }
  if (device == "cuda" && gpus == 0) {
    return absl::FailedPreconditionError(absl::StrCat("--device cuda: ", why));
  }
  if (gpus == 0) LogLine(absl::StrCat(role, ": computing on the CPU (", why, ")"));
  return gpus;
}

int ServeShard() {
  ApplyThreadsFlag();
  InstallSignalHandlers();
  absl::StatusOr<std::unique_ptr<ProcessMetrics>> metrics = StartMetrics();
  if (!metrics.ok()) return Fail(metrics.status());
  // Declared before the service, which uses it until it is destroyed.
  std::unique_ptr<Orthogonalizer> orthogonalizer;
  std::string shard_device;  // NumericsProfile.device: empty for the CPU
  {
    absl::StatusOr<int> gpus = DevicesFromFlag("muonps shard");
    if (!gpus.ok()) return Fail(gpus.status());
    if (*gpus > 0) {
      const CudaPlugin* plugin = *CudaPlugin::Load();
      absl::StatusOr<std::unique_ptr<Orthogonalizer>> made = plugin->CreateOrthogonalizer(0);
      if (!made.ok()) return Fail(made.status());
      orthogonalizer = std::move(*made);
      shard_device = plugin->DeviceDescription(1);
      LogLine(absl::StrCat("muonps shard: Newton-Schulz on ", orthogonalizer->name()));
    }
  }
  ShardServiceImpl service((*metrics)->registry);
  service.set_orthogonalizer(orthogonalizer.get());
  // Nothing is served to anyone before the coordinator has issued this
  // shard's secret; checkpoints only under the operator's root.
  service.RequireMemberSecret();
  {
    const std::string root = CheckpointRootFromFlags();
    service.ConfineCheckpoints(root.empty() ? std::vector<std::string>{}
                                            : std::vector<std::string>{root});
  }
  absl::StatusOr<std::string> cluster_secret = ClusterSecretFromFlags();
  if (!cluster_secret.ok()) return Fail(cluster_secret.status());
  absl::StatusOr<int64_t> memory = MemoryLimitFromFlags();
  if (!memory.ok()) return Fail(memory.status());
  GrpcServerOptions server_options;
  server_options.address = ListenAddress("127.0.0.1:0");
  server_options.metrics = (*metrics)->registry;
  absl::StatusOr<std::unique_ptr<GrpcServer>> server =
      GrpcServer::Start(server_options, {&service});
  if (!server.ok()) return Fail(server.status());
  const std::string advertise = absl::GetFlag(FLAGS_advertise).empty()
                                    ? (*server)->address()
                                    : absl::GetFlag(FLAGS_advertise);
  Membership membership(Membership::Kind::kShard, CoordinatorAddress(), advertise, 0,
                        *cluster_secret, *memory);
  membership.set_device(shard_device);
  membership.set_on_registered([&service](const std::string&, const std::string& secret) {
    service.SetMemberSecret(secret);
  });
  absl::Status refused;  // set by `registering` before it raises SIGTERM
  std::thread registering([&] {
    absl::Status st = membership.Start(3600.0);
    if (!st.ok()) {
      LogLine(absl::StrCat("muonps shard: ", st.message()));
      // Refused for good (e.g. numerics that are not the cluster's): exit
      // with the reason, so an orchestrator shows it instead of a shard that
      // silently never becomes ready.
      if (!absl::IsCancelled(st)) {
        refused = st;
        raise(SIGTERM);
      }
      return;
    }
    LogLine(absl::StrCat("muonps shard: registered as ", membership.member_id(), ", serving on ",
                         advertise, " with ", NumThreads(), " threads, ",
                         DescribeNumerics(LocalNumerics())));
    (*server)->SetServing(true);
  });
  if (absl::Status st = WritePortFile((*server)->port()); !st.ok()) {
    membership.Stop();
    registering.join();
    return Fail(st);
  }
  WaitForSignal();
  if (refused.ok() && !service.job_id().empty()) {
    // Hand the job over before leaving (a rolling update, a node drain):
    // the coordinator checkpoints at the next step boundary, loads the job
    // on the other shards and drops it here. A second signal, or
    // --drain_seconds, ends the wait.
    LogLine(absl::StrCat("muonps shard: leaving; handing job ", service.job_id(),
                         " over at the next step boundary"));
    membership.SetDraining();
    const absl::Time deadline = absl::Now() + absl::Seconds(absl::GetFlag(FLAGS_drain_seconds));
    while (!service.job_id().empty() && SignalCount() < 2 && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(100));
    }
  }
  LogLine("muonps shard: shutting down");
  membership.Stop();
  registering.join();
  service.Shutdown();
  (*server)->Shutdown(1.0);
  return refused.ok() ? 0 : Fail(refused);
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
  options.address = absl::GetFlag(FLAGS_advertise).empty() ? (*server)->address()
                                                           : absl::GetFlag(FLAGS_advertise);
  options.threads = NumThreads();
  options.crash_after_pushes = absl::GetFlag(FLAGS_crash_after_pushes);
  options.overlap_push = absl::GetFlag(FLAGS_overlap_push);
  {
    absl::StatusOr<int> gpus = DevicesFromFlag("muonps worker");
    if (!gpus.ok()) return Fail(gpus.status());
    if (*gpus > 0) {
      const CudaPlugin* plugin = *CudaPlugin::Load();
      options.backend_factory = [plugin, n = *gpus](int lane) {
        return plugin->CreateBackend(lane % n);
      };
      options.device = plugin->DeviceDescription(*gpus);
      LogLine(absl::StrCat("muonps worker: computing on ", *gpus, " CUDA device(s)"));
    }
  }
  options.log = [](const std::string& line) { LogLine("muonps worker: " + line); };
  options.register_timeout_seconds = 3600.0;
  options.metrics = (*metrics)->registry;
  options.peak_flops = absl::GetFlag(FLAGS_peak_tflops) * 1e12;
  options.on_registered = [&] { (*server)->SetServing(true); };
  {
    absl::StatusOr<std::string> secret = ClusterSecretFromFlags();
    if (!secret.ok()) return Fail(secret.status());
    options.cluster_secret = *secret;
    absl::StatusOr<int64_t> memory = MemoryLimitFromFlags();
    if (!memory.ok()) return Fail(memory.status());
    options.memory_bytes = *memory;
    options.data_roots = DataRootsFromFlags();
  }
  std::atomic<bool> stop{false};
  std::thread watcher([&] {
    WaitForSignal();
    stop.store(true);
  });
  Worker worker(options);
  absl::Status st = worker.Run(stop);
  if (!st.ok()) {
    raise(SIGTERM);  // ends the watcher's wait
    watcher.join();
    return Fail(st);
  }
  watcher.join();
  (*server)->Shutdown(1.0);
  return 0;
}

// ---------------------------------------------------------------------------
// Client commands

int SubmitCommand(const std::vector<std::string>& args) {
  if (args.size() != 1) {
    std::fprintf(
        stderr,
        "usage: muonps submit JOB.json [--resume DIR] [--coordinator HOST:PORT] [--json]\n");
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
  const int64_t after = absl::GetFlag(FLAGS_after_seq);
  if (after < -2) return Fail(absl::InvalidArgumentError("--after_seq: must be -1 or more"));
  absl::StatusOr<v1::Job> job = Watch(args[0], absl::GetFlag(FLAGS_json), nullptr,
                                      after == -2 ? std::nullopt : std::optional<int64_t>(after));
  if (!job.ok()) return Fail(job.status());
  return ExitStatusOf(job->state());
}

int ListCommand() {
  auto stub = JobStub();
  v1::ListJobsRequest request;
  v1::ListJobsResponse response;
  absl::Status st = Call(
      [&](grpc::ClientContext* c) { return stub->ListJobs(c, request, &response); }, "ListJobs");
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
  absl::Status st =
      Call([&](grpc::ClientContext* c) { return stub->GetJob(c, request, &response); }, "GetJob");
  if (!st.ok()) return Fail(st);
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << OneLineJson(response.job()) << std::endl;
    return 0;
  }
  const v1::Job& j = response.job();
  const v1::JobProgress& p = j.progress();
  std::printf("job:        %s (%s)\nstate:      %s%s%s\nstep:       %lld/%lld\n",
              j.job_id().c_str(), j.name().c_str(), StateName(j.state()),
              j.error().empty() ? "" : ": ", j.error().c_str(), static_cast<long long>(p.step()),
              static_cast<long long>(p.total_steps()));
  if (p.step() > j.start_step()) {
    std::printf(
        "loss:       %.4f\nlr:         %.3e\ngrad norm:  %.3f\ntokens/s:   %.0f\nETA:        %.0f "
        "s\n",
        p.loss(), p.lr(), p.grad_norm(), p.tokens_per_second(), p.eta_seconds());
  }
  if (p.has_val_loss())
    std::printf("val loss:   %.4f (step %lld)\n", p.val_loss(),
                static_cast<long long>(p.val_step()));
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
  absl::Status st = Call(
      [&](grpc::ClientContext* c) { return stub->CancelJob(c, request, &response); }, "CancelJob");
  if (!st.ok()) return Fail(st);
  if (absl::GetFlag(FLAGS_json)) {
    std::cout << OneLineJson(response.job()) << std::endl;
  } else {
    std::printf("%s: cancel requested (%s)\n", args[0].c_str(), StateName(response.job().state()));
  }
  return 0;
}

}  // namespace

const std::vector<std::string>& EnvironmentFlags() {
  static const std::vector<std::string>* flags =
      new std::vector<std::string>{"listen",
                                   "advertise",
                                   "coordinator",
                                   "min_shards",
                                   "lease_seconds",
                                   "heartbeat_seconds",
                                   "metrics_listen",
                                   "peak_tflops",
                                   "overlap_push",
                                   "plan_ahead",
                                   "device",
                                   "blas_core",
                                   "tls_cert",
                                   "tls_key",
                                   "tls_ca",
                                   "tls_server_name",
                                   "cluster_secret_file",
                                   "tokens_file",
                                   "token_file",
                                   "checkpoint_root",
                                   "data_root",
                                   "memory_limit",
                                   "max_queued_jobs",
                                   "task_timeout_seconds",
                                   "state_dir",
                                   "drain_seconds"};
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
  // Every cluster command serves or dials gRPC: its transport comes first.
  static const char* const kCommands[] = {"coordinator", "shard",  "worker", "submit", "watch",
                                          "list",        "status", "cancel", "local"};
  if (std::find(std::begin(kCommands), std::end(kCommands), command) == std::end(kCommands)) {
    return -1;
  }
  if (absl::Status st = ApplyTlsFlags(); !st.ok()) return Fail(st);
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
