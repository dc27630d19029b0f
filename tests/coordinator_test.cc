// The coordinator behind a real GrpcServer on loopback, driven through the
// generated JobService and ClusterService stubs: refusals carry the statuses
// coordinator.proto promises, queued jobs wait for shards and cancel at once,
// leases lapse, health and reflection answer as generic gRPC tools expect,
// and a whole in-process cluster (coordinator, two ShardServiceImpl servers
// registered through Membership, two Workers) trains a tiny job to the same
// bits as the single-process Trainer.
#include <set>

#include "services/coordinator/cluster_plan.h"
#include "services/coordinator/placement.h"
#include "tests/coordinator_fixture.h"

namespace muonps {
namespace {

// ---------------------------------------------------------------------------
// Placement

// With copies > 1 every tensor's holders are its owner and the next shards
// in a ring, all distinct; a shard's replicas are exactly the tensors owned
// by its predecessors; copies are capped by the shard count; the owned
// tensors (and so the checkpoint layout) do not depend on the copies.
TEST(PlacementTest, ReplicasFollowTheirOwnerAroundTheRing) {
  const v1::JobSpec job = DefaultJobSpec();
  const ModelLayout layout(job.model());
  for (int n : {1, 2, 3, 4}) {
    const Placement single = PlaceTensors(layout, job.optimizer(), n);
    for (int copies : {1, 2, 3}) {
      SCOPED_TRACE(absl::StrCat(n, " shards, ", copies, " copies"));
      const Placement p = PlaceTensors(layout, job.optimizer(), n, copies);
      EXPECT_EQ(p.owner, single.owner);
      const int expect = std::min(n, copies);
      std::vector<std::set<std::string>> replicas(static_cast<size_t>(n));
      for (int s = 0; s < n; ++s) {
        replicas[s] = {p.shards[s].replicas().begin(), p.shards[s].replicas().end()};
        EXPECT_EQ(static_cast<int>(replicas[s].size()), p.shards[s].replicas_size());
      }
      for (const TensorInfo& t : layout.tensors()) {
        const std::vector<int>& holders = p.holders.at(t.name);
        ASSERT_EQ(static_cast<int>(holders.size()), expect) << t.name;
        EXPECT_EQ(holders[0], p.owner.at(t.name));
        EXPECT_EQ(std::set<int>(holders.begin(), holders.end()).size(), holders.size());
        for (int k = 0; k < n; ++k) {
          const bool replica = k >= 1 && k < expect;
          EXPECT_EQ(replicas[(holders[0] + k) % n].count(t.name), replica ? 1u : 0u) << t.name;
        }
      }
    }
  }
}

// `muonps plan`: the byte and memory figures against a count of the layout
// done here tensor by tensor, the compute against a FLOP count written out
// by hand for a tiny model, and the phases' times against their rates.
TEST(PlanTest, FiguresMatchAnIndependentCountOfTheModel) {
  absl::StatusOr<v1::JobSpec> job = ParseJobSpecJson(R"({
    "model": {"vocab_size": 32, "hidden_size": 16, "num_hidden_layers": 2,
              "num_attention_heads": 2, "max_position_embeddings": 8, "first_k_dense_replace": 1,
              "intermediate_size": 24, "n_routed_experts": 4, "num_experts_per_tok": 2,
              "n_shared_experts": 1, "moe_intermediate_size": 8},
    "batch": {"slots": 4, "micro_batch": 2},
    "checkpoint": {"dir": "c"}, "recovery": {"replicas": 2}})");
  ASSERT_TRUE(job.ok()) << job.status();
  PlanOptions options;
  options.workers = 3;
  options.shards = 2;
  options.link_gbps = 8.0;  // 1e9 bytes/s
  options.worker_gflops = 2.0;
  options.shard_gflops = 4.0;
  absl::StatusOr<ClusterPlan> plan = PlanCluster(*job, options);
  ASSERT_TRUE(plan.ok()) << plan.status();

  // Products per token: attention 4 x 16 x 16 per layer; the dense MLP 3 x
  // 24 x 16; the MoE layer's router 4 x 16, shared expert 3 x 8 x 16 and 2
  // of 4 routed experts of 3 x 8 x 16 each; the head 32 x 16.
  const double activated =
      2 * 4 * 16 * 16 + 3 * 24 * 16 + 4 * 16 + 3 * 8 * 16 + 2 * 3 * 8 * 16 + 32 * 16;
  EXPECT_EQ(plan->activated, static_cast<int64_t>(activated));
  // Forward 2 FLOP per weight plus 2 x 2 x T x C per layer; backward twice.
  EXPECT_DOUBLE_EQ(plan->flops_per_token, 3.0 * (2.0 * activated + 2 * 4.0 * 8 * 16));
  EXPECT_EQ(plan->tokens_per_step, 4 * 2 * 8);
  EXPECT_EQ(plan->tokens_per_worker, 2 * 2 * 8);  // 4 slots on 3 workers: 2 on the busiest
  EXPECT_DOUBLE_EQ(plan->compute_seconds, 32 * plan->flops_per_token / 2e9);

