// ShardServiceImpl behind a real GrpcServer on loopback, driven through the
// generated stub the way workers and the coordinator drive it. Every refusal
// carries the status shard.proto promises, names the field or tensor, and
// leaves the shard as it was (a following valid call behaves as if the bad
// one never came). Prefix-summed pushes end bit-identical to per-slot pushes,
// and a saved checkpoint reads back bit for bit. The independent reference
// is a ShardState driven in-process with the same gradients.
#include "tests/shard_service_fixture.h"

namespace muonps {
namespace {

// ---------------------------------------------------------------------------
// LoadJob / DropJob

TEST_F(ShardServiceTest, LoadJobRefusalsLeaveTheShardEmpty) {
  struct Case {
    std::string what;
    v1::LoadJobRequest request;
    grpc::StatusCode code;
    std::string names;
  };
  std::vector<Case> cases;
  cases.push_back({"empty job_id", LoadRequest(""), grpc::StatusCode::INVALID_ARGUMENT, "job_id"});
  {
    v1::LoadJobRequest r = LoadRequest("job-a");
    r.mutable_spec()->mutable_model()->set_num_experts_per_tok(9);  // > n_routed_experts
    cases.push_back(
        {"invalid spec", r, grpc::StatusCode::INVALID_ARGUMENT, "model.num_experts_per_tok"});
  }
  cases.push_back({"unknown tensor", LoadRequest("job-a", {kQ, "model.no_such.weight"}),
                   grpc::StatusCode::NOT_FOUND, "model.no_such.weight"});
  cases.push_back({"tensor twice", LoadRequest("job-a", {kQ, kNorm, kQ}),
                   grpc::StatusCode::INVALID_ARGUMENT, kQ});
  {
    // ResolveCheckpointDir: NOT_FOUND for a directory that does not exist,
    // and for one that holds no checkpoint.
    v1::LoadJobRequest r = LoadRequest("job-a");
    r.set_resume_from(Path("no-such-checkpoint"));
    cases.push_back({"missing checkpoint", r, grpc::StatusCode::NOT_FOUND, "no-such-checkpoint"});
    std::filesystem::create_directories(Path("empty-checkpoint-root"));
    r.set_resume_from(Path("empty-checkpoint-root"));
    cases.push_back(
        {"empty checkpoint root", r, grpc::StatusCode::NOT_FOUND, "empty-checkpoint-root"});
  }
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    grpc::Status status = LoadJob(*shard_, c.request);
    EXPECT_EQ(status.error_code(), c.code) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr(c.names));
    EXPECT_EQ(shard_->service.job_id(), "");
    Pulled pulled = Pull(shard_->stub.get(), *layout_, "job-a", 0);
    EXPECT_EQ(pulled.status.error_code(), grpc::StatusCode::NOT_FOUND);
  }
  v1::LoadJobResponse response;
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a"), &response).ok());
  EXPECT_EQ(response.version(), 0);
  EXPECT_EQ(shard_->service.job_id(), "job-a");
  ExpectValues(*shard_, "job-a", 0, InitialValues());
}

