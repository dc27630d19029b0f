// ShardServiceImpl behind a real GrpcServer on loopback, driven through the
// generated stub the way workers and the coordinator drive it. Every refusal
// carries the status shard.proto promises, names the field or tensor, and
// leaves the shard as it was (a following valid call behaves as if the bad
// one never came). Prefix-summed pushes end bit-identical to per-slot pushes,
// and a saved checkpoint reads back bit for bit. The independent reference
// is a ShardState driven in-process with the same gradients.
#include "services/shard/shard_service.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <atomic>
#include <chrono>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <limits>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "checkpoint/checkpoint.h"
#include "common/job_spec.h"
#include "common/model_layout.h"
#include "rpc/grpc_server.h"
#include "rpc/rpc_util.h"
#include "rpc/tensor_stream.h"
#include "services/shard/shard_state.h"
#include "tests/test_util.h"

namespace muonps {
namespace {

using ::testing::HasSubstr;

// Sizes: C = 16 hidden, E = 4 routed experts, 4 slots.
constexpr char kQ[] = "model.layers.0.self_attn.q_proj.weight";              // (C, C), Muon
constexpr char kNorm[] = "model.norm.weight";                                // (C), AdamW
constexpr char kBias[] = "model.layers.1.mlp.gate.e_score_correction_bias";  // (E), buffer
constexpr char kHead[] = "lm_head.weight";                                   // not owned
constexpr int kSlots = 4;

const std::vector<std::string>& Owned() {
  static const std::vector<std::string>* owned = new std::vector<std::string>{kQ, kNorm, kBias};
  return *owned;
}

v1::JobSpec TinyJob() {
  // Shards never read the data; the path only has to be set.
  absl::StatusOr<v1::JobSpec> job = ParseJobSpecJson(R"({
    "model": {"hidden_size": 16, "num_hidden_layers": 2, "num_attention_heads": 2,
              "max_position_embeddings": 16, "intermediate_size": 32, "n_routed_experts": 4,
              "moe_intermediate_size": 8},
    "optimizer": {"lr": 0.01},
    "schedule": {"total_steps": 4, "warmup_steps": 1},
    "data": {"path": "/nonexistent/shards-do-not-read-data"},
    "batch": {"slots": 4, "micro_batch": 1}, "seed": 7})");
  EXPECT_TRUE(job.ok()) << job.status();
  return *job;
}

// One shard server on 127.0.0.1:0 and a stub to it.
struct ShardServer {
  ShardServiceImpl service;
  std::unique_ptr<GrpcServer> server;
  std::unique_ptr<v1::ShardService::Stub> stub;

  ~ShardServer() {
    service.Shutdown();  // wakes waiting pulls
    if (server != nullptr) server->Shutdown();
  }
};

std::unique_ptr<ShardServer> StartShard() {
  auto shard = std::make_unique<ShardServer>();
  absl::StatusOr<std::unique_ptr<GrpcServer>> server = GrpcServer::Start({}, {&shard->service});
  EXPECT_TRUE(server.ok()) << server.status();
  if (!server.ok()) return nullptr;
  shard->server = std::move(*server);
  shard->server->SetServing(true);
  shard->stub = v1::ShardService::NewStub(MakeChannel(shard->server->address()));
  return shard;
}

// One gradient tensor as a worker sends it.
struct Grad {
  std::string name;
  std::vector<int64_t> shape;
  std::vector<float> data;
};

// Deterministic, slot- and step-dependent values of mixed sign and magnitude,
// so that summation order shows in the low bits.
std::vector<Grad> SlotGradients(const ModelLayout& layout, const std::vector<std::string>& names,
                                int64_t step, int slot) {
  std::vector<Grad> out;
  for (const std::string& name : names) {
    const TensorInfo* info = layout.Find(name);
    if (info == nullptr || !info->trainable()) continue;
    Grad g{name, info->shape, std::vector<float>(info->numel)};
    for (int64_t i = 0; i < info->numel; ++i) {
      g.data[i] = static_cast<float>(std::sin(0.37 * i + 1.3 * slot + 0.7 * step + info->offset) *
                                     std::pow(10.0, -1 - (i + slot) % 3));
    }
    out.push_back(std::move(g));
  }
  return out;
}

// Element-wise float32 sum a + b (the worker's prefix sum).
std::vector<Grad> Sum(const std::vector<Grad>& a, const std::vector<Grad>& b) {
  std::vector<Grad> out = a;
  for (size_t k = 0; k < out.size(); ++k) {
    for (size_t i = 0; i < out[k].data.size(); ++i) out[k].data[i] += b[k].data[i];
  }
  return out;
}

struct PushHeader {
  std::string job_id;
  int64_t step = 0;
  int slot = 0;
  int slot_count = 1;
};

// The messages of one push: the header on the first message only, as the
// worker sends it.
std::vector<v1::PushGradientsRequest> PushMessages(const PushHeader& header,
                                                   const std::vector<Grad>& grads,
                                                   int64_t chunk_bytes = kDefaultChunkBytes) {
  std::vector<v1::PushGradientsRequest> out;
  for (const Grad& g : grads) {
    SplitTensor(g.name, g.shape, g.data.data(), chunk_bytes, [&](const v1::TensorChunk& chunk) {
      v1::PushGradientsRequest message;
      if (out.empty()) {
        message.set_job_id(header.job_id);
        message.set_step(header.step);
        message.set_slot(header.slot);
        message.set_slot_count(header.slot_count);
      }
      *message.mutable_chunk() = chunk;
      out.push_back(std::move(message));
      return true;
    });
  }
  return out;
}

grpc::Status Push(v1::ShardService::Stub* stub,
                  const std::vector<v1::PushGradientsRequest>& messages,
                  v1::PushGradientsResponse* response = nullptr) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(60.0));
  v1::PushGradientsResponse ignored;
  std::unique_ptr<grpc::ClientWriter<v1::PushGradientsRequest>> writer =
      stub->PushGradients(&context, response != nullptr ? response : &ignored);
  for (const v1::PushGradientsRequest& message : messages) {
    if (!writer->Write(message)) break;
  }
  writer->WritesDone();
  return writer->Finish();
}

