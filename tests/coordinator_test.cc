// The coordinator behind a real GrpcServer on loopback, driven through the
// generated JobService and ClusterService stubs: refusals carry the statuses
// coordinator.proto promises, queued jobs wait for shards and cancel at once,
// leases lapse, health and reflection answer as generic gRPC tools expect,
// and a whole in-process cluster (coordinator, two ShardServiceImpl servers
// registered through Membership, two Workers) trains a tiny job to the same
// bits as the single-process Trainer.
#include "services/coordinator/coordinator.h"

#include <gmock/gmock.h>
#include <google/protobuf/unknown_field_set.h>
#include <grpcpp/generic/generic_stub.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <functional>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "checkpoint/checkpoint.h"
#include "common/job_spec.h"
#include "common/model_layout.h"
#include "common/numerics.h"
#include "grpc/health/v1/health.grpc.pb.h"
#include "rpc/grpc_server.h"
#include "rpc/membership.h"
#include "rpc/rpc_util.h"
#include "services/shard/shard_service.h"
#include "tests/test_util.h"
#include "trainer/trainer.h"
#include "workers/worker/worker.h"

namespace muonps {
namespace {

using ::testing::HasSubstr;

std::string Describe(const grpc::Status& status) {
  return absl::StrCat("code ", status.error_code(), ": ", status.error_message());
}

// Polls `done` every 20 ms for up to `seconds`.
bool WaitFor(const std::function<bool()>& done, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

grpc::health::v1::HealthCheckResponse::ServingStatus Health(const std::string& address,
                                                            const std::string& service) {
  std::unique_ptr<grpc::health::v1::Health::Stub> stub =
      grpc::health::v1::Health::NewStub(MakeChannel(address));
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(5.0));
  grpc::health::v1::HealthCheckRequest request;
  request.set_service(service);
  grpc::health::v1::HealthCheckResponse response;
  const grpc::Status status = stub->Check(&context, request, &response);
  EXPECT_TRUE(status.ok()) << Describe(status);
  return response.status();
}

// The services a server lists through grpc.reflection.v1alpha, which is what
// grpcurl and other generic clients ask first. No stub for reflection.proto
// is installed, so the call goes through a generic stub with the two
// messages in wire format: ServerReflectionRequest{list_services = "*"}
// (field 7) and, in the answer, list_services_response (field 6) holding
// ServiceResponse{name} entries (field 1, field 1).
std::vector<std::string> ReflectedServices(const std::string& address) {
  grpc::GenericStub stub(MakeChannel(address));
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(10.0));
  grpc::CompletionQueue cq;
  auto tag = [](intptr_t i) { return reinterpret_cast<void*>(i); };
  auto await = [&](intptr_t want) {
    void* got = nullptr;
    bool ok = false;
    EXPECT_TRUE(cq.Next(&got, &ok));
    EXPECT_EQ(got, tag(want));
    return ok;
  };
  std::unique_ptr<grpc::GenericClientAsyncReaderWriter> call = stub.PrepareCall(
      &context, "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo", &cq);
  std::vector<std::string> names;
  call->StartCall(tag(1));
  if (await(1)) {
    const std::string request("\x3a\x01*", 3);
    grpc::Slice slice(request);
    grpc::ByteBuffer buffer(&slice, 1);
    call->Write(buffer, tag(2));
    EXPECT_TRUE(await(2));
    call->WritesDone(tag(3));
    EXPECT_TRUE(await(3));
    grpc::ByteBuffer reply;
    call->Read(&reply, tag(4));
    if (await(4)) {
      std::vector<grpc::Slice> slices;
      EXPECT_TRUE(reply.Dump(&slices).ok());
      std::string bytes;
      for (const grpc::Slice& s : slices)
        bytes.append(reinterpret_cast<const char*>(s.begin()), s.size());
      google::protobuf::UnknownFieldSet response;
      EXPECT_TRUE(response.ParseFromString(bytes));
      for (int i = 0; i < response.field_count(); ++i) {
        if (response.field(i).number() != 6) continue;
        google::protobuf::UnknownFieldSet list;
        EXPECT_TRUE(list.ParseFromString(response.field(i).length_delimited()));
        for (int j = 0; j < list.field_count(); ++j) {
          google::protobuf::UnknownFieldSet service;
          EXPECT_TRUE(service.ParseFromString(list.field(j).length_delimited()));
          for (int k = 0; k < service.field_count(); ++k) {
            if (service.field(k).number() == 1)
              names.push_back(service.field(k).length_delimited());
          }
        }
      }
    }
  }
  grpc::Status status;
  call->Finish(&status, tag(5));
  await(5);
  EXPECT_TRUE(status.ok()) << Describe(status);
  cq.Shutdown();
  void* ignored_tag;
  bool ignored_ok;
  while (cq.Next(&ignored_tag, &ignored_ok)) {
  }
  return names;
}

// A shard server on loopback, registered with the coordinator.
struct ShardProcess {
  ShardServiceImpl service;
  std::unique_ptr<GrpcServer> server;
  std::unique_ptr<Membership> membership;