TEST_F(ShardServiceTest, LoadJobHoldsOneJobAtATime) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, 0).ok());

  // The same load again (a coordinator taking the job over) is acknowledged
  // and keeps the tensors and their version; the step in flight starts
  // over, so the slot pushed before counts anew, and once only.
  v1::LoadJobResponse response;
  grpc::Status again = LoadJob(*shard_, LoadRequest("job-a"), &response);
  EXPECT_TRUE(again.ok()) << Describe(again);
  EXPECT_EQ(response.version(), 0);
  v1::PushGradientsResponse push;
  ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, 0, &push).ok());
  EXPECT_TRUE(push.counted());
  ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, 0, &push).ok());
  EXPECT_FALSE(push.counted());

  // Another job, or the same job with other tensors or another spec:
  // refused, naming the held job.
  v1::LoadJobRequest other_spec = LoadRequest("job-a");
  other_spec.mutable_spec()->set_seed(8);
  for (const v1::LoadJobRequest& other :
       {LoadRequest("job-b"), LoadRequest("job-a", {kQ}), other_spec}) {
    grpc::Status status = LoadJob(*shard_, other);
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr("job-a"));
    EXPECT_EQ(shard_->service.job_id(), "job-a");
  }
  ExpectValues(*shard_, "job-a", 0, InitialValues());
  ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, 1, &push).ok());
  EXPECT_TRUE(push.counted());

  // Dropping another id changes nothing; dropping the job frees the shard.
  ASSERT_TRUE(DropJob(*shard_, "job-b").ok());
  EXPECT_EQ(shard_->service.job_id(), "job-a");
  ASSERT_TRUE(DropJob(*shard_, "job-a").ok());
  EXPECT_EQ(shard_->service.job_id(), "");
  ASSERT_TRUE(DropJob(*shard_, "job-a").ok());  // not held: no error
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-b")).ok());
  EXPECT_EQ(shard_->service.job_id(), "job-b");
  EXPECT_EQ(Pull(shard_->stub.get(), *layout_, "job-a", 0).status.error_code(),
            grpc::StatusCode::NOT_FOUND);

  // `replace` (a new coordinator's first load) takes the shard over, fresh.
  ASSERT_TRUE(PushSlot(*shard_, "job-b", 0, 0).ok());
  v1::LoadJobRequest replace = LoadRequest("job-c");
  replace.set_replace(true);
  grpc::Status replaced = LoadJob(*shard_, replace, &response);
  ASSERT_TRUE(replaced.ok()) << Describe(replaced);
  EXPECT_EQ(response.version(), 0);
  EXPECT_EQ(shard_->service.job_id(), "job-c");
  ExpectValues(*shard_, "job-c", 0, InitialValues());
  ASSERT_TRUE(PushSlot(*shard_, "job-c", 0, 0, &push).ok());
  EXPECT_TRUE(push.counted());  // job-b's slot 0 went with it
}

// ---------------------------------------------------------------------------
// PullParameters

TEST_F(ShardServiceTest, PullReturnsTheInitialValuesInLayoutOrder) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  const std::map<std::string, std::vector<float>> initial = InitialValues();

  // Small chunks: many messages per tensor, each at most max_chunk_bytes.
  Pulled all = Pull(shard_->stub.get(), *layout_, "job-a", 0, {}, 0.0, /*max_chunk_bytes=*/64);
  ASSERT_TRUE(all.status.ok()) << Describe(all.status);
  EXPECT_TRUE(all.versions_match);
  EXPECT_LE(all.largest_chunk, 64);
  std::vector<std::string> layout_order;
  for (const TensorInfo& t : layout_->tensors()) {
    if (initial.count(t.name) != 0) layout_order.push_back(t.name);
  }
  EXPECT_EQ(all.order, layout_order);
  for (const auto& [name, values] : initial) {
    EXPECT_TRUE(SameBits(all.tensors[name], values)) << name;
  }

  // A subset, in the order asked.
  Pulled some = Pull(shard_->stub.get(), *layout_, "job-a", 0, {kNorm, kQ});
  ASSERT_TRUE(some.status.ok()) << Describe(some.status);
  EXPECT_EQ(some.order, (std::vector<std::string>{kNorm, kQ}));
  EXPECT_TRUE(SameBits(some.tensors[kQ], initial.at(kQ)));
  EXPECT_TRUE(SameBits(some.tensors[kNorm], initial.at(kNorm)));
}