// What one PullParameters stream brought.
struct Pulled {
  grpc::Status status;
  std::vector<std::string> order;  // tensors as they came
  std::map<std::string, std::vector<float>> tensors;
  int64_t largest_chunk = 0;   // bytes
  bool versions_match = true;  // every message at the asked version
};

Pulled Pull(v1::ShardService::Stub* stub, const ModelLayout& layout, const std::string& job_id,
            int64_t version, const std::vector<std::string>& names = {}, double wait_seconds = 0.0,
            int64_t max_chunk_bytes = 0) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(wait_seconds + 60.0));
  v1::PullParametersRequest request;
  request.set_job_id(job_id);
  request.set_version(version);
  for (const std::string& name : names) request.add_tensors(name);
  request.set_wait_seconds(wait_seconds);
  request.set_max_chunk_bytes(max_chunk_bytes);
  std::unique_ptr<grpc::ClientReader<v1::PullParametersResponse>> reader =
      stub->PullParameters(&context, request);
  Pulled out;
  v1::PullParametersResponse message;
  std::unique_ptr<TensorAssembler> current;
  while (reader->Read(&message)) {
    const v1::TensorChunk& chunk = message.chunk();
    out.versions_match = out.versions_match && message.version() == version;
    out.largest_chunk = std::max<int64_t>(out.largest_chunk, chunk.data().size());
    if (out.order.empty() || out.order.back() != chunk.name()) {
      const TensorInfo* info = layout.Find(chunk.name());
      EXPECT_NE(info, nullptr) << chunk.name();
      if (info == nullptr) continue;
      out.order.push_back(chunk.name());
      std::vector<float>& buffer = out.tensors[chunk.name()];
      buffer.assign(info->numel, 0.0f);
      current = std::make_unique<TensorAssembler>(chunk.name(), info->shape, buffer.data(),
                                                  /*require_finite=*/true);
    }
    EXPECT_TRUE(current->Add(chunk).ok()) << chunk.name();
  }
  out.status = reader->Finish();
  return out;
}

std::string Describe(const grpc::Status& status) {
  return absl::StrCat("code ", status.error_code(), ": ", status.error_message());
}