  void Stop() {
    if (membership != nullptr) membership->Stop();
    service.Shutdown();
    if (server != nullptr) server->Shutdown();
  }
};

class CoordinatorTest : public testing_util::TempDirTest {
 protected:
  void TearDown() override {
    stop_workers_ = true;
    if (coordinator_ != nullptr) coordinator_->Shutdown();  // ends a running job, drops it
    for (std::thread& t : worker_threads_) t.join();
    for (auto& shard : shards_) shard->Stop();
    if (server_ != nullptr) server_->Shutdown();
    coordinator_.reset();
    TempDirTest::TearDown();
  }

  void StartCoordinator(double heartbeat_seconds, double lease_seconds, int min_shards = 1,
                        bool serving = true) {
    CoordinatorOptions options;
    options.heartbeat_seconds = heartbeat_seconds;
    options.lease_seconds = lease_seconds;
    options.min_shards = min_shards;
    options.shard_rpc_seconds = 60.0;
    coordinator_ = std::make_unique<Coordinator>(options);
    absl::StatusOr<std::unique_ptr<GrpcServer>> server =
        GrpcServer::Start({}, {coordinator_->job_service(), coordinator_->cluster_service()});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    if (serving) server_->SetServing(true);
    jobs_ = v1::JobService::NewStub(MakeChannel(server_->address()));
    cluster_ = v1::ClusterService::NewStub(MakeChannel(server_->address()));
  }

  void StartShards(int n) {
    for (int i = 0; i < n; ++i) {
      auto shard = std::make_unique<ShardProcess>();
      absl::StatusOr<std::unique_ptr<GrpcServer>> server = GrpcServer::Start({}, {&shard->service});
      ASSERT_TRUE(server.ok()) << server.status();
      shard->server = std::move(*server);
      shard->server->SetServing(true);
      shard->membership = std::make_unique<Membership>(Membership::Kind::kShard, server_->address(),
                                                       shard->server->address(), 0);
      ASSERT_TRUE(shard->membership->Start(10.0).ok());
      shards_.push_back(std::move(shard));
    }
  }

  void StartWorkers(int n) {
    for (int i = 0; i < n; ++i) {
      WorkerOptions options;
      options.coordinator = server_->address();
      options.threads = 1;
      options.task_wait_seconds = 0.2;
      options.register_timeout_seconds = 10.0;
      workers_.push_back(std::make_unique<Worker>(options));
      Worker* worker = workers_.back().get();
      worker_threads_.emplace_back(
          [this, worker] { EXPECT_TRUE(worker->Run(stop_workers_).ok()); });
    }
  }

  v1::GetClusterResponse Cluster() {
    grpc::ClientContext context;
    v1::GetClusterResponse response;
    EXPECT_TRUE(jobs_->GetCluster(&context, {}, &response).ok());
    return response;
  }

  // Waits until the coordinator sees `shards` shards and `workers` workers.
  void AwaitCluster(int shards, int workers) {
    ASSERT_TRUE(WaitFor(
        [&] {
          v1::GetClusterResponse c = Cluster();
          return c.shards_size() == shards && c.workers_size() == workers;
        },
        20.0))
        << Cluster().DebugString();
  }

  grpc::Status Submit(const v1::JobSpec& spec, std::string* job_id) {
    grpc::ClientContext context;
    v1::SubmitJobRequest request;
    *request.mutable_spec() = spec;
    v1::SubmitJobResponse response;
    grpc::Status status = jobs_->SubmitJob(&context, request, &response);
    *job_id = response.job_id();
    return status;
  }