TEST_F(ShardServiceTest, PullRefusals) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  Pulled unknown_job = Pull(shard_->stub.get(), *layout_, "job-z", 0);
  EXPECT_EQ(unknown_job.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(unknown_job.status.error_message(), HasSubstr("job-z"));

  Pulled unknown_tensor = Pull(shard_->stub.get(), *layout_, "job-a", 0, {kQ, kHead});
  EXPECT_EQ(unknown_tensor.status.error_code(), grpc::StatusCode::NOT_FOUND);
  EXPECT_THAT(unknown_tensor.status.error_message(), HasSubstr(kHead));
  EXPECT_TRUE(unknown_tensor.tensors.empty());

  const auto start = std::chrono::steady_clock::now();
  Pulled future = Pull(shard_->stub.get(), *layout_, "job-a", 3, {}, /*wait_seconds=*/0.2);
  const double waited =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
  EXPECT_EQ(future.status.error_code(), grpc::StatusCode::DEADLINE_EXCEEDED)
      << Describe(future.status);
  EXPECT_THAT(future.status.error_message(), HasSubstr("version 3"));
  EXPECT_GE(waited, 0.15);
  EXPECT_LT(waited, 10.0);

  for (int64_t bytes : {int64_t{-1}, int64_t{2}, kMaxChunkBytes + 1}) {
    Pulled bad = Pull(shard_->stub.get(), *layout_, "job-a", 0, {}, 0.0, bytes);
    EXPECT_EQ(bad.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << bytes;
    EXPECT_THAT(bad.status.error_message(), HasSubstr("max_chunk_bytes"));
  }
  Pulled negative = Pull(shard_->stub.get(), *layout_, "job-a", -1);
  EXPECT_EQ(negative.status.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(negative.status.error_message(), HasSubstr("version"));

  // Still at version 0 with the initial values, gradients still accepted.
  EXPECT_EQ(shard_->service.version(), 0);
  ExpectValues(*shard_, "job-a", 0, InitialValues());
  v1::PushGradientsResponse push;
  ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, 0, &push).ok());
  EXPECT_TRUE(push.counted());
}

TEST_F(ShardServiceTest, PullWaitsForTheNextVersion) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  std::atomic<bool> done{false};
  Pulled waited;
  std::thread waiter([&] {
    waited = Pull(shard_->stub.get(), *layout_, "job-a", 1, {}, /*wait_seconds=*/60.0);
    done = true;
  });
  std::unique_ptr<ShardState> reference = Reference();
  for (int s = 0; s < kSlots; ++s) {
    ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, s).ok());
    AddToReference(*reference, 0, s, 1, SlotGradients(*layout_, Owned(), 0, s));
  }
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  EXPECT_FALSE(done.load());  // still waiting: nothing applied yet
  ASSERT_TRUE(Apply(*shard_, "job-a", 0, 0.01, 0.5, {{1, 2, 3, 4}}).ok());
  ASSERT_TRUE(reference->ApplyStep(0, 0.01, 0.5, {{1, 2, 3, 4}}).ok());
  waiter.join();
  ASSERT_TRUE(waited.status.ok()) << Describe(waited.status);
  EXPECT_TRUE(waited.versions_match);
  const std::map<std::string, std::vector<float>> expected = ReferenceValues(*reference);
  ASSERT_EQ(waited.tensors.size(), expected.size());
  for (const auto& [name, values] : expected) {
    EXPECT_TRUE(SameBits(waited.tensors[name], values)) << name;
  }
  EXPECT_FALSE(SameBits(waited.tensors[kQ], InitialValues().at(kQ)));

  // Version 0 is gone.
  Pulled old = Pull(shard_->stub.get(), *layout_, "job-a", 0);
  EXPECT_EQ(old.status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(old.status);
  EXPECT_THAT(old.status.error_message(), HasSubstr("version"));
}

// A coordinator that takes the job over (a repeated load) continues from
// the step the shard holds; one that asks for `reload` (it refused the
// shards' state: they were at different steps) gets the job afresh, never a
// mix of the two.
TEST_F(ShardServiceTest, ARepeatedLoadKeepsTheStepAndReloadStartsAfresh) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  for (int s = 0; s < kSlots; ++s) ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, s).ok());
  ASSERT_TRUE(Apply(*shard_, "job-a", 0, 0.01, 0.5, {{1, 2, 3, 4}}).ok());
  const Pulled applied = Pull(shard_->stub.get(), *layout_, "job-a", 1);
  ASSERT_TRUE(applied.status.ok()) << Describe(applied.status);

  v1::LoadJobRequest again = LoadRequest("job-a");
  again.set_job_key("a-new-run");
  v1::LoadJobResponse response;
  ASSERT_TRUE(LoadJob(*shard_, again, &response).ok());
  EXPECT_EQ(response.version(), 1);
  const Pulled kept = Pull(shard_->stub.get(), *layout_, "job-a", 1);
  ASSERT_TRUE(kept.status.ok()) << Describe(kept.status);
  for (const auto& [name, values] : applied.tensors) {
    EXPECT_TRUE(SameBits(kept.tensors.at(name), values)) << name;
  }

  again.set_reload(true);
  again.set_replace(true);
  ASSERT_TRUE(LoadJob(*shard_, again, &response).ok());
  EXPECT_EQ(response.version(), 0);
  ExpectValues(*shard_, "job-a", 0, InitialValues());
}

