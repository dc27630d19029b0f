// ShardServiceImpl behind a real GrpcServer on loopback, driven through the
// generated stub the way workers and the coordinator drive it. Every refusal
// carries the status shard.proto promises, names the field or tensor, and
// leaves the shard as it was (a following valid call behaves as if the bad
// one never came). Prefix-summed pushes end bit-identical to per-slot pushes,
// and a saved checkpoint reads back bit for bit. The independent reference
// is a ShardState driven in-process with the same gradients.
// (The shared fixture and helpers; the tests are in the files that include it.)
#ifndef MUONPS_TESTS_SHARD_SERVICE_FIXTURE_H_
#define MUONPS_TESTS_SHARD_SERVICE_FIXTURE_H_

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
#include "services/shard/shard_service.h"
#include "services/shard/shard_state.h"
#include "tests/test_util.h"

namespace muonps {

using ::testing::HasSubstr;

// Sizes: C = 16 hidden, E = 4 routed experts, 4 slots.
constexpr char kQ[] = "model.layers.0.self_attn.q_proj.weight";              // (C, C), Muon
constexpr char kNorm[] = "model.norm.weight";                                // (C), AdamW
constexpr char kBias[] = "model.layers.1.mlp.gate.e_score_correction_bias";  // (E), buffer
constexpr char kHead[] = "lm_head.weight";                                   // not owned
constexpr int kSlots = 4;

inline const std::vector<std::string>& Owned() {
  static const std::vector<std::string>* owned = new std::vector<std::string>{kQ, kNorm, kBias};
  return *owned;
}

inline v1::JobSpec TinyJob() {
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

inline std::unique_ptr<ShardServer> StartShard() {
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
inline std::vector<Grad> SlotGradients(const ModelLayout& layout,
                                       const std::vector<std::string>& names, int64_t step,
                                       int slot) {
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
inline std::vector<Grad> Sum(const std::vector<Grad>& a, const std::vector<Grad>& b) {
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
inline std::vector<v1::PushGradientsRequest> PushMessages(
    const PushHeader& header, const std::vector<Grad>& grads,
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

// The same with every gradient rounded to bf16 and sent as BF16 chunks of
// at most `chunk_bytes` (a transfer.dtype bf16 job's push).
inline std::vector<v1::PushGradientsRequest> PushMessagesBf16(
    const PushHeader& header, const std::vector<Grad>& grads,
    int64_t chunk_bytes = kDefaultChunkBytes) {
  std::vector<v1::PushGradientsRequest> out;
  for (const Grad& g : grads) {
    std::vector<uint16_t> bits(g.data.size());
    EncodeBf16(g.data.data(), static_cast<int64_t>(bits.size()), bits.data());
    const int64_t total = static_cast<int64_t>(bits.size()) * 2;
    const int64_t step = ChunkPayloadBytes(chunk_bytes, TransferDtype::kBF16);
    int64_t offset = 0;
    do {
      const int64_t bytes = std::min(step, total - offset);
      v1::PushGradientsRequest message;
      if (out.empty()) {
        message.set_job_id(header.job_id);
        message.set_step(header.step);
        message.set_slot(header.slot);
        message.set_slot_count(header.slot_count);
      }
      v1::TensorChunk* chunk = message.mutable_chunk();
      chunk->set_name(g.name);
      if (offset == 0) {
        for (int64_t d : g.shape) chunk->add_shape(d);
      }
      chunk->set_dtype("BF16");
      chunk->set_offset(offset);
      chunk->set_data(reinterpret_cast<const char*>(bits.data()) + offset,
                      static_cast<size_t>(bytes));
      out.push_back(std::move(message));
      offset += bytes;
    } while (offset < total);
  }
  return out;
}

inline grpc::Status Push(v1::ShardService::Stub* stub,
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
  int64_t bytes = 0;           // payload bytes in all
  bool versions_match = true;  // every message at the asked version
};

inline Pulled Pull(v1::ShardService::Stub* stub, const ModelLayout& layout,
                   const std::string& job_id, int64_t version,
                   const std::vector<std::string>& names = {}, double wait_seconds = 0.0,
                   int64_t max_chunk_bytes = 0, TransferDtype dtype = TransferDtype::kF32) {
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
    out.bytes += static_cast<int64_t>(chunk.data().size());
    if (out.order.empty() || out.order.back() != chunk.name()) {
      const TensorInfo* info = layout.Find(chunk.name());
      EXPECT_NE(info, nullptr) << chunk.name();
      if (info == nullptr) continue;
      out.order.push_back(chunk.name());
      std::vector<float>& buffer = out.tensors[chunk.name()];
      buffer.assign(info->numel, 0.0f);
      current = std::make_unique<TensorAssembler>(chunk.name(), info->shape, buffer.data(),
                                                  /*require_finite=*/true, dtype);
    }
    EXPECT_TRUE(current->Add(chunk).ok()) << chunk.name();
  }
  out.status = reader->Finish();
  return out;
}

inline std::string Describe(const grpc::Status& status) {
  return absl::StrCat("code ", status.error_code(), ": ", status.error_message());
}

// Bit equality of two float vectors.
inline bool SameBits(const std::vector<float>& a, const std::vector<float>& b) {
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

}  // namespace muonps

#endif  // MUONPS_TESTS_SHARD_SERVICE_FIXTURE_H_