  v1::Job GetJob(const std::string& job_id, grpc::Status* status = nullptr) {
    grpc::ClientContext context;
    v1::GetJobRequest request;
    request.set_job_id(job_id);
    v1::GetJobResponse response;
    grpc::Status st = jobs_->GetJob(&context, request, &response);
    if (status != nullptr) *status = st;
    return response.job();
  }

  grpc::Status Cancel(const std::string& job_id, v1::Job* job = nullptr) {
    grpc::ClientContext context;
    v1::CancelJobRequest request;
    request.set_job_id(job_id);
    v1::CancelJobResponse response;
    grpc::Status status = jobs_->CancelJob(&context, request, &response);
    if (job != nullptr) *job = response.job();
    return status;
  }

  // Every message of WatchJob until the stream ends; `on_event` sees each.
  grpc::Status Watch(const std::string& job_id, std::vector<v1::WatchJobResponse>* events,
                     const std::function<void(const v1::WatchJobResponse&)>& on_event = nullptr) {
    grpc::ClientContext context;
    context.set_deadline(DeadlineIn(120.0));
    v1::WatchJobRequest request;
    request.set_job_id(job_id);
    std::unique_ptr<grpc::ClientReader<v1::WatchJobResponse>> reader =
        jobs_->WatchJob(&context, request);
    v1::WatchJobResponse event;
    while (reader->Read(&event)) {
      events->push_back(event);
      if (on_event) on_event(event);
    }
    return reader->Finish();
  }

  // A tiny job on a text corpus in the test's directory: 4 slots of 2
  // sequences of 16 tokens; validation every 2 steps; checkpoints every 2
  // steps (and at the end) under `checkpoint_dir` when set.
  v1::JobSpec TinyJob(int total_steps, const std::string& checkpoint_dir) {
    if (!std::filesystem::exists(Path("corpus.txt"))) {
      std::ofstream out(Path("corpus.txt"));
      for (int i = 0; i < 400; ++i) {
        out << "Worker " << i % 7 << " pushed slot " << (i * 31 % 97) << " to shard " << i % 3
            << ".\n";
      }
    }
    absl::StatusOr<v1::JobSpec> job = ParseJobSpecJson(
        absl::StrCat(R"({
      "name": "tiny",
      "model": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
                "max_position_embeddings": 16, "intermediate_size": 32, "n_routed_experts": 4,
                "moe_intermediate_size": 8},
      "optimizer": {"lr": 0.01},
      "schedule": {"total_steps": )",
                     total_steps, R"(, "warmup_steps": 1},
      "data": {"path": ")",
                     Path("corpus.txt"), R"(", "sampling": "random", "eval_every": 2,
               "eval_windows": 4},
      "batch": {"slots": 4, "micro_batch": 2},
      "checkpoint": {"dir": ")",
                     checkpoint_dir, R"(", "every_steps": 2},
      "seed": 5})"));
    EXPECT_TRUE(job.ok()) << job.status();
    return *job;
  }

  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<GrpcServer> server_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
  std::unique_ptr<v1::ClusterService::Stub> cluster_;
  std::vector<std::unique_ptr<ShardProcess>> shards_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<std::thread> worker_threads_;
  std::atomic<bool> stop_workers_{false};
};

// ---------------------------------------------------------------------------
// Refusals