TEST_F(ShardServiceTest, DroppingTheJobEndsAWaitingPull) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  Pulled waited;
  std::thread waiter(
      [&] { waited = Pull(shard_->stub.get(), *layout_, "job-a", 1, {}, /*wait_seconds=*/60.0); });
  std::this_thread::sleep_for(std::chrono::milliseconds(100));
  ASSERT_TRUE(DropJob(*shard_, "job-a").ok());
  waiter.join();
  EXPECT_EQ(waited.status.error_code(), grpc::StatusCode::NOT_FOUND) << Describe(waited.status);
}

// ---------------------------------------------------------------------------
// PushGradients

// Indexes the `count` checkpoint parts in `dir` (step 1), tensor t in part
// owner[t], and expects every tensor and optimizer buffer of `reference` to
// equal the checkpoint's, bit for bit; `bytes` receives the bytes of those
// values and buffers.
void ExpectCheckpointEquals(const std::string& dir, const v1::JobSpec& job,
                            const ModelLayout& layout, const std::map<std::string, int>& owner,
                            int count, const ShardState& reference, int64_t* bytes) {
  std::vector<std::string> all;
  for (const auto& [name, part] : owner) all.push_back(name);
  v1::TrainerState trainer;
  trainer.set_step(1);
  *trainer.mutable_job() = job;
  ASSERT_TRUE(
      WriteCheckpointIndex(dir, count, layout, job.optimizer().name(), owner, trainer).ok());
  absl::StatusOr<std::map<std::string, TensorState>> read =
      ReadCheckpointTensors(dir, layout, job.model(), job.optimizer().name(), all);
  ASSERT_TRUE(read.ok()) << read.status();
  *bytes = 0;
  reference.Visit([&](const TensorInfo& info, const std::vector<float>& value,
                      const std::vector<float>& momentum, const std::vector<float>& exp_avg,
                      const std::vector<float>& exp_avg_sq) {
    const TensorState& got = read->at(info.name);
    EXPECT_TRUE(SameBits(got.value, value)) << info.name;
    EXPECT_TRUE(SameBits(got.momentum, momentum)) << info.name;
    EXPECT_TRUE(SameBits(got.exp_avg, exp_avg)) << info.name;
    EXPECT_TRUE(SameBits(got.exp_avg_sq, exp_avg_sq)) << info.name;
    *bytes += static_cast<int64_t>(
        (value.size() + momentum.size() + exp_avg.size() + exp_avg_sq.size()) * sizeof(float));
  });
}

// The same for a one-shard part holding the tensors `all`.
void ExpectCheckpointPartEquals(const std::string& dir, const v1::JobSpec& job,
                                const ModelLayout& layout, const std::vector<std::string>& all,
                                const ShardState& reference, int64_t* bytes) {
  std::map<std::string, int> owner;
  for (const std::string& name : all) owner[name] = 0;
  ExpectCheckpointEquals(dir, job, layout, owner, 1, reference, bytes);
}

