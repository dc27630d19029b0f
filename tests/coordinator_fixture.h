// The coordinator behind a real GrpcServer on loopback, driven through the
// generated JobService and ClusterService stubs: refusals carry the statuses
// coordinator.proto promises, queued jobs wait for shards and cancel at once,
// leases lapse, health and reflection answer as generic gRPC tools expect,
// and a whole in-process cluster (coordinator, two ShardServiceImpl servers
// registered through Membership, two Workers) trains a tiny job to the same
// bits as the single-process Trainer.
// (The shared fixture and helpers; the tests are in the files that include it.)
#ifndef MUONPS_TESTS_COORDINATOR_FIXTURE_H_
#define MUONPS_TESTS_COORDINATOR_FIXTURE_H_

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
#include <map>
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
#include "rpc/auth.h"
#include "rpc/grpc_server.h"
#include "rpc/membership.h"
#include "rpc/rpc_util.h"
#include "services/coordinator/coordinator.h"
#include "services/shard/shard_service.h"
#include "tests/test_util.h"
#include "trainer/trainer.h"
#include "workers/worker/worker.h"

namespace muonps {

using ::testing::HasSubstr;

inline std::string Describe(const grpc::Status& status) {
  return absl::StrCat("code ", status.error_code(), ": ", status.error_message());
}

// Polls `done` every 20 ms for up to `seconds`.
inline bool WaitFor(const std::function<bool()>& done, double seconds) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(seconds * 1000));
  while (!done()) {
    if (std::chrono::steady_clock::now() > deadline) return false;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  return true;
}

inline grpc::health::v1::HealthCheckResponse::ServingStatus Health(const std::string& address,
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
inline std::vector<std::string> ReflectedServices(const std::string& address) {
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
                        bool serving = true,
                        const std::function<void(CoordinatorOptions*)>& configure = nullptr) {
    CoordinatorOptions options;
    options.checkpoint_root = Root();
    options.heartbeat_seconds = heartbeat_seconds;
    options.lease_seconds = lease_seconds;
    options.min_shards = min_shards;
    options.shard_rpc_seconds = 60.0;
    if (configure) configure(&options);
    coordinator_ = std::make_unique<Coordinator>(options);
    GrpcServerOptions server_options;
    server_options.address = coordinator_address_;
    absl::StatusOr<std::unique_ptr<GrpcServer>> server = GrpcServer::Start(
        server_options, {coordinator_->job_service(), coordinator_->cluster_service()});
    ASSERT_TRUE(server.ok()) << server.status();
    server_ = std::move(*server);
    if (serving) server_->SetServing(true);
    jobs_ = v1::JobService::NewStub(MakeChannel(server_->address()));
    cluster_ = v1::ClusterService::NewStub(MakeChannel(server_->address()));
  }

  void StartShards(int n) {
    for (int i = 0; i < n; ++i) {
      auto shard = std::make_unique<ShardProcess>();
      // As `muonps shard` runs it: only the coordinator's calls and the
      // job's workers, checkpoints only under the test's directory.
      shard->service.RequireMemberSecret();
      shard->service.ConfineCheckpoints({Root()});
      absl::StatusOr<std::unique_ptr<GrpcServer>> server = GrpcServer::Start({}, {&shard->service});
      ASSERT_TRUE(server.ok()) << server.status();
      shard->server = std::move(*server);
      shard->server->SetServing(true);
      shard->membership = std::make_unique<Membership>(Membership::Kind::kShard, server_->address(),
                                                       shard->server->address(), 0);
      ShardServiceImpl* service = &shard->service;
      shard->membership->set_on_registered(
          [service](const std::string&, const std::string& secret) {
            service->SetMemberSecret(secret);
          });
      ASSERT_TRUE(shard->membership->Start(10.0).ok());
      shards_.push_back(std::move(shard));
    }
  }

  // `factory`: each lane's compute backend (null: the CPU).
  void StartWorkers(
      int n, std::function<absl::StatusOr<std::unique_ptr<ComputeBackend>>(int)> factory = nullptr,
      int threads = 1) {
    for (int i = 0; i < n; ++i) {
      WorkerOptions options;
      options.coordinator = server_->address();
      options.threads = threads;
      options.backend_factory = factory;
      options.task_wait_seconds = 0.2;
      options.register_timeout_seconds = 10.0;
      options.data_roots = {Root()};
      workers_.push_back(std::make_unique<Worker>(options));
      Worker* worker = workers_.back().get();
      worker_threads_.emplace_back(
          [this, worker] { EXPECT_TRUE(worker->Run(stop_workers_).ok()); });
    }
  }

  // The test's directory: checkpoints and corpora lie under it.
  std::string Root() const { return Path("").substr(0, Path("").size() - 1); }

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

  // Every tensor and optimizer buffer of the checkpoint in `dir` (either
  // layout) of a job like `spec`.
  static TrainingState ReadWholeCheckpoint(const std::string& dir, const v1::JobSpec& spec) {
    const ModelLayout layout(spec.model());
    TrainingState state;
    for (auto* v : {&state.params, &state.momentum, &state.exp_avg, &state.exp_avg_sq}) {
      v->assign(static_cast<size_t>(layout.total_floats()), 0.0f);
    }
    absl::Status st = ReadCheckpoint(dir, layout, spec.model(), spec.optimizer().name(), &state);
    EXPECT_TRUE(st.ok()) << dir << ": " << st;
    return state;
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

  // Where StartCoordinator listens (a restarted coordinator on the address
  // its members know).
  std::string coordinator_address_ = "127.0.0.1:0";
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<GrpcServer> server_;
  std::unique_ptr<v1::JobService::Stub> jobs_;
  std::unique_ptr<v1::ClusterService::Stub> cluster_;
  std::vector<std::unique_ptr<ShardProcess>> shards_;
  std::vector<std::unique_ptr<Worker>> workers_;
  std::vector<std::thread> worker_threads_;
  std::atomic<bool> stop_workers_{false};
};

}  // namespace muonps

#endif  // MUONPS_TESTS_COORDINATOR_FIXTURE_H_
