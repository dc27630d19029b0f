// Who may call, against real servers on loopback: user tokens and job
// ownership on the JobService, the cluster secret and member secrets on the
// ClusterService, reports only from the worker that holds the task, a
// deadline on tasks, the job key on a shard's pushes and pulls, admission by
// size, bounded queues and watchers, checkpoint paths confined to the root,
// and ids that stay unique across a coordinator restart.
#include <limits>
#include <set>

#include "common/memory_limit.h"
#include "step/step.h"
#include "tests/coordinator_fixture.h"

namespace muonps {
namespace {

constexpr char kAliceToken[] = "alice-token-0123456789";
constexpr char kBobToken[] = "bob-token-0123456789ab";
constexpr char kAdminToken[] = "admin-token-0123456789";
constexpr char kClusterSecret[] = "cluster-secret-0123456789";

class SecurityTest : public CoordinatorTest {
 protected:
  static std::shared_ptr<const UserTokens> Users() {
    absl::StatusOr<UserTokens> users =
        UserTokens::Parse(absl::StrCat("# tokens\n", kAliceToken, " alice\n", kBobToken, " bob\n",
                                       kAdminToken, " root admin\n"),
                          "test");
    EXPECT_TRUE(users.ok()) << users.status();
    return std::make_shared<const UserTokens>(*users);
  }

  grpc::Status SubmitAs(const std::string& token, const v1::JobSpec& spec, std::string* id,
                        const std::string& resume = "") {
    grpc::ClientContext context;
    AttachToken(&context, token);
    v1::SubmitJobRequest request;
    *request.mutable_spec() = spec;
    request.set_resume_from(resume);
    v1::SubmitJobResponse response;
    grpc::Status status = jobs_->SubmitJob(&context, request, &response);
    if (id != nullptr) *id = response.job_id();
    return status;
  }
  grpc::StatusCode GetAs(const std::string& token, const std::string& id) {
    grpc::ClientContext context;
    AttachToken(&context, token);
    v1::GetJobRequest request;
    request.set_job_id(id);
    v1::GetJobResponse response;
    return jobs_->GetJob(&context, request, &response).error_code();
  }
  grpc::StatusCode CancelAs(const std::string& token, const std::string& id) {
    grpc::ClientContext context;
    AttachToken(&context, token);
    v1::CancelJobRequest request;
    request.set_job_id(id);
    v1::CancelJobResponse response;
    return jobs_->CancelJob(&context, request, &response).error_code();
  }
  grpc::StatusCode WatchAs(const std::string& token, const std::string& id) {
    grpc::ClientContext context;
    context.set_deadline(DeadlineIn(5.0));
    AttachToken(&context, token);
    v1::WatchJobRequest request;
    request.set_job_id(id);
    auto reader = jobs_->WatchJob(&context, request);
    v1::WatchJobResponse event;
    while (reader->Read(&event)) context.TryCancel();
    return reader->Finish().error_code();
  }
  std::vector<std::string> ListAs(const std::string& token) {
    grpc::ClientContext context;
    AttachToken(&context, token);
    v1::ListJobsResponse response;
    EXPECT_TRUE(jobs_->ListJobs(&context, {}, &response).ok());
    std::vector<std::string> ids;
    for (const v1::Job& job : response.jobs()) ids.push_back(job.job_id());
    return ids;
  }