// Bit equality of two float vectors.
bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() &&
         (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

class ShardServiceTest : public testing_util::TempDirTest {
 protected:
  void SetUp() override {
    TempDirTest::SetUp();
    job_ = TinyJob();
    layout_ = std::make_unique<ModelLayout>(job_.model());
    shard_ = StartShard();
    ASSERT_NE(shard_, nullptr);
  }

  v1::LoadJobRequest LoadRequest(const std::string& job_id,
                                 const std::vector<std::string>& tensors = Owned()) const {
    v1::LoadJobRequest request;
    request.set_job_id(job_id);
    *request.mutable_spec() = job_;
    for (const std::string& name : tensors) request.add_tensors(name);
    return request;
  }

  static grpc::Status LoadJob(ShardServer& shard, const v1::LoadJobRequest& request,
                              v1::LoadJobResponse* response = nullptr) {
    grpc::ClientContext context;
    context.set_deadline(DeadlineIn(30.0));
    v1::LoadJobResponse ignored;
    return shard.stub->LoadJob(&context, request, response != nullptr ? response : &ignored);
  }

  static grpc::Status DropJob(ShardServer& shard, const std::string& job_id) {
    grpc::ClientContext context;
    v1::DropJobRequest request;
    request.set_job_id(job_id);
    v1::DropJobResponse response;
    return shard.stub->DropJob(&context, request, &response);
  }

  static grpc::Status Squares(ShardServer& shard, const std::string& job_id, int64_t step,
                              std::vector<std::pair<std::string, double>>* out = nullptr) {
    grpc::ClientContext context;
    v1::GetGradientSquaresRequest request;
    request.set_job_id(job_id);
    request.set_step(step);
    v1::GetGradientSquaresResponse response;
    grpc::Status status = shard.stub->GetGradientSquares(&context, request, &response);
    if (out != nullptr) {
      out->clear();
      for (const v1::TensorSquares& t : response.tensors()) {
        out->emplace_back(t.name(), t.sum_of_squares());
      }
    }
    return status;
  }

  static grpc::Status Apply(ShardServer& shard, const std::string& job_id, int64_t step, double lr,
                            double clip_coef, const std::vector<std::vector<int64_t>>& loads = {},
                            v1::ApplyStepResponse* response = nullptr) {
    grpc::ClientContext context;
    context.set_deadline(DeadlineIn(30.0));
    v1::ApplyStepRequest request;
    request.set_job_id(job_id);
    request.set_step(step);
    request.set_lr(lr);
    request.set_clip_coef(clip_coef);
    for (const auto& layer : loads) {
      v1::ExpertLoad* load = request.add_expert_load();
      for (int64_t x : layer) load->add_tokens(x);
    }
    v1::ApplyStepResponse ignored;
    return shard.stub->ApplyStep(&context, request, response != nullptr ? response : &ignored);
  }

  // Pushes slot `slot` of `step` (every owned trainable tensor).
  grpc::Status PushSlot(ShardServer& shard, const std::string& job_id, int64_t step, int slot,
                        v1::PushGradientsResponse* response = nullptr,
                        const std::vector<std::string>& owned = Owned()) const {
    return Push(shard.stub.get(),
                PushMessages({job_id, step, slot, 1}, SlotGradients(*layout_, owned, step, slot)),
                response);
  }

  // The initial values of the owned tensors, from InitTensor.
  std::map<std::string, std::vector<float>> InitialValues(
      const std::vector<std::string>& names = Owned()) const {
    std::map<std::string, std::vector<float>> out;
    for (const std::string& name : names) {
      const TensorInfo* info = layout_->Find(name);
      std::vector<float>& v = out[name];
      v.resize(info->numel);
      InitTensor(*info, job_.seed(), job_.model().initializer_range(), v.data());
    }
    return out;
  }

  // The shard's tensors equal `expected` bit for bit at `version`.
  void ExpectValues(ShardServer& shard, const std::string& job_id, int64_t version,
                    const std::map<std::string, std::vector<float>>& expected) const {
    Pulled pulled = Pull(shard.stub.get(), *layout_, job_id, version);
    ASSERT_TRUE(pulled.status.ok()) << Describe(pulled.status);
    ASSERT_EQ(pulled.tensors.size(), expected.size());
    for (const auto& [name, values] : expected) {
      EXPECT_TRUE(SameBits(pulled.tensors[name], values)) << name;
    }
  }

  // An in-process ShardState of the same job and tensors: the reference.
  std::unique_ptr<ShardState> Reference(const std::vector<std::string>& owned = Owned()) const {
    absl::StatusOr<std::unique_ptr<ShardState>> state = ShardState::Create(job_, owned);
    EXPECT_TRUE(state.ok()) << state.status();
    return state.ok() ? std::move(*state) : nullptr;
  }

  static void AddToReference(ShardState& state, int64_t step, int first_slot, int slot_count,
                             const std::vector<Grad>& grads) {
    std::vector<ShardState::Gradient> in;
    for (const Grad& g : grads) {
      in.push_back({g.name, g.data.data(), static_cast<int64_t>(g.data.size())});
    }
    absl::StatusOr<bool> counted = state.AddGradients(step, first_slot, slot_count, in);
    ASSERT_TRUE(counted.ok()) << counted.status();
    EXPECT_TRUE(*counted);
  }

  static std::map<std::string, std::vector<float>> ReferenceValues(const ShardState& state) {
    std::map<std::string, std::vector<float>> out;
    state.Visit([&](const TensorInfo& info, const std::vector<float>& value,
                    const std::vector<float>&, const std::vector<float>&,
                    const std::vector<float>&) { out[info.name] = value; });
    return out;
  }

  v1::JobSpec job_;
  std::unique_ptr<ModelLayout> layout_;
  std::unique_ptr<ShardServer> shard_;
};

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

  // The same load again is acknowledged and keeps the state (the pushed slot).
  v1::LoadJobResponse response;
  grpc::Status again = LoadJob(*shard_, LoadRequest("job-a"), &response);
  EXPECT_TRUE(again.ok()) << Describe(again);
  EXPECT_EQ(response.version(), 0);
  v1::PushGradientsResponse push;
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

TEST_F(ShardServiceTest, BadPushesAreRefusedAndChangeNothing) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  const std::vector<Grad> good = SlotGradients(*layout_, Owned(), 0, 0);  // {kQ, kNorm}
  ASSERT_EQ(good.size(), 2u);
  ASSERT_EQ(good[0].name, kQ);
  const PushHeader header{"job-a", 0, 0, 1};

  struct Case {
    std::string what;
    std::vector<v1::PushGradientsRequest> messages;
    grpc::StatusCode code;
    std::string names;  // expected in the message
  };
  std::vector<Case> cases;
  {
    std::vector<Grad> g = good;
    g[0].shape = {16, 17};
    g[0].data.resize(16 * 17);
    cases.push_back({"wrong shape", PushMessages(header, g), grpc::StatusCode::INVALID_ARGUMENT,
                     absl::StrCat("tensor ", kQ, ": shape")});
  }
  {
    std::vector<v1::PushGradientsRequest> m = PushMessages(header, good);
    m[0].mutable_chunk()->set_dtype("F16");
    cases.push_back({"wrong dtype", m, grpc::StatusCode::INVALID_ARGUMENT,
                     absl::StrCat("tensor ", kQ, ": dtype")});
  }
  {
    // kQ in 256-byte chunks; the second and third swapped.
    std::vector<v1::PushGradientsRequest> m = PushMessages(header, good, 256);
    ASSERT_GE(m.size(), 4u);
    std::swap(*m[1].mutable_chunk(), *m[2].mutable_chunk());
    cases.push_back({"out-of-order offset", m, grpc::StatusCode::INVALID_ARGUMENT,
                     absl::StrCat("tensor ", kQ, ": offset")});
  }
  {
    std::vector<v1::PushGradientsRequest> m = PushMessages(header, good, 256);
    m.erase(m.begin() + 1);
    cases.push_back(
        {"missing chunk", m, grpc::StatusCode::INVALID_ARGUMENT, absl::StrCat("tensor ", kQ)});
  }
  for (float bad : {std::numeric_limits<float>::quiet_NaN(), std::numeric_limits<float>::infinity(),
                    -std::numeric_limits<float>::infinity()}) {
    std::vector<Grad> g = good;
    g[1].data[5] = bad;
    cases.push_back({absl::StrCat("value ", bad), PushMessages(header, g),
                     grpc::StatusCode::INVALID_ARGUMENT,
                     absl::StrCat("tensor ", kNorm, ": non-finite gradient value at element 5")});
  }
  cases.push_back({"missing tensor", PushMessages(header, {good[0]}),
                   grpc::StatusCode::INVALID_ARGUMENT,
                   absl::StrCat("tensor ", kNorm, ": missing")});
  cases.push_back({"tensor twice", PushMessages(header, {good[0], good[1], good[0]}),
                   grpc::StatusCode::INVALID_ARGUMENT,
                   absl::StrCat("tensor ", kQ, " appears twice")});
  {
    std::vector<Grad> g = good;
    g.push_back(SlotGradients(*layout_, {kHead}, 0, 0)[0]);
    cases.push_back(
        {"tensor of another shard", PushMessages(header, g), grpc::StatusCode::NOT_FOUND, kHead});
    g.back().name = "model.no_such.weight";
    cases.push_back({"tensor not in the model", PushMessages(header, g),
                     grpc::StatusCode::NOT_FOUND, "model.no_such.weight"});
  }
  {
    std::vector<Grad> g = good;
    g.push_back({kBias, {4}, {0.5f, 0.5f, 0.5f, 0.5f}});
    cases.push_back(
        {"a buffer", PushMessages(header, g), grpc::StatusCode::FAILED_PRECONDITION, kBias});
  }
  cases.push_back({"unknown job", PushMessages({"job-z", 0, 0, 1}, good),
                   grpc::StatusCode::NOT_FOUND, "job-z"});
  cases.push_back({"wrong step", PushMessages({"job-a", 1, 0, 1}, good),
                   grpc::StatusCode::FAILED_PRECONDITION, "step 1"});
  cases.push_back({"multi-slot range not from slot 0", PushMessages({"job-a", 0, 1, 2}, good),
                   grpc::StatusCode::INVALID_ARGUMENT, "slot_count"});
  cases.push_back({"slot out of range", PushMessages({"job-a", 0, kSlots, 1}, good),
                   grpc::StatusCode::INVALID_ARGUMENT, "slot range"});
  cases.push_back({"range past the last slot", PushMessages({"job-a", 0, 0, kSlots + 1}, good),
                   grpc::StatusCode::INVALID_ARGUMENT, "slot range"});
  cases.push_back({"negative slot", PushMessages({"job-a", 0, -1, 1}, good),
                   grpc::StatusCode::INVALID_ARGUMENT, "slot range"});
  {
    std::vector<v1::PushGradientsRequest> m = PushMessages(header, good, 256);
    m[2].set_step(5);
    cases.push_back({"later message disagrees", m, grpc::StatusCode::INVALID_ARGUMENT, "step"});
  }
  cases.push_back({"empty push", {}, grpc::StatusCode::INVALID_ARGUMENT, "empty"});

  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    grpc::Status status = Push(shard_->stub.get(), c.messages);
    EXPECT_EQ(status.error_code(), c.code) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr(c.names));
    // Nothing was counted: slot 0 is still missing.
    grpc::Status squares = Squares(*shard_, "job-a", 0);
    EXPECT_EQ(squares.error_code(), grpc::StatusCode::FAILED_PRECONDITION);
    EXPECT_THAT(squares.error_message(), HasSubstr("slot 0"));
  }

  // After all of that, the shard is as loaded: the valid pushes count, and
  // the step is exactly the reference's.
  std::unique_ptr<ShardState> reference = Reference();
  for (int s = 0; s < kSlots; ++s) {
    v1::PushGradientsResponse response;
    ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, s, &response).ok());
    EXPECT_TRUE(response.counted());
    EXPECT_EQ(response.tensors(), 2);
    EXPECT_EQ(response.bytes(), (16 * 16 + 16) * 4);
    AddToReference(*reference, 0, s, 1, SlotGradients(*layout_, Owned(), 0, s));
  }
  std::vector<std::pair<std::string, double>> squares;
  ASSERT_TRUE(Squares(*shard_, "job-a", 0, &squares).ok());
  absl::StatusOr<std::vector<std::pair<std::string, double>>> expected =
      reference->GradientSquares();
  ASSERT_TRUE(expected.ok());
  EXPECT_EQ(squares, *expected);
  ExpectValues(*shard_, "job-a", 0, InitialValues());
}