TEST_F(ShardServiceTest, SaveCheckpointReadsBackBitForBit) {
  // One shard owns the whole model, so its file is a complete checkpoint.
  std::vector<std::string> all;
  for (const TensorInfo& t : layout_->tensors()) all.push_back(t.name);
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a", all)).ok());
  std::unique_ptr<ShardState> reference = Reference(all);
  for (int s = 0; s < kSlots; ++s) {
    ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, s, nullptr, all).ok());
    AddToReference(*reference, 0, s, 1, SlotGradients(*layout_, all, 0, s));
  }
  const std::vector<std::vector<int64_t>> loads = {{4, 0, 2, 2}};
  ASSERT_TRUE(Apply(*shard_, "job-a", 0, 0.01, 0.9, loads).ok());
  ASSERT_TRUE(reference->ApplyStep(0, 0.01, 0.9, loads).ok());

  const std::string step_dir = Path("step-00000001");
  std::filesystem::create_directories(step_dir);
  auto save = [&](int index, int count, int64_t version, v1::SaveCheckpointResponse* response) {
    grpc::ClientContext context;
    v1::SaveCheckpointRequest request;
    request.set_job_id("job-a");
    request.set_dir(step_dir);
    request.set_shard_index(index);
    request.set_shard_count(count);
    request.set_version(version);
    return shard_->stub->SaveCheckpoint(&context, request, response);
  };
  v1::SaveCheckpointResponse response;
  grpc::Status wrong_version = save(0, 1, 0, &response);
  EXPECT_EQ(wrong_version.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_THAT(wrong_version.error_message(), HasSubstr("version"));
  grpc::Status wrong_index = save(1, 1, 1, &response);
  EXPECT_EQ(wrong_index.error_code(), grpc::StatusCode::INVALID_ARGUMENT);
  EXPECT_THAT(wrong_index.error_message(), HasSubstr("shard_index"));
  EXPECT_TRUE(std::filesystem::is_empty(step_dir));

  ASSERT_TRUE(save(0, 1, 1, &response).ok());
  EXPECT_TRUE(std::filesystem::exists(step_dir + "/model-00001-of-00001.safetensors"));
  EXPECT_TRUE(std::filesystem::exists(step_dir + "/optimizer-00001-of-00001.safetensors"));
  int64_t bytes = 0;
  ASSERT_NO_FATAL_FAILURE(
      ExpectCheckpointPartEquals(step_dir, job_, *layout_, all, *reference, &bytes));
  EXPECT_EQ(response.bytes(), bytes);

  // A second shard resumes from it at version 1 with the same values.
  std::unique_ptr<ShardServer> resumed = StartShard();
  ASSERT_NE(resumed, nullptr);
  v1::LoadJobRequest request = LoadRequest("job-b", all);
  request.set_resume_from(dir());  // the root: its newest step-* directory
  v1::LoadJobResponse loaded;
  grpc::Status status = LoadJob(*resumed, request, &loaded);
  ASSERT_TRUE(status.ok()) << Describe(status);
  EXPECT_EQ(loaded.version(), 1);
  ExpectValues(*resumed, "job-b", 1, ReferenceValues(*reference));
}