  const ModelLayout layout(job->model());
  int64_t params = 0, memory = 0;
  for (const TensorInfo& t : layout.tensors()) {
    params += t.numel;
    // Values, optimizer state (Muon momentum, or AdamW's two moments) and
    // the summed gradient, on both copies.
    const int state = !t.trainable() ? 0 : UsesMuon(t, "muon") ? 1 : 2;
    memory += 2 * 4 * t.numel * (1 + state + (t.trainable() ? 1 : 0));
  }
  EXPECT_EQ(plan->parameters, params);
  EXPECT_EQ(plan->pull_bytes, 4 * params);
  EXPECT_EQ(plan->push_bytes, 2 * 4 * plan->trainable);  // to both copies
  int64_t memory_sum = 0, pulled = 0;
  ASSERT_EQ(plan->shards.size(), 2u);
  for (const ShardPlan& s : plan->shards) {
    memory_sum += s.memory_bytes;
    pulled += s.pull_out_bytes;
    EXPECT_DOUBLE_EQ(s.apply_seconds, s.ns_gflop / 4.0);
  }
  EXPECT_EQ(memory_sum, memory);
  EXPECT_EQ(pulled, 3 * 4 * params);  // every worker pulls every tensor once
  EXPECT_GE(plan->pull_seconds, 4.0 * params / 1e9);
  EXPECT_DOUBLE_EQ(plan->serial_seconds, plan->pull_seconds + plan->compute_seconds +
                                             plan->push_seconds + plan->apply_seconds);
  EXPECT_LE(plan->overlap_seconds, plan->serial_seconds);
  EXPECT_EQ(plan->bottleneck, "compute");
  // A slow enough link makes the wire the bottleneck.
  options.link_gbps = 1e-6;
  plan = PlanCluster(*job, options);
  ASSERT_TRUE(plan.ok()) << plan.status();
  EXPECT_TRUE(plan->bottleneck == "pull" || plan->bottleneck == "push") << plan->bottleneck;

  options.workers = 0;
  EXPECT_THAT(PlanCluster(*job, options).status().message(), testing::HasSubstr("workers"));
  options.workers = 1;
  options.worker_gflops = -1.0;
  EXPECT_THAT(PlanCluster(*job, options).status().message(), testing::HasSubstr("worker_gflops"));
}

// The presets validate; "small" has 50-100 M parameters and 16-32 experts.
TEST(PlanTest, PresetsValidate) {
  for (const char* name : {"default", "small"}) {
    absl::StatusOr<v1::JobSpec> job = PresetJobSpec(name);
    ASSERT_TRUE(job.ok()) << job.status();
    EXPECT_TRUE(ValidateJobSpec(*job).ok()) << name;
  }
  const v1::JobSpec small = *PresetJobSpec("small");
  const int64_t params = ModelLayout(small.model()).total_floats();
  EXPECT_GE(params, 50'000'000);
  EXPECT_LE(params, 100'000'000);
  EXPECT_GE(small.model().n_routed_experts(), 16);
  EXPECT_LE(small.model().n_routed_experts(), 32);
  EXPECT_THAT(PresetJobSpec("huge").status().message(), testing::HasSubstr("default, small"));
}

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
  // Workers on two kinds of device: the second is refused, naming both.
  {
    grpc::ClientContext first_context, second_context;
    v1::RegisterWorkerRequest request;
    *request.mutable_numerics() = LocalNumerics();
    request.set_address("127.0.0.1:9001");
    v1::RegisterWorkerResponse response;
    ASSERT_TRUE(cluster_->RegisterWorker(&first_context, request, &response).ok());
    const std::string cpu_worker = response.member_id();
    request.set_address("127.0.0.1:9002");
    request.mutable_numerics()->set_device("cuda NVIDIA H100 80GB HBM3 (sm_90) x1");
    grpc::Status status = cluster_->RegisterWorker(&second_context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr("cuda NVIDIA H100"));
    EXPECT_THAT(status.error_message(), HasSubstr("the CPU"));
    EXPECT_THAT(status.error_message(), HasSubstr(cpu_worker));
    // Over-long device names are refused before anything else.
    grpc::ClientContext third_context;
    request.mutable_numerics()->set_device(std::string(300, 'x'));
    status = cluster_->RegisterWorker(&third_context, request, &response);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << Describe(status);
    // A shard on the CPU is not a worker: it registers.
    grpc::ClientContext shard_context;
    v1::RegisterShardRequest shard;
    shard.set_address("127.0.0.1:9003");
    *shard.mutable_numerics() = LocalNumerics();
    v1::RegisterShardResponse shard_response;
    EXPECT_TRUE(cluster_->RegisterShard(&shard_context, shard, &shard_response).ok());
  }
  // A known job with no step in progress (it is queued: no shard), and a
  // registered worker.
  std::string id;
  ASSERT_TRUE(Submit(TinyJob(3, ""), &id).ok());
  std::string worker_id, secret;
  {
    grpc::ClientContext context;
    v1::RegisterWorkerRequest request;
    *request.mutable_numerics() = LocalNumerics();
    v1::RegisterWorkerResponse response;
    ASSERT_TRUE(cluster_->RegisterWorker(&context, request, &response).ok());
    worker_id = response.member_id();
    secret = response.member_secret();
  }
  {
    grpc::ClientContext context;
    context.AddMetadata(kMemberSecretHeader, secret);
    v1::ReportSlotsRequest request;
    request.set_worker_id(worker_id);
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
    context.AddMetadata(kMemberSecretHeader, secret);
    v1::ReportSlotsRequest request;
    request.set_worker_id(worker_id);
    request.set_job_id("job-424242");
    v1::ReportSlotsResponse response;
    EXPECT_EQ(cluster_->ReportSlots(&context, request, &response).error_code(),
              grpc::StatusCode::NOT_FOUND);
  }
  {
    grpc::ClientContext context;
    context.AddMetadata(kMemberSecretHeader, secret);
    v1::ReportEvalRequest request;
    request.set_worker_id(worker_id);
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
  std::map<std::string, std::string> secrets;
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
    secrets[shard_id] = response.member_secret();
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
    secrets[worker_id] = response.member_secret();
  }
  auto heartbeat = [&](const std::string& id) {
    grpc::ClientContext context;
    context.AddMetadata(kMemberSecretHeader, secrets[id]);
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

}  // namespace
}  // namespace muonps