TEST_F(ShardServiceTest, OversizedChunksAreResourceExhausted) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  // A 5 MiB chunk fits the server's 16 MiB message limit, so the handler
  // sees it and refuses it by the 4 MiB chunk rule.
  {
    v1::PushGradientsRequest message;
    message.set_job_id("job-a");
    v1::TensorChunk* chunk = message.mutable_chunk();
    chunk->set_name(kQ);
    chunk->set_dtype("F32");
    chunk->add_shape(16);
    chunk->add_shape(16);
    chunk->set_data(std::string(5 << 20, '\0'));
    grpc::Status status = Push(shard_->stub.get(), {message});
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr(kQ));
    EXPECT_THAT(status.error_message(), HasSubstr(absl::StrCat(kMaxChunkBytes)));
  }
  // A message over 16 MiB is refused by gRPC before the handler sees it.
  // (MakeChannel would refuse to send it, so this channel has no send limit.)
  {
    grpc::ChannelArguments args;
    args.SetMaxSendMessageSize(-1);
    std::unique_ptr<v1::ShardService::Stub> unlimited =
        v1::ShardService::NewStub(grpc::CreateCustomChannel(
            shard_->server->address(), grpc::InsecureChannelCredentials(), args));
    v1::PushGradientsRequest message;
    message.set_job_id("job-a");
    message.mutable_chunk()->set_name(kQ);
    message.mutable_chunk()->set_data(std::string(17 << 20, '\0'));
    grpc::Status status = Push(unlimited.get(), {message});
    EXPECT_EQ(status.error_code(), grpc::StatusCode::RESOURCE_EXHAUSTED) << Describe(status);
  }
  v1::PushGradientsResponse response;
  ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, 0, &response).ok());
  EXPECT_TRUE(response.counted());
}