// A replica (recovery.replicas > 1) is held like an owned tensor: it takes
// its gradients and its update, bit for bit as a shard owning it would; but
// a pull serves it only when it is named, and a checkpoint writes it only
// when SaveCheckpoint names it (a survivor writing a lost shard's part).
TEST_F(ShardServiceTest, AReplicaIsUpdatedLikeItsOwnerButServedAndWrittenOnlyWhenNamed) {
  // The shard owns every other tensor of the model and holds a replica of
  // the rest.
  std::vector<std::string> owned, replicas, held;
  for (size_t i = 0; i < layout_->tensors().size(); ++i) {
    (i % 2 == 0 ? owned : replicas).push_back(layout_->tensors()[i].name);
    held.push_back(layout_->tensors()[i].name);
  }
  // A tensor both owned and replicated, or one the model lacks, is refused.
  v1::LoadJobRequest twice = LoadRequest("job-a", owned);
  twice.add_replicas(owned[0]);
  grpc::Status refused = LoadJob(*shard_, twice);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << Describe(refused);
  EXPECT_THAT(refused.error_message(), HasSubstr(owned[0]));
  v1::LoadJobRequest unknown = LoadRequest("job-a", owned);
  unknown.add_replicas("model.layers.9.self_attn.q_proj.weight");
  refused = LoadJob(*shard_, unknown);
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::NOT_FOUND) << Describe(refused);
  EXPECT_EQ(shard_->service.job_id(), "");

  v1::LoadJobRequest request = LoadRequest("job-a", owned);
  for (const std::string& name : replicas) request.add_replicas(name);
  ASSERT_TRUE(LoadJob(*shard_, request).ok());
  // Unnamed, a pull brings the owned tensors only, in layout order.
  Pulled pulled = Pull(shard_->stub.get(), *layout_, "job-a", 0);
  ASSERT_TRUE(pulled.status.ok()) << Describe(pulled.status);
  EXPECT_EQ(pulled.order, owned);

  // Pushes carry every held tensor; the step applies to all of them, as on
  // a shard that owns them all.
  std::unique_ptr<ShardState> reference = Reference(held);
  for (int s = 0; s < kSlots; ++s) {
    ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, s, nullptr, held).ok());
    AddToReference(*reference, 0, s, 1, SlotGradients(*layout_, held, 0, s));
  }
  std::vector<std::pair<std::string, double>> squares;
  ASSERT_TRUE(Squares(*shard_, "job-a", 0, &squares).ok());
  absl::StatusOr<std::vector<std::pair<std::string, double>>> expected =
      reference->GradientSquares();
  ASSERT_TRUE(expected.ok()) << expected.status();
  EXPECT_EQ(squares, *expected);
  const std::vector<std::vector<int64_t>> loads = {{4, 0, 2, 2}};
  ASSERT_TRUE(Apply(*shard_, "job-a", 0, 0.01, 0.9, loads).ok());
  ASSERT_TRUE(reference->ApplyStep(0, 0.01, 0.9, loads).ok());
  const std::map<std::string, std::vector<float>> values = ReferenceValues(*reference);
  // The replicas are updated on a thread of their own after the apply
  // returns: the pull waits for each one's new version.
  pulled = Pull(shard_->stub.get(), *layout_, "job-a", 1, replicas, /*wait_seconds=*/60.0);
  ASSERT_TRUE(pulled.status.ok()) << Describe(pulled.status);
  EXPECT_EQ(pulled.order, replicas);
  for (const std::string& name : replicas) {
    EXPECT_TRUE(SameBits(pulled.tensors[name], values.at(name))) << name;
  }

  // SaveCheckpoint: the owned tensors by default, the named ones when named.
  const std::string step_dir = Path("step-00000001");
  std::filesystem::create_directories(step_dir);
  auto save = [&](int index, const std::vector<std::string>& tensors,
                  v1::SaveCheckpointResponse* response) {
    grpc::ClientContext context;
    v1::SaveCheckpointRequest save_request;
    save_request.set_job_id("job-a");
    save_request.set_dir(step_dir);
    save_request.set_shard_index(index);
    save_request.set_shard_count(2);
    save_request.set_version(1);
    for (const std::string& name : tensors) save_request.add_tensors(name);
    return shard_->stub->SaveCheckpoint(&context, save_request, response);
  };
  v1::SaveCheckpointResponse response;
  grpc::Status not_held = save(1, {replicas[0], "model.layers.9.mlp.gate.weight"}, &response);
  EXPECT_EQ(not_held.error_code(), grpc::StatusCode::NOT_FOUND) << Describe(not_held);
  EXPECT_THAT(not_held.error_message(), HasSubstr("model.layers.9.mlp.gate.weight"));
  grpc::Status repeated = save(1, {replicas[0], replicas[0]}, &response);
  EXPECT_EQ(repeated.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << Describe(repeated);
  EXPECT_TRUE(std::filesystem::is_empty(step_dir));

  // Bytes of values and state of `names` in the reference.
  auto bytes_of = [&](const std::vector<std::string>& names) {
    int64_t bytes = 0;
    reference->Visit([&](const TensorInfo& info, const std::vector<float>& value,
                         const std::vector<float>& momentum, const std::vector<float>& exp_avg,
                         const std::vector<float>& exp_avg_sq) {
      if (std::find(names.begin(), names.end(), info.name) == names.end()) return;
      bytes += static_cast<int64_t>(
          (value.size() + momentum.size() + exp_avg.size() + exp_avg_sq.size()) * sizeof(float));
    });
    return bytes;
  };
  ASSERT_TRUE(save(0, {}, &response).ok());
  EXPECT_EQ(response.bytes(), bytes_of(owned));
  ASSERT_TRUE(save(1, replicas, &response).ok());
  EXPECT_EQ(response.bytes(), bytes_of(replicas));
  // The two parts make the whole checkpoint, equal to the reference.
  std::map<std::string, int> part;
  for (const std::string& name : owned) part[name] = 0;
  for (const std::string& name : replicas) part[name] = 1;
  int64_t bytes = 0;
  ASSERT_NO_FATAL_FAILURE(
      ExpectCheckpointEquals(step_dir, job_, *layout_, part, 2, *reference, &bytes));
  EXPECT_EQ(bytes, bytes_of(held));
}