TEST_F(CoordinatorTest, JobServiceRefusals) {
  StartCoordinator(0.1, 0.5);
  v1::JobSpec bad = TinyJob(3, "");
  bad.mutable_model()->set_num_experts_per_tok(9);  // > n_routed_experts
  std::string id;
  grpc::Status invalid = Submit(bad, &id);
  EXPECT_EQ(invalid.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << Describe(invalid);
  EXPECT_THAT(invalid.error_message(), HasSubstr("spec.model.num_experts_per_tok"));

  grpc::Status status;
  GetJob("job-424242", &status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(status.error_message(), HasSubstr("job-424242"));
  status = Cancel("job-424242");
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(status.error_message(), HasSubstr("job-424242"));
  std::vector<v1::WatchJobResponse> events;
  status = Watch("job-424242", &events);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_TRUE(events.empty());

  // The refused submission left no job behind.
  grpc::ClientContext context;
  v1::ListJobsResponse list;
  ASSERT_TRUE(jobs_->ListJobs(&context, {}, &list).ok());
  EXPECT_EQ(list.jobs_size(), 0);
}

TEST_F(CoordinatorTest, ClusterServiceRefusals) {
  StartCoordinator(0.1, 0.5);
  {
    grpc::ClientContext context;
    v1::HeartbeatRequest request;
    request.set_member_id("worker-99");
    v1::HeartbeatResponse response;
    grpc::Status status = cluster_->Heartbeat(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_THAT(status.error_message(), HasSubstr("worker-99"));
  }
  {
    grpc::ClientContext context;
    v1::GetTaskRequest request;
    request.set_worker_id("worker-99");
    request.set_wait_seconds(0.1);
    v1::GetTaskResponse response;
    grpc::Status status = cluster_->GetTask(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::NOT_FOUND);
    EXPECT_THAT(status.error_message(), HasSubstr("worker-99"));
  }
  {
    grpc::ClientContext context;
    v1::RegisterShardResponse response;
    grpc::Status status = cluster_->RegisterShard(&context, {}, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
    EXPECT_THAT(status.error_message(), HasSubstr("address"));
    EXPECT_EQ(Cluster().shards_size(), 0);
  }
  // A known job with no step in progress (it is queued: no shard).
  std::string id;
  ASSERT_TRUE(Submit(TinyJob(3, ""), &id).ok());
  {
    grpc::ClientContext context;
    v1::ReportSlotsRequest request;
    request.set_job_id(id);
    request.set_step(0);
    v1::SlotStats* slot = request.add_slots();
    slot->set_loss_sum(1.0);
    slot->set_tokens(32);
    v1::ReportSlotsResponse response;
    grpc::Status status = cluster_->ReportSlots(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr("step"));
  }
  {
    grpc::ClientContext context;
    v1::ReportSlotsRequest request;
    request.set_job_id("job-424242");
    v1::ReportSlotsResponse response;
    EXPECT_EQ(cluster_->ReportSlots(&context, request, &response).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext context;
    v1::ReportEvalRequest request;
    request.set_job_id(id);
    request.set_version(0);
    v1::ReportEvalResponse response;
    grpc::Status status = cluster_->ReportEval(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr("version"));
  }
  EXPECT_EQ(GetJob(id).state(), v1::JOB_STATE_QUEUED);
}

// ---------------------------------------------------------------------------
// The queue

TEST_F(CoordinatorTest, JobsQueueWithoutShardsAndCancelAtOnce) {
  StartCoordinator(0.1, 0.5);
  std::vector<std::string> ids(3);
  for (int i = 0; i < 3; ++i) {
    v1::JobSpec spec = TinyJob(3, "");
    spec.set_name(absl::StrCat("queued-", i));
    ASSERT_TRUE(Submit(spec, &ids[i]).ok());
  }
  EXPECT_LT(ids[0], ids[1]);
  EXPECT_LT(ids[1], ids[2]);

  // A watch of the last job, open before it is cancelled.
  std::vector<v1::WatchJobResponse> watched;
  grpc::Status watch_status;
  std::thread watcher([&] { watch_status = Watch(ids[2], &watched); });

  std::this_thread::sleep_for(std::chrono::milliseconds(300));
  for (const std::string& id : ids) EXPECT_EQ(GetJob(id).state(), v1::JOB_STATE_QUEUED) << id;

  v1::Job cancelled;
  ASSERT_TRUE(Cancel(ids[1], &cancelled).ok());
  EXPECT_EQ(cancelled.state(), v1::JOB_STATE_CANCELLED);
  EXPECT_GT(cancelled.ended_at(), 0.0);
  EXPECT_EQ(cancelled.started_at(), 0.0);
  grpc::Status again = Cancel(ids[1]);
  EXPECT_EQ(again.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(again);
  EXPECT_THAT(again.error_message(), HasSubstr("CANCELLED"));

  // Watching an ended job: its snapshot, then the end of the stream.
  std::vector<v1::WatchJobResponse> ended;
  ASSERT_TRUE(Watch(ids[1], &ended).ok());
  ASSERT_EQ(ended.size(), 1u);
  EXPECT_EQ(ended[0].kind(), v1::JOB_EVENT_KIND_SNAPSHOT);
  EXPECT_EQ(ended[0].job().state(), v1::JOB_STATE_CANCELLED);

  ASSERT_TRUE(Cancel(ids[2]).ok());
  watcher.join();
  EXPECT_TRUE(watch_status.ok()) << Describe(watch_status);
  ASSERT_GE(watched.size(), 2u);
  EXPECT_EQ(watched.front().kind(), v1::JOB_EVENT_KIND_SNAPSHOT);
  EXPECT_EQ(watched.front().job().state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(watched.back().kind(), v1::JOB_EVENT_KIND_STATE);
  EXPECT_EQ(watched.back().job().state(), v1::JOB_STATE_CANCELLED);

  // Oldest first, without spec or placement.
  grpc::ClientContext context;
  v1::ListJobsResponse list;
  ASSERT_TRUE(jobs_->ListJobs(&context, {}, &list).ok());
  ASSERT_EQ(list.jobs_size(), 3);
  const v1::JobState want[] = {v1::JOB_STATE_QUEUED, v1::JOB_STATE_CANCELLED,
                               v1::JOB_STATE_CANCELLED};
  for (int i = 0; i < 3; ++i) {
    EXPECT_EQ(list.jobs(i).job_id(), ids[i]);
    EXPECT_EQ(list.jobs(i).name(), absl::StrCat("queued-", i));
    EXPECT_EQ(list.jobs(i).state(), want[i]);
    EXPECT_FALSE(list.jobs(i).has_spec());
    EXPECT_EQ(list.jobs(i).progress().total_steps(), 3);
  }
}

// ---------------------------------------------------------------------------
// Numerics

// A member whose kernel would give other bits is refused before it is
// registered (so before it computes anything), with both kernels named; so is
// a member that sends no profile. A matching one is accepted.
TEST_F(CoordinatorTest, MembersWithOtherNumericsAreRefusedByName) {
  StartCoordinator(0.1, 0.5);
  v1::NumericsProfile other = LocalNumerics();
  other.set_blas_core("Sandybridge");
  other.set_fingerprint("0123456789abcdef");
  ASSERT_NE(other.fingerprint(), LocalNumerics().fingerprint());
  {
    grpc::ClientContext context;
    v1::RegisterShardRequest request;
    request.set_address("127.0.0.1:1");
    *request.mutable_numerics() = other;
    v1::RegisterShardResponse response;
    grpc::Status status = cluster_->RegisterShard(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(status.error_message(), HasSubstr("Sandybridge"));
    EXPECT_THAT(status.error_message(), HasSubstr(LocalNumerics().blas_core()));
    EXPECT_THAT(status.error_message(), HasSubstr("0123456789abcdef"));
    EXPECT_THAT(status.error_message(), HasSubstr(LocalNumerics().fingerprint()));
  }
  {
    grpc::ClientContext context;
    v1::RegisterWorkerRequest request;
    request.set_address("127.0.0.1:2");
    v1::RegisterWorkerResponse response;
    grpc::Status status = cluster_->RegisterWorker(&context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(status.error_message(), HasSubstr("no profile"));
  }
  EXPECT_EQ(Cluster().shards_size(), 0);
  EXPECT_EQ(Cluster().workers_size(), 0);
  {
    grpc::ClientContext context;
    v1::RegisterWorkerRequest request;
    request.set_address("127.0.0.1:2");
    *request.mutable_numerics() = LocalNumerics();
    v1::RegisterWorkerResponse response;
    EXPECT_TRUE(cluster_->RegisterWorker(&context, request, &response).ok());
  }
  EXPECT_EQ(Cluster().workers_size(), 1);
}

// Leases

TEST_F(CoordinatorTest, MembersThatStopHeartbeatingLoseTheirLease) {
  StartCoordinator(0.1, 0.5);
  std::string shard_id, worker_id;
  {
    grpc::ClientContext context;
    v1::RegisterShardRequest request;
    request.set_address("127.0.0.1:1");  // never dialled: no job is submitted
    *request.mutable_numerics() = LocalNumerics();
    v1::RegisterShardResponse response;
    ASSERT_TRUE(cluster_->RegisterShard(&context, request, &response).ok());
    EXPECT_DOUBLE_EQ(response.heartbeat_seconds(), 0.1);
    EXPECT_DOUBLE_EQ(response.lease_seconds(), 0.5);
    shard_id = response.member_id();
  }
  {
    grpc::ClientContext context;
    v1::RegisterWorkerRequest request;
    request.set_address("127.0.0.1:2");
    request.set_threads(3);
    *request.mutable_numerics() = LocalNumerics();
    v1::RegisterWorkerResponse response;
    ASSERT_TRUE(cluster_->RegisterWorker(&context, request, &response).ok());
    worker_id = response.member_id();
  }
  auto heartbeat = [&](const std::string& id) {
    grpc::ClientContext context;
    v1::HeartbeatRequest request;
    request.set_member_id(id);
    v1::HeartbeatResponse response;
    return cluster_->Heartbeat(&context, request, &response);
  };
  v1::GetClusterResponse cluster = Cluster();
  ASSERT_EQ(cluster.shards_size(), 1);
  ASSERT_EQ(cluster.workers_size(), 1);
  EXPECT_EQ(cluster.shards(0).member_id(), shard_id);
  EXPECT_EQ(cluster.shards(0).address(), "127.0.0.1:1");
  EXPECT_EQ(cluster.workers(0).member_id(), worker_id);

  // The shard keeps beating for 1.2 s (over two leases); the worker does not.
  const auto until = std::chrono::steady_clock::now() + std::chrono::milliseconds(1200);
  while (std::chrono::steady_clock::now() < until) {
    ASSERT_TRUE(heartbeat(shard_id).ok());
    std::this_thread::sleep_for(std::chrono::milliseconds(100));
  }
  cluster = Cluster();
  ASSERT_EQ(cluster.shards_size(), 1);
  EXPECT_EQ(cluster.shards(0).member_id(), shard_id);
  EXPECT_LT(cluster.shards(0).last_seen_seconds_ago(), 0.5);
  EXPECT_EQ(cluster.workers_size(), 0);
  grpc::Status lapsed = heartbeat(worker_id);
  EXPECT_EQ(lapsed.error_code(), grpc::StatusCode::NOT_FOUND) << Describe(lapsed);
  EXPECT_THAT(lapsed.error_message(), HasSubstr("register again"));

  // Now the shard stops too.
  ASSERT_TRUE(WaitFor([&] { return Cluster().shards_size() == 0; }, 5.0));
  EXPECT_EQ(heartbeat(shard_id).error_code(), grpc::StatusCode::NOT_FOUND);
}

// ---------------------------------------------------------------------------
// Health and reflection

TEST_F(CoordinatorTest, HealthAndReflection) {
  using grpc::health::v1::HealthCheckResponse;
  StartCoordinator(0.1, 0.5, 1, /*serving=*/false);
  for (const char* service : {"", "muonps.v1.JobService", "muonps.v1.ClusterService"}) {
    EXPECT_EQ(Health(server_->address(), service), HealthCheckResponse::NOT_SERVING) << service;
  }
  server_->SetServing(true);
  for (const char* service : {"", "muonps.v1.JobService", "muonps.v1.ClusterService"}) {
    EXPECT_EQ(Health(server_->address(), service), HealthCheckResponse::SERVING) << service;
  }
  std::vector<std::string> services = ReflectedServices(server_->address());
  EXPECT_THAT(services, ::testing::IsSupersetOf({"muonps.v1.JobService", "muonps.v1.ClusterService",
                                                 "grpc.health.v1.Health"}));
  EXPECT_THAT(services, ::testing::Not(::testing::Contains("muonps.v1.ShardService")));

  ShardServiceImpl shard;
  absl::StatusOr<std::unique_ptr<GrpcServer>> shard_server = GrpcServer::Start({}, {&shard});
  ASSERT_TRUE(shard_server.ok()) << shard_server.status();
  EXPECT_EQ(Health((*shard_server)->address(), "muonps.v1.ShardService"),
            HealthCheckResponse::NOT_SERVING);
  (*shard_server)->SetServing(true);
  EXPECT_EQ(Health((*shard_server)->address(), "muonps.v1.ShardService"),
            HealthCheckResponse::SERVING);
  EXPECT_THAT(ReflectedServices((*shard_server)->address()),
              ::testing::Contains("muonps.v1.ShardService"));
  shard.Shutdown();
  (*shard_server)->Shutdown();
}

// ---------------------------------------------------------------------------
// A whole cluster in this process

// The lease is longer than in the tests above: two workers and the trainer
// share the machine's cores, and a missed lease here would fail the job.
constexpr double kClusterHeartbeat = 0.1;
constexpr double kClusterLease = 3.0;

TEST_F(CoordinatorTest, TrainsATinyJobToTheTrainersBits) {
  StartCoordinator(kClusterHeartbeat, kClusterLease, /*min_shards=*/2);
  // Workers first, then the job (so the watch sees it from QUEUED), then the
  // shards that let it start.
  StartWorkers(2);
  AwaitCluster(0, 2);
  const v1::JobSpec spec = TinyJob(3, Path("cluster"));
  std::string id;
  ASSERT_TRUE(Submit(spec, &id).ok());
  std::vector<v1::WatchJobResponse> events;
  grpc::Status watch_status;
  std::thread watcher([&] { watch_status = Watch(id, &events); });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  StartShards(2);
  watcher.join();
  ASSERT_TRUE(watch_status.ok()) << Describe(watch_status);

  // SNAPSHOT (queued), STATE running, PLACEMENT, STEP 1..3, ..., STATE succeeded.
  ASSERT_GE(events.size(), 6u);
  EXPECT_EQ(events.front().kind(), v1::JOB_EVENT_KIND_SNAPSHOT);
  EXPECT_EQ(events.front().job().state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(events.back().kind(), v1::JOB_EVENT_KIND_STATE);
  EXPECT_EQ(events.back().job().state(), v1::JOB_STATE_SUCCEEDED) << events.back().job().error();
  std::vector<int64_t> steps;
  int placements = 0, running = 0, checkpoints = 0;
  for (const v1::WatchJobResponse& e : events) {
    if (e.kind() == v1::JOB_EVENT_KIND_STATE && e.job().state() == v1::JOB_STATE_RUNNING) ++running;
    if (e.kind() == v1::JOB_EVENT_KIND_CHECKPOINT) ++checkpoints;
    if (e.kind() == v1::JOB_EVENT_KIND_PLACEMENT) {
      ++placements;
      EXPECT_EQ(running, 1);  // after the job started
      ASSERT_EQ(e.job().placement_size(), 2);
      int tensors = 0;
      for (const v1::ShardPlacement& p : e.job().placement()) tensors += p.tensors_size();
      EXPECT_EQ(tensors, static_cast<int>(ModelLayout(spec.model()).tensors().size()));
    }
    if (e.kind() == v1::JOB_EVENT_KIND_STEP) {
      EXPECT_EQ(placements, 1);  // after the placement
      steps.push_back(e.job().progress().step());
      EXPECT_EQ(e.job().progress().total_steps(), 3);
      EXPECT_EQ(e.job().progress().workers(), 2);
      EXPECT_GT(e.job().progress().loss(), 0.0);
    }
  }
  EXPECT_EQ(running, 1);
  EXPECT_EQ(placements, 1);
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(checkpoints, 2);  // step 2 and the end

  const v1::Job job = GetJob(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(job.last_checkpoint(), Path("cluster/step-00000003"));
  EXPECT_TRUE(job.progress().has_val_loss());
  EXPECT_EQ(job.progress().val_step(), 3);
  for (const auto& shard : shards_) EXPECT_EQ(shard->service.job_id(), "");

  // The same job in one process.
  v1::JobSpec single = spec;
  single.mutable_checkpoint()->set_dir(Path("trainer"));
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(single, {});
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  absl::StatusOr<TrainSummary> summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->last_checkpoint, Path("trainer/step-00000003"));
  EXPECT_EQ(job.progress().loss(), summary->final_loss);
  ASSERT_TRUE(summary->final_val_loss.has_value());
  EXPECT_EQ(job.progress().val_loss(), *summary->final_val_loss);

  const ModelLayout layout(spec.model());
  auto read = [&](const std::string& dir) {
    TrainingState state;
    const size_t n = static_cast<size_t>(layout.total_floats());
    state.params.assign(n, 0.0f);
    state.momentum.assign(n, 0.0f);
    state.exp_avg.assign(n, 0.0f);
    state.exp_avg_sq.assign(n, 0.0f);
    absl::Status st = ReadCheckpoint(dir, layout, spec.model(), spec.optimizer().name(), &state);
    EXPECT_TRUE(st.ok()) << dir << ": " << st;
    return state;
  };
  const TrainingState distributed = read(job.last_checkpoint());
  const TrainingState reference = read(summary->last_checkpoint);
  EXPECT_EQ(distributed.trainer.step(), 3);
  EXPECT_EQ(reference.trainer.step(), 3);
  EXPECT_EQ(distributed.trainer.tokens_seen(), reference.trainer.tokens_seen());
  // Bit equality of one tensor's slice of two flat buffers.
  auto same = [](const std::vector<float>& a, const std::vector<float>& b, const TensorInfo& t) {
    return std::memcmp(a.data() + t.offset, b.data() + t.offset, t.numel * sizeof(float)) == 0;
  };
  for (const TensorInfo& t : layout.tensors()) {
    EXPECT_TRUE(same(distributed.params, reference.params, t)) << t.name;
    EXPECT_TRUE(same(distributed.momentum, reference.momentum, t)) << t.name;
    EXPECT_TRUE(same(distributed.exp_avg, reference.exp_avg, t)) << t.name;
    EXPECT_TRUE(same(distributed.exp_avg_sq, reference.exp_avg_sq, t)) << t.name;
  }
}

TEST_F(CoordinatorTest, UnreadableDataFailsTheJobNamingThePath) {
  StartCoordinator(kClusterHeartbeat, kClusterLease, /*min_shards=*/2);
  StartWorkers(2);
  StartShards(2);
  AwaitCluster(2, 2);
  v1::JobSpec spec = TinyJob(3, "");
  spec.mutable_data()->set_path(Path("no-such-corpus.txt"));
  std::string id;
  ASSERT_TRUE(Submit(spec, &id).ok());
  std::vector<v1::WatchJobResponse> events;
  ASSERT_TRUE(Watch(id, &events).ok());
  ASSERT_FALSE(events.empty());
  const v1::Job& job = events.back().job();
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(job.error(), HasSubstr(Path("no-such-corpus.txt")));
  EXPECT_THAT(job.error(), HasSubstr("worker-"));
  EXPECT_EQ(job.progress().step(), 0);
  for (const auto& shard : shards_) EXPECT_EQ(shard->service.job_id(), "");
  grpc::Status late = Cancel(id);
  EXPECT_EQ(late.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(late);
}

TEST_F(CoordinatorTest, CancellingARunningJobDropsItFromTheShards) {
  StartCoordinator(kClusterHeartbeat, kClusterLease, /*min_shards=*/2);
  StartWorkers(2);
  StartShards(2);
  AwaitCluster(2, 2);
  // No validation: the job is only ever between optimizer steps or in one.
  v1::JobSpec spec = TinyJob(100000, Path("cancelled"));
  spec.mutable_data()->set_eval_every(0);
  std::string id;
  ASSERT_TRUE(Submit(spec, &id).ok());
  std::atomic<bool> cancel_sent{false};
  std::vector<v1::WatchJobResponse> events;
  grpc::Status cancel_status;
  v1::Job at_cancel;
  const grpc::Status watch_status = Watch(id, &events, [&](const v1::WatchJobResponse& e) {
    if (e.kind() == v1::JOB_EVENT_KIND_STEP && e.job().progress().step() == 2 && !cancel_sent) {
      cancel_sent = true;
      for (const auto& shard : shards_) EXPECT_EQ(shard->service.job_id(), id);
      cancel_status = Cancel(id, &at_cancel);
    }
  });
  ASSERT_TRUE(watch_status.ok()) << Describe(watch_status);
  ASSERT_TRUE(cancel_sent);
  EXPECT_TRUE(cancel_status.ok()) << Describe(cancel_status);
  EXPECT_THAT(at_cancel.state(), ::testing::AnyOf(v1::JOB_STATE_RUNNING, v1::JOB_STATE_CANCELLED));
  const v1::Job& job = events.back().job();
  EXPECT_EQ(job.state(), v1::JOB_STATE_CANCELLED) << job.error();
  EXPECT_GE(job.progress().step(), 2);
  EXPECT_LT(job.progress().step(), 100000);
  for (const auto& shard : shards_) EXPECT_EQ(shard->service.job_id(), "");
  // The last completed step was checkpointed.
  EXPECT_EQ(job.last_checkpoint(),
            Path(absl::StrCat("cancelled/", CheckpointName(job.progress().step()))));
  EXPECT_TRUE(std::filesystem::exists(job.last_checkpoint() + "/trainer_state.json"));
  // The shards take the next job.
  std::string next;
  ASSERT_TRUE(Submit(TinyJob(1, ""), &next).ok());
  std::vector<v1::WatchJobResponse> next_events;
  ASSERT_TRUE(Watch(next, &next_events).ok());
  EXPECT_EQ(next_events.back().job().state(), v1::JOB_STATE_SUCCEEDED)
      << next_events.back().job().error();
}

}  // namespace
}  // namespace muonps