TEST_F(ShardServiceTest, RepeatsAreAcknowledgedAndOverlapsRefused) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  std::unique_ptr<ShardState> reference = Reference();
  const std::vector<Grad> g0 = SlotGradients(*layout_, Owned(), 0, 0);
  const std::vector<Grad> g1 = SlotGradients(*layout_, Owned(), 0, 1);
  const std::vector<Grad> g01 = Sum(g0, g1);

  // [0, 2) as one prefix sum.
  v1::PushGradientsResponse response;
  ASSERT_TRUE(Push(shard_->stub.get(), PushMessages({"job-a", 0, 0, 2}, g01), &response).ok());
  EXPECT_TRUE(response.counted());
  AddToReference(*reference, 0, 0, 2, g01);

  // The same range again, with different values: acknowledged, not counted.
  std::vector<Grad> other = g01;
  for (Grad& g : other) std::fill(g.data.begin(), g.data.end(), 9.0f);
  grpc::Status repeat =
      Push(shard_->stub.get(), PushMessages({"job-a", 0, 0, 2}, other), &response);
  ASSERT_TRUE(repeat.ok()) << Describe(repeat);
  EXPECT_FALSE(response.counted());

  // Ranges overlapping [0, 2) differently: slot 1 alone, slot 0 alone, [0, 3).
  for (const PushHeader& h :
       {PushHeader{"job-a", 0, 1, 1}, PushHeader{"job-a", 0, 0, 1}, PushHeader{"job-a", 0, 0, 3}}) {
    SCOPED_TRACE(absl::StrCat("slot ", h.slot, " count ", h.slot_count));
    grpc::Status status = Push(shard_->stub.get(), PushMessages(h, g0));
    EXPECT_EQ(status.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr("overlap"));
    EXPECT_THAT(status.error_message(), HasSubstr("tensor "));
  }

  for (int s = 2; s < kSlots; ++s) {
    const std::vector<Grad> g = SlotGradients(*layout_, Owned(), 0, s);
    ASSERT_TRUE(Push(shard_->stub.get(), PushMessages({"job-a", 0, s, 1}, g), &response).ok());
    EXPECT_TRUE(response.counted());
    AddToReference(*reference, 0, s, 1, g);
    // A repeat of a single slot with other values is ignored too.
    ASSERT_TRUE(Push(shard_->stub.get(), PushMessages({"job-a", 0, s, 1}, other), &response).ok());
    EXPECT_FALSE(response.counted());
  }
  std::vector<std::pair<std::string, double>> squares;
  ASSERT_TRUE(Squares(*shard_, "job-a", 0, &squares).ok());
  EXPECT_EQ(squares, *reference->GradientSquares());
  ASSERT_TRUE(Apply(*shard_, "job-a", 0, 0.01, 1.0).ok());
  ASSERT_TRUE(reference->ApplyStep(0, 0.01, 1.0, {}).ok());
  ExpectValues(*shard_, "job-a", 1, ReferenceValues(*reference));
}