// A background checkpoint answers once the shard holds its snapshot; the
// next step runs meanwhile; a second call for the same part waits for the
// write and reports it; the files hold the snapshot's version.
TEST_F(ShardServiceTest, ABackgroundCheckpointHoldsItsVersionWhileTheNextStepRuns) {
  std::vector<std::string> all;
  for (const TensorInfo& t : layout_->tensors()) all.push_back(t.name);
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a", all)).ok());
  std::unique_ptr<ShardState> reference = Reference(all);
  const std::vector<std::vector<int64_t>> loads = {{4, 0, 2, 2}};
  auto run_step = [&](int64_t step, bool on_reference) {
    for (int s = 0; s < kSlots; ++s) {
      ASSERT_TRUE(PushSlot(*shard_, "job-a", step, s, nullptr, all).ok());
      if (on_reference)
        AddToReference(*reference, step, s, 1, SlotGradients(*layout_, all, step, s));
    }
    ASSERT_TRUE(Apply(*shard_, "job-a", step, 0.01, 0.9, loads).ok());
    if (on_reference) {
      ASSERT_TRUE(reference->ApplyStep(step, 0.01, 0.9, loads).ok());
    }
  };
  run_step(0, true);
  const std::string step_dir = Path("step-00000001"), other_dir = Path("other");
  std::filesystem::create_directories(step_dir);
  std::filesystem::create_directories(other_dir);
  auto save = [&](const std::string& dir, int64_t version, bool background,
                  v1::SaveCheckpointResponse* response) {
    grpc::ClientContext context;
    v1::SaveCheckpointRequest request;
    request.set_job_id("job-a");
    request.set_dir(dir);
    request.set_shard_index(0);
    request.set_shard_count(1);
    request.set_version(version);
    request.set_background(background);
    return shard_->stub->SaveCheckpoint(&context, request, response);
  };
  v1::SaveCheckpointResponse started, finished, refused;
  grpc::Status wrong = save(step_dir, 0, true, &refused);
  EXPECT_EQ(wrong.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(wrong);
  grpc::Status status = save(step_dir, 1, true, &started);
  ASSERT_TRUE(status.ok()) << Describe(status);
  run_step(1, false);  // the shard is at version 2 now
  status = save(step_dir, 1, false, &finished);
  ASSERT_TRUE(status.ok()) << Describe(status);
  EXPECT_EQ(finished.bytes(), started.bytes());
  // Another directory at version 1 is a new write: the shard is elsewhere.
  status = save(other_dir, 1, false, &refused);
  EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(status);

  int64_t bytes = 0;
  ASSERT_NO_FATAL_FAILURE(
      ExpectCheckpointPartEquals(step_dir, job_, *layout_, all, *reference, &bytes));
  EXPECT_EQ(started.bytes(), bytes);
}

TEST_F(ShardServiceTest, ABf16JobTravelsInBf16AndKeepsFloat32MasterValues) {
  job_.mutable_transfer()->set_dtype("bf16");
  // One shard owns the whole model, so its checkpoint part is complete.
  std::vector<std::string> all;
  for (const TensorInfo& t : layout_->tensors()) all.push_back(t.name);
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a", all)).ok());
  // A pull brings BF16 chunks, half the bytes: the master values rounded.
  const std::map<std::string, std::vector<float>> initial = InitialValues(all);
  Pulled pulled = Pull(shard_->stub.get(), *layout_, "job-a", 0, {}, 0.0, /*max_chunk_bytes=*/70,
                       TransferDtype::kBF16);
  ASSERT_TRUE(pulled.status.ok()) << Describe(pulled.status);
  EXPECT_LE(pulled.largest_chunk, 70);
  int64_t numel = 0;
  for (const auto& [name, values] : initial) {
    numel += static_cast<int64_t>(values.size());
    std::vector<float> rounded(values.size());
    for (size_t i = 0; i < values.size(); ++i) rounded[i] = Bf16ToFloat(FloatToBf16(values[i]));
    EXPECT_TRUE(SameBits(pulled.tensors[name], rounded)) << name;
  }
  EXPECT_EQ(pulled.bytes, 2 * numel);

  // An F32 push to a bf16 job is refused by name, and counts nothing.
  grpc::Status refused = Push(shard_->stub.get(),
                              PushMessages({"job-a", 0, 0, 1}, SlotGradients(*layout_, all, 0, 0)));
  EXPECT_EQ(refused.error_code(), grpc::StatusCode::INVALID_ARGUMENT) << Describe(refused);
  EXPECT_THAT(refused.error_message(), HasSubstr("only BF16 is accepted"));
  EXPECT_EQ(Squares(*shard_, "job-a", 0).error_code(), grpc::StatusCode::FAILED_PRECONDITION);

  // Slot 0-1 as a worker's prefix sum, slots 2 and 3 alone, all in BF16;
  // the reference takes the float32 gradients and rounds them itself.
  std::unique_ptr<ShardState> reference = Reference(all);
  std::vector<Grad> prefix = SlotGradients(*layout_, all, 0, 0);
  for (Grad& g : prefix) {
    for (float& x : g.data) x = 0.0f;
  }
  for (int s = 0; s < 2; ++s) {
    const std::vector<Grad> slot = SlotGradients(*layout_, all, 0, s);
    for (size_t k = 0; k < prefix.size(); ++k) {
      AccumulateSlotGradient(TransferDtype::kBF16, slot[k].data.data(),
                             static_cast<int64_t>(slot[k].data.size()), prefix[k].data.data());
    }
    AddToReference(*reference, 0, s, 1, slot);
  }
  ASSERT_TRUE(Push(shard_->stub.get(), PushMessagesBf16({"job-a", 0, 0, 2}, prefix, 40)).ok());
  for (int s = 2; s < kSlots; ++s) {
    const std::vector<Grad> slot = SlotGradients(*layout_, all, 0, s);
    ASSERT_TRUE(Push(shard_->stub.get(), PushMessagesBf16({"job-a", 0, s, 1}, slot)).ok());
    AddToReference(*reference, 0, s, 1, slot);
  }
  std::vector<std::pair<std::string, double>> squares;
  ASSERT_TRUE(Squares(*shard_, "job-a", 0, &squares).ok());
  absl::StatusOr<std::vector<std::pair<std::string, double>>> expected =
      reference->GradientSquares();
  ASSERT_TRUE(expected.ok()) << expected.status();
  EXPECT_EQ(squares, *expected);
  ASSERT_TRUE(Apply(*shard_, "job-a", 0, 0.01, 0.7, {{4, 0, 2, 2}}).ok());
  ASSERT_TRUE(reference->ApplyStep(0, 0.01, 0.7, {{4, 0, 2, 2}}).ok());
  // The master values stay float32: the checkpoint holds them unrounded.
  const std::string step_dir = Path("step-00000001");
  std::filesystem::create_directories(step_dir);
  grpc::ClientContext context;
  v1::SaveCheckpointRequest request;
  request.set_job_id("job-a");
  request.set_dir(step_dir);
  request.set_shard_count(1);
  request.set_version(1);
  v1::SaveCheckpointResponse saved;
  ASSERT_TRUE(shard_->stub->SaveCheckpoint(&context, request, &saved).ok());
  int64_t bytes = 0;
  ASSERT_NO_FATAL_FAILURE(
      ExpectCheckpointPartEquals(step_dir, job_, *layout_, all, *reference, &bytes));
  bool any_unrounded = false;
  for (const auto& [name, values] : ReferenceValues(*reference)) {
    for (float x : values) any_unrounded = any_unrounded || x != Bf16ToFloat(FloatToBf16(x));
  }
  EXPECT_TRUE(any_unrounded);
}

}  // namespace
}  // namespace muonps