  struct Registered {
    std::string id, secret;
  };
  // Registers a worker by hand (as a forged or silent one would).
  Registered RegisterWorker(const std::string& cluster_secret = "") {
    grpc::ClientContext context;
    if (!cluster_secret.empty()) context.AddMetadata(kClusterSecretHeader, cluster_secret);
    v1::RegisterWorkerRequest request;
    *request.mutable_numerics() = LocalNumerics();
    v1::RegisterWorkerResponse response;
    const grpc::Status status = cluster_->RegisterWorker(&context, request, &response);
    EXPECT_TRUE(status.ok()) << Describe(status);
    return {response.member_id(), response.member_secret()};
  }
  // One GetTask call as `worker`.
  v1::GetTaskResponse TakeTask(const Registered& worker, double wait, grpc::Status* status) {
    grpc::ClientContext context;
    context.AddMetadata(kMemberSecretHeader, worker.secret);
    v1::GetTaskRequest request;
    request.set_worker_id(worker.id);
    request.set_wait_seconds(wait);
    v1::GetTaskResponse response;
    *status = cluster_->GetTask(&context, request, &response);
    return response;
  }
  grpc::Status Report(const Registered& as, const std::string& secret, const v1::Task& task,
                      const std::vector<int>& slots, const std::vector<float>& logits = {},
                      const v1::ModelConfig* model = nullptr) {
    grpc::ClientContext context;
    context.AddMetadata(kMemberSecretHeader, secret);
    v1::ReportSlotsRequest request;
    request.set_worker_id(as.id);
    request.set_task_id(task.task_id());
    request.set_job_id(task.job_id());
    request.set_step(task.version());
    for (int s : slots) {
      v1::SlotStats* stats = request.add_slots();
      stats->set_slot(s);
      stats->set_loss_sum(0.001);
      stats->set_tokens(32);
      stats->mutable_attention_logit_max()->Add(logits.begin(), logits.end());
      if (model != nullptr) ExpertLoads(*model).ToProto(stats->mutable_expert_load());
    }
    v1::ReportSlotsResponse response;
    return cluster_->ReportSlots(&context, request, &response);
  }
};

TEST_F(SecurityTest, TokensGateTheJobServiceAndJobsBelongToTheirOwner) {
  StartCoordinator(0.1, 5.0, 1, true, [](CoordinatorOptions* o) { o->users = Users(); });
  // No token, an unknown token.
  std::string id;
  EXPECT_EQ(SubmitAs("", TinyJob(3, ""), &id).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(SubmitAs("not-a-known-token-000", TinyJob(3, ""), &id).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  {
    grpc::ClientContext context;
    v1::ListJobsResponse response;
    EXPECT_EQ(jobs_->ListJobs(&context, {}, &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  // Alice's job: Bob neither sees, watches nor cancels it; the admin may.
  ASSERT_TRUE(SubmitAs(kAliceToken, TinyJob(3, ""), &id).ok());
  std::string bobs;
  ASSERT_TRUE(SubmitAs(kBobToken, TinyJob(3, ""), &bobs).ok());
  EXPECT_EQ(GetAs(kAliceToken, id), grpc::StatusCode::OK);
  EXPECT_EQ(GetAs(kBobToken, id), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(WatchAs(kBobToken, id), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(CancelAs(kBobToken, id), grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_EQ(ListAs(kAliceToken), std::vector<std::string>{id});
  EXPECT_EQ(ListAs(kBobToken), std::vector<std::string>{bobs});
  EXPECT_EQ(ListAs(kAdminToken), (std::vector<std::string>{id, bobs}));
  EXPECT_EQ(GetAs(kAdminToken, id), grpc::StatusCode::OK);
  EXPECT_EQ(CancelAs(kAdminToken, id), grpc::StatusCode::OK);
  EXPECT_EQ(CancelAs(kBobToken, bobs), grpc::StatusCode::OK);
  grpc::Status status;
  (void)GetJob(id, &status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(SecurityTest, MembersNeedTheClusterSecretAndTheirOwnSecret) {
  StartCoordinator(0.1, 5.0, 1, true,
                   [](CoordinatorOptions* o) { o->cluster_secret = kClusterSecret; });
  {
    grpc::ClientContext context;
    v1::RegisterShardRequest request;
    request.set_address("fuzz:1");
    *request.mutable_numerics() = LocalNumerics();
    v1::RegisterShardResponse response;
    EXPECT_EQ(cluster_->RegisterShard(&context, request, &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  {
    grpc::ClientContext context;
    context.AddMetadata(kClusterSecretHeader, "cluster-secret-wrong-0000");
    v1::RegisterWorkerRequest request;
    *request.mutable_numerics() = LocalNumerics();
    v1::RegisterWorkerResponse response;
    EXPECT_EQ(cluster_->RegisterWorker(&context, request, &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  EXPECT_EQ(Cluster().workers_size(), 0);
  const Registered a = RegisterWorker(kClusterSecret);
  const Registered b = RegisterWorker(kClusterSecret);
  // Ids are not guessable from each other, secrets are long and distinct.
  EXPECT_NE(a.id, b.id);
  EXPECT_NE(a.id, "worker-0");
  EXPECT_GE(a.secret.size(), 32u);
  EXPECT_NE(a.secret, b.secret);
  // Heartbeats under A's id: without a secret, with B's, with A's.
  auto beat = [&](const std::string& secret) {
    grpc::ClientContext context;
    if (!secret.empty()) context.AddMetadata(kMemberSecretHeader, secret);
    v1::HeartbeatRequest request;
    request.set_member_id(a.id);
    v1::HeartbeatResponse response;
    return cluster_->Heartbeat(&context, request, &response).error_code();
  };
  EXPECT_EQ(beat(""), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(beat(b.secret), grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(beat(a.secret), grpc::StatusCode::OK);
  // Nor can B take tasks as A.
  grpc::Status status;
  (void)TakeTask({a.id, b.secret}, 0.0, &status);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::UNAUTHENTICATED);
}

TEST_F(SecurityTest, ReportsOnlyFromTheHolderAndSilentWorkersLoseTheirTask) {
  StartCoordinator(0.1, 30.0, 1, true,
                   [](CoordinatorOptions* o) { o->task_timeout_seconds = 0.5; });
  // The holder alone when the step is planned: one task, given to it.
  const Registered holder = RegisterWorker();
  StartShards(1);
  std::string id;
  ASSERT_TRUE(Submit(TinyJob(3, ""), &id).ok());
  grpc::Status status;
  v1::GetTaskResponse taken;
  ASSERT_TRUE(WaitFor(
      [&] {
        taken = TakeTask(holder, 0.5, &status);
        return taken.has_task();
      },
      20.0));
  const v1::Task& task = taken.task();
  ASSERT_EQ(task.kind(), v1::TASK_KIND_TRAIN);
  ASSERT_FALSE(task.job_key().empty());
  const Registered other = RegisterWorker();
  std::vector<int> slots(task.slots().begin(), task.slots().end());
  // A worker that does not hold the task, a forged secret, a slot the task
  // does not have: all refused, nothing counted.
  EXPECT_EQ(Report(other, other.secret, task, slots).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Report(holder, other.secret, task, slots).error_code(),
            grpc::StatusCode::UNAUTHENTICATED);
  EXPECT_EQ(Report(holder, holder.secret, task, {99}).error_code(),
            grpc::StatusCode::INVALID_ARGUMENT);
  // Attention maxima (QK-Clip's input to every shard) of another shape than
  // the model's layers x heads, or not finite.
  const v1::ModelConfig model = GetJob(id).spec().model();
  const size_t heads = static_cast<size_t>(model.num_hidden_layers() * model.num_attention_heads());
  std::vector<float> logits(heads + 1, 1.0f);
  grpc::Status shape = Report(holder, holder.secret, task, slots, logits, &model);
  EXPECT_EQ(shape.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(shape.error_message(), testing::HasSubstr("attention_logit_max"));
  logits.resize(heads);
  logits[0] = std::numeric_limits<float>::infinity();
  grpc::Status infinite = Report(holder, holder.secret, task, slots, logits, &model);
  EXPECT_EQ(infinite.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(infinite.error_message(), testing::HasSubstr("not finite"));
  // The holder stays silent: past the deadline the task goes to another
  // worker, and the first one's late report is refused.
  v1::GetTaskResponse again;
  ASSERT_TRUE(WaitFor(
      [&] {
        again = TakeTask(other, 0.5, &status);
        return again.has_task();
      },
      10.0));
  EXPECT_EQ(again.task().task_id(), task.task_id());
  EXPECT_EQ(Report(holder, holder.secret, task, slots).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(GetJob(id).progress().step(), 0);
  EXPECT_EQ(GetJob(id).state(), v1::JOB_STATE_RUNNING);
}

TEST_F(SecurityTest, ShardsServeTheJobOnlyToItsKeyAndTheCoordinator) {
  StartCoordinator(0.1, 30.0);
  StartShards(1);
  std::string id;
  ASSERT_TRUE(Submit(TinyJob(3, ""), &id).ok());
  const Registered worker = RegisterWorker();
  grpc::Status status;
  v1::GetTaskResponse taken;
  ASSERT_TRUE(WaitFor(
      [&] {
        taken = TakeTask(worker, 0.5, &status);
        return taken.has_task();
      },
      20.0));
  auto stub = v1::ShardService::NewStub(MakeChannel(shards_[0]->server->address()));
  auto pull = [&](const std::string& key) {
    grpc::ClientContext context;
    context.set_deadline(DeadlineIn(10.0));
    if (!key.empty()) context.AddMetadata(kJobKeyHeader, key);
    v1::PullParametersRequest request;
    request.set_job_id(id);
    auto reader = stub->PullParameters(&context, request);
    v1::PullParametersResponse message;
    int messages = 0;
    while (reader->Read(&message)) ++messages;
    const grpc::Status st = reader->Finish();
    return std::make_pair(st.error_code(), messages);
  };
  EXPECT_EQ(pull(""), std::make_pair(grpc::StatusCode::UNAUTHENTICATED, 0));
  EXPECT_EQ(pull("0123456789abcdef0123456789abcdef"),
            std::make_pair(grpc::StatusCode::UNAUTHENTICATED, 0));
  const auto [code, messages] = pull(taken.task().job_key());
  EXPECT_EQ(code, grpc::StatusCode::OK);
  EXPECT_GT(messages, 0);
  // The coordinator's calls need the shard's own secret.
  {
    grpc::ClientContext context;
    context.AddMetadata(kJobKeyHeader, taken.task().job_key());
    v1::DropJobRequest request;
    request.set_job_id(id);
    v1::DropJobResponse response;
    EXPECT_EQ(stub->DropJob(&context, request, &response).error_code(),
              grpc::StatusCode::UNAUTHENTICATED);
  }
  EXPECT_EQ(shards_[0]->service.job_id(), id);
}

TEST_F(SecurityTest, OversizedJobsAreRefusedAtSubmitWithTheEstimate) {
  StartCoordinator(0.1, 5.0, 1, true, [](CoordinatorOptions* o) {
    o->memory_limit_bytes = int64_t{8} << 30;
    o->max_queued_jobs = 3;
  });
  auto refused = [&](const std::function<void(v1::JobSpec*)>& edit, const std::string& what) {
    v1::JobSpec spec = TinyJob(3, "");
    edit(&spec);
    std::string id;
    const grpc::Status status = Submit(spec, &id);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr(what));
  };
  // A 256 GiB embedding (and head); 64 layers of 4096 experts; 65536 x
  // 65536 tokens per slot.
  refused(
      [](v1::JobSpec* s) {
        s->mutable_model()->set_vocab_size(1 << 20);
        s->mutable_model()->set_hidden_size(1 << 16);
        s->mutable_model()->set_num_attention_heads(256);
      },
      "on each shard");
  refused(
      [](v1::JobSpec* s) {
        s->mutable_model()->set_num_hidden_layers(64);
        s->mutable_model()->set_n_routed_experts(4096);
      },
      "tensors, over the limit");
  refused(
      [](v1::JobSpec* s) {
        s->mutable_model()->set_max_position_embeddings(65536);
        s->mutable_batch()->set_micro_batch(65536);
      },
      "on each worker");
  // The queue is bounded; nothing was queued by the refusals.
  for (int i = 0; i < 3; ++i) {
    std::string id;
    ASSERT_TRUE(Submit(TinyJob(3, ""), &id).ok());
  }
  std::string id;
  const grpc::Status full = Submit(TinyJob(3, ""), &id);
  EXPECT_EQ(full.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED);
  EXPECT_THAT(full.error_message(), HasSubstr("queue is full"));
}

TEST_F(SecurityTest, WatchersAreBounded) {
  StartCoordinator(0.1, 5.0, 1, true, [](CoordinatorOptions* o) { o->max_watchers_per_job = 2; });
  std::string id;
  ASSERT_TRUE(Submit(TinyJob(3, ""), &id).ok());
  std::vector<std::unique_ptr<grpc::ClientContext>> contexts;
  std::vector<std::unique_ptr<grpc::ClientReader<v1::WatchJobResponse>>> readers;
  for (int i = 0; i < 2; ++i) {
    contexts.push_back(std::make_unique<grpc::ClientContext>());
    v1::WatchJobRequest request;
    request.set_job_id(id);
    readers.push_back(jobs_->WatchJob(contexts.back().get(), request));
    v1::WatchJobResponse first;
    ASSERT_TRUE(readers.back()->Read(&first));  // the stream is open
  }
  EXPECT_EQ(WatchAs("", id), grpc::StatusCode::RESOURCE_EXHAUSTED);
  for (auto& context : contexts) context->TryCancel();
  for (auto& reader : readers) (void)reader->Finish();
  // Closed watches free their places.
  ASSERT_TRUE(WaitFor([&] { return WatchAs("", id) == grpc::StatusCode::CANCELLED; }, 5.0));
}

TEST_F(SecurityTest, CheckpointPathsStayUnderTheRootAndRefusalsRevealNothing) {
  StartCoordinator(0.1, 5.0);
  std::filesystem::create_directories(Path("inside"));
  std::string id;
  EXPECT_TRUE(Submit(TinyJob(3, Path("inside/run")), &id).ok());
  std::vector<std::string> messages;
  for (const std::string& dir : std::vector<std::string>{
           "/etc", "/nonexistent/created/by/remote/client", Path("inside/../../escape"), "/"}) {
    const grpc::Status status = Submit(TinyJob(3, dir), &id);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::PERMISSION_DENIED) << dir;
    EXPECT_THAT(status.error_message(), HasSubstr("spec.checkpoint.dir"));
    EXPECT_THAT(status.error_message(), HasSubstr(Root()));
    // The same words whether the path exists or not.
    std::string m = status.error_message();
    m.replace(m.find(dir), dir.size(), "PATH");
    messages.push_back(m);
  }
  EXPECT_EQ(std::set<std::string>(messages.begin(), messages.end()).size(), 1u);
  // A symlink inside the root that points outside does not get out.
  std::filesystem::create_symlink("/tmp", Path("link"));
  EXPECT_EQ(Submit(TinyJob(3, Path("link/run")), &id).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  grpc::ClientContext context;
  v1::SubmitJobRequest request;
  *request.mutable_spec() = TinyJob(3, "");
  request.set_resume_from("/etc");
  v1::SubmitJobResponse response;
  EXPECT_EQ(jobs_->SubmitJob(&context, request, &response).error_code(),
            grpc::StatusCode::PERMISSION_DENIED);
  EXPECT_FALSE(std::filesystem::exists("/nonexistent/created"));
}

TEST_F(SecurityTest, JobAndMemberIdsStayUniqueAcrossACoordinatorRestart) {
  std::set<std::string> jobs, members;
  for (int round = 0; round < 2; ++round) {
    StartCoordinator(0.1, 5.0);
    for (int i = 0; i < 2; ++i) {
      std::string id;
      ASSERT_TRUE(Submit(TinyJob(3, ""), &id).ok());
      EXPECT_TRUE(jobs.insert(id).second) << id << " was issued before";
      EXPECT_TRUE(members.insert(RegisterWorker().id).second);
    }
    coordinator_->Shutdown();
    server_->Shutdown();
    coordinator_.reset();
    server_.reset();
  }
  EXPECT_EQ(jobs.size(), 4u);
}

TEST(MemorySizeTest, ParsesSizesAndRefusesGarbage) {
  EXPECT_EQ(*ParseMemorySize("24G"), int64_t{24} << 30);
  EXPECT_EQ(*ParseMemorySize("512Mi"), int64_t{512} << 20);
  EXPECT_EQ(*ParseMemorySize("1.5GiB"), int64_t{3} << 29);
  EXPECT_EQ(*ParseMemorySize("1073741824"), int64_t{1} << 30);
  for (const char* bad : {"", "G", "-1G", "12X", "1e30T"}) {
    EXPECT_FALSE(ParseMemorySize(bad).ok()) << bad;
  }
  EXPECT_GT(DetectedMemoryLimitBytes(), int64_t{1} << 26);
}

TEST(UserTokensTest, FileFormatIsChecked) {
  EXPECT_TRUE(UserTokens::Parse("0123456789abcdef alice\n", "t").ok());
  for (const char* bad : {"", "# only a comment\n", "short alice\n", "0123456789abcdef\n",
                          "0123456789abcdef al/ice\n", "0123456789abcdef alice root\n",
                          "0123456789abcdef a\n0123456789abcdef b\n"}) {
    EXPECT_FALSE(UserTokens::Parse(bad, "t").ok()) << bad;
  }
}

}  // namespace
}  // namespace muonps