// ---------------------------------------------------------------------------
// GetGradientSquares / ApplyStep

TEST_F(ShardServiceTest, SquaresAndApplyStepRefusals) {
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a")).ok());
  v1::ApplyStepResponse applied;
  // Nothing applied yet: no step -1 to repeat.
  grpc::Status none = Apply(*shard_, "job-a", -1, 0.01, 1.0, {}, &applied);
  EXPECT_EQ(none.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(none);
  for (int s = 0; s < kSlots - 1; ++s) ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, s).ok());

  grpc::Status early = Squares(*shard_, "job-a", 0);
  EXPECT_EQ(early.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(early);
  EXPECT_THAT(early.error_message(), HasSubstr(absl::StrCat("slot ", kSlots - 1)));
  grpc::Status missing = Apply(*shard_, "job-a", 0, 0.01, 1.0);
  EXPECT_EQ(missing.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(missing);
  EXPECT_THAT(missing.error_message(), HasSubstr("missing"));

  ASSERT_TRUE(PushSlot(*shard_, "job-a", 0, kSlots - 1).ok());
  EXPECT_EQ(Squares(*shard_, "job-a", 1).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Squares(*shard_, "job-z", 0).error_code(), grpc::StatusCode::NOT_FOUND);

  struct Case {
    std::string what;
    int64_t step;
    double lr, clip_coef;
    grpc::StatusCode code;
    std::string names;
  };
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const double inf = std::numeric_limits<double>::infinity();
  const std::vector<Case> cases = {
      {"wrong step", 1, 0.01, 1.0, grpc::StatusCode::FAILED_PRECONDITION, "step 1"},
      {"NaN lr", 0, nan, 1.0, grpc::StatusCode::INVALID_ARGUMENT, "lr"},
      {"infinite lr", 0, inf, 1.0, grpc::StatusCode::INVALID_ARGUMENT, "lr"},
      {"negative lr", 0, -0.01, 1.0, grpc::StatusCode::INVALID_ARGUMENT, "lr"},
      {"zero clip_coef", 0, 0.01, 0.0, grpc::StatusCode::INVALID_ARGUMENT, "clip_coef"},
      {"negative clip_coef", 0, 0.01, -1.0, grpc::StatusCode::INVALID_ARGUMENT, "clip_coef"},
      {"NaN clip_coef", 0, 0.01, nan, grpc::StatusCode::INVALID_ARGUMENT, "clip_coef"},
  };
  for (const Case& c : cases) {
    SCOPED_TRACE(c.what);
    grpc::Status status = Apply(*shard_, "job-a", c.step, c.lr, c.clip_coef);
    EXPECT_EQ(status.error_code(), c.code) << Describe(status);
    EXPECT_THAT(status.error_message(), HasSubstr(c.names));
    EXPECT_EQ(shard_->service.version(), 0);
  }
  EXPECT_EQ(Apply(*shard_, "job-z", 0, 0.01, 1.0).error_code(), grpc::StatusCode::NOT_FOUND);
  ExpectValues(*shard_, "job-a", 0, InitialValues());

  // The gradients are still complete and untouched: the step is the reference's.
  std::unique_ptr<ShardState> reference = Reference();
  for (int s = 0; s < kSlots; ++s) {
    AddToReference(*reference, 0, s, 1, SlotGradients(*layout_, Owned(), 0, s));
  }
  std::vector<std::pair<std::string, double>> squares;
  ASSERT_TRUE(Squares(*shard_, "job-a", 0, &squares).ok());
  EXPECT_EQ(squares, *reference->GradientSquares());
  ASSERT_TRUE(Apply(*shard_, "job-a", 0, 0.01, 0.75, {{3, 1, 0, 4}}, &applied).ok());
  ASSERT_TRUE(reference->ApplyStep(0, 0.01, 0.75, {{3, 1, 0, 4}}).ok());
  EXPECT_EQ(applied.version(), 1);
  EXPECT_EQ(shard_->service.version(), 1);
  const std::map<std::string, std::vector<float>> after = ReferenceValues(*reference);
  ExpectValues(*shard_, "job-a", 1, after);
  EXPECT_FALSE(SameBits(after.at(kBias), InitialValues().at(kBias)));  // the bias rule ran

  // The step just applied, again: acknowledged, nothing changes.
  grpc::Status repeat = Apply(*shard_, "job-a", 0, 0.01, 0.75, {{3, 1, 0, 4}}, &applied);
  EXPECT_TRUE(repeat.ok()) << Describe(repeat);
  EXPECT_EQ(applied.version(), 1);
  EXPECT_EQ(shard_->service.version(), 1);
  ExpectValues(*shard_, "job-a", 1, after);
  // The next step needs its own gradients.
  EXPECT_EQ(Apply(*shard_, "job-a", 1, 0.01, 1.0).error_code(),
            grpc::StatusCode::FAILED_PRECONDITION);
  EXPECT_EQ(Squares(*shard_, "job-a", 1).error_code(), grpc::StatusCode::FAILED_PRECONDITION);
}

// ---------------------------------------------------------------------------
// Prefix pushes

TEST_F(ShardServiceTest, PrefixPushesMatchPerSlotPushesBitForBit) {
  // Shard A gets every slot alone (in reverse order); shard B gets slots
  // [0, 2) as one float32 sum g0 + g1, then slots 2 and 3 alone.
  std::unique_ptr<ShardServer> other = StartShard();
  ASSERT_NE(other, nullptr);
  const std::vector<std::string> owned = {
      kQ, kNorm, kBias, "model.layers.1.mlp.experts.2.up_proj.weight", "model.embed_tokens.weight"};
  ASSERT_TRUE(LoadJob(*shard_, LoadRequest("job-a", owned)).ok());
  ASSERT_TRUE(LoadJob(*other, LoadRequest("job-a", owned)).ok());
  for (int64_t step = 0; step < 3; ++step) {
    SCOPED_TRACE(absl::StrCat("step ", step));
    std::vector<std::vector<Grad>> g;
    for (int s = 0; s < kSlots; ++s) g.push_back(SlotGradients(*layout_, owned, step, s));
    for (int s = kSlots - 1; s >= 0; --s) {
      ASSERT_TRUE(Push(shard_->stub.get(), PushMessages({"job-a", step, s, 1}, g[s])).ok());
    }
    ASSERT_TRUE(Push(other->stub.get(), PushMessages({"job-a", step, 0, 2}, Sum(g[0], g[1]))).ok());
    for (int s = 2; s < kSlots; ++s) {
      ASSERT_TRUE(Push(other->stub.get(), PushMessages({"job-a", step, s, 1}, g[s])).ok());
    }
    std::vector<std::pair<std::string, double>> a, b;
    ASSERT_TRUE(Squares(*shard_, "job-a", step, &a).ok());
    ASSERT_TRUE(Squares(*other, "job-a", step, &b).ok());
    EXPECT_EQ(a, b);
    const double clip = step == 0 ? 0.5 : 1.0;
    const std::vector<std::vector<int64_t>> loads = {{static_cast<int64_t>(step), 5, 2, 1}};
    ASSERT_TRUE(Apply(*shard_, "job-a", step, 0.02, clip, loads).ok());
    ASSERT_TRUE(Apply(*other, "job-a", step, 0.02, clip, loads).ok());
    Pulled pa = Pull(shard_->stub.get(), *layout_, "job-a", step + 1);
    Pulled pb = Pull(other->stub.get(), *layout_, "job-a", step + 1);
    ASSERT_TRUE(pa.status.ok() && pb.status.ok());
    ASSERT_EQ(pa.tensors.size(), owned.size());
    for (const std::string& name : owned) {
      EXPECT_TRUE(SameBits(pa.tensors[name], pb.tensors[name])) << name;
    }
  }
}

// ---------------------------------------------------------------------------
// SaveCheckpoint

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
  std::map<std::string, int> owner;
  for (const std::string& name : all) owner[name] = 0;
  v1::TrainerState trainer;
  trainer.set_step(1);
  *trainer.mutable_job() = job_;
  ASSERT_TRUE(
      WriteCheckpointIndex(step_dir, 1, *layout_, job_.optimizer().name(), owner, trainer).ok());

  absl::StatusOr<std::map<std::string, TensorState>> read =
      ReadCheckpointTensors(step_dir, *layout_, job_.model(), job_.optimizer().name(), all);
  ASSERT_TRUE(read.ok()) << read.status();
  int64_t bytes = 0;
  reference->Visit([&](const TensorInfo& info, const std::vector<float>& value,
                       const std::vector<float>& momentum, const std::vector<float>& exp_avg,
                       const std::vector<float>& exp_avg_sq) {
    const TensorState& got = read->at(info.name);
    EXPECT_TRUE(SameBits(got.value, value)) << info.name;
    EXPECT_TRUE(SameBits(got.momentum, momentum)) << info.name;
    EXPECT_TRUE(SameBits(got.exp_avg, exp_avg)) << info.name;
    EXPECT_TRUE(SameBits(got.exp_avg_sq, exp_avg_sq)) << info.name;
    bytes += static_cast<int64_t>(
        (value.size() + momentum.size() + exp_avg.size() + exp_avg_sq.size()) * sizeof(float));
  });
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

}  // namespace
}  // namespace muonps
