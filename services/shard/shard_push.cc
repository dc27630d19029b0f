// The push path of the shard service: PushGradients assembles a stream of
// gradient chunks and hands the whole push to ShardState.
#include <grpcpp/support/proto_buffer_reader.h>

#include <chrono>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "checkpoint/checkpoint.h"
#include "common/job_spec.h"
#include "common/status_macros.h"
#include "optim/grad_norm.h"
#include "rpc/metrics.h"
#include "rpc/reaction_order.h"
#include "rpc/rpc_util.h"
#include "rpc/tensor_stream.h"
#include "rpc/wire.h"
#include "services/shard/shard_service.h"

namespace muonps {

// One gradient push, message by message: the first message names the job,
// step and slot range; chunks are assembled into buffers recycled by the
// shard; the whole push is handed to ShardState at the end, or refused with
// the first error (later messages are then only drained).
class ShardServiceImpl::PushSession {
 public:
  explicit PushSession(ShardServiceImpl* service) : service_(service) {}
  // The job's load the push was authorized under (Authorize).
  void set_run(int64_t run) { run_ = run; }

  using Fields = PushFields;

  bool failed() const { return !failed_.ok(); }
  // OK, or the refusal recorded so far.
  const absl::Status& status() const { return failed_; }

  // The request's own fields of the next message.
  void Begin(const Fields& fields) {
    if (failed()) return;
    if (first_) {
      first_ = false;
      start_ = std::chrono::steady_clock::now();
      fields_ = fields;
      if (fields_.slot_count == 0) fields_.slot_count = 1;
      absl::StatusOr<std::shared_ptr<ShardState>> found = service_->Find(fields_.job_id);
      if (!found.ok()) {
        failed_ = found.status();
        return;
      }
      state_ = *found;
    } else if ((!fields.job_id.empty() && fields.job_id != fields_.job_id) ||
               (fields.step != 0 && fields.step != fields_.step) ||
               (fields.slot != 0 && fields.slot != fields_.slot) ||
               (fields.slot_count != 0 && fields.slot_count != fields_.slot_count)) {
      failed_ = absl::InvalidArgumentError(
          "job_id/step/slot/slot_count: later messages of a push must repeat the first's values "
          "or leave them unset");
    }
  }

  // Where the next `bytes` of the chunk `header` go.
  absl::StatusOr<char*> Reserve(const v1::TensorChunk& header, int64_t bytes) {
    if (failed()) return failed_;
    if (bytes > kMaxChunkBytes) {
      return Fail(absl::ResourceExhaustedError(absl::StrCat("tensor ", header.name(), ": chunk of ",
                                                            bytes, " bytes, over the ",
                                                            kMaxChunkBytes, "-byte limit")));
    }
    if (current_ == nullptr || header.name() != current_->name()) {
      if (current_ != nullptr) {
        if (absl::Status st = EndTensor(); !st.ok()) return Fail(st);
      }
      const TensorInfo* info = state_->layout().Find(header.name());
      if (info == nullptr || !state_->Owns(header.name())) {
        return Fail(
            absl::NotFoundError(absl::StrCat("tensor ", header.name(), " is not on this shard")));
      }
      if (buffers_.count(header.name()) != 0) {
        return Fail(absl::InvalidArgumentError(
            absl::StrCat("tensor ", header.name(), " appears twice in one push")));
      }
      std::vector<float>& buffer = buffers_[header.name()];
      buffer = state_->TakeBuffer(info->numel);
      current_buffer_ = buffer.data();
      current_squares_ = std::make_unique<SumOfSquaresStream>(buffer.data(), info->numel);
      // Finiteness is checked here, chunk by chunk (Commit).
      current_ = std::make_unique<TensorAssembler>(header.name(), info->shape, buffer.data(),
                                                   /*require_finite=*/false,
                                                   TransferDtypeOf(state_->job()));
    }
    absl::StatusOr<char*> dst = current_->Reserve(header, bytes);
    if (!dst.ok()) return Fail(dst.status());
    return dst;
  }

  absl::Status Commit(int64_t bytes) {
    const int64_t first = current_->received_elements();
    if (absl::Status st = current_->Commit(bytes); !st.ok()) return Fail(st);
    // Checked now, while the chunk is in cache, not later over the whole push
    // (a BF16 value that is not finite widens to one that is not either).
    const int64_t count = current_->received_elements() - first;
    const int64_t bad =
        FirstNonFinite(reinterpret_cast<const char*>(current_buffer_ + first), count);
    if (bad >= 0) {
      return Fail(absl::InvalidArgumentError(absl::StrCat(
          "tensor ", current_->name(), ": non-finite gradient value at element ", first + bad)));
    }
    // Reduced as it arrives, while in cache: -0 becomes +0 (what the shard's
    // sum 0 + g makes of it, so a push of every slot is that sum already),
    // and the sum of squares advances.
    float* values = current_buffer_ + first;
    for (int64_t i = 0; i < count; ++i) values[i] += 0.0f;
    current_squares_->Filled(current_->received_elements());
    bytes_ += bytes;
    return absl::OkStatus();
  }

  // The current tensor is complete: its sum of squares is final.
  absl::Status EndTensor() {
    MUONPS_RETURN_IF_ERROR(current_->Finish());
    squares_[current_->name()] = current_squares_->Total();
    return absl::OkStatus();
  }

  // Records a refusal (the first one wins) and returns it.
  absl::Status Fail(const absl::Status& status) {
    if (failed_.ok()) failed_ = status;
    return failed_;
  }

  // After the last message.
  grpc::Status Finish(v1::PushGradientsResponse* response) {
    if (!failed_.ok()) return ToGrpcStatus(failed_);
    if (first_) return Refuse(absl::StatusCode::kInvalidArgument, "empty push: no messages");
    if (failed_.ok() && current_ != nullptr) failed_ = EndTensor();
    if (!failed_.ok()) return ToGrpcStatus(failed_);
    std::vector<ShardState::Gradient> grads;
    for (const TensorInfo* info : state_->Trainable()) {
      auto it = buffers_.find(info->name);
      if (it == buffers_.end()) {
        return Refuse(absl::StatusCode::kInvalidArgument,
                      absl::StrCat("tensor ", info->name,
                                   ": missing from the push (a push carries every trainable "
                                   "tensor the shard owns)"));
      }
      grads.push_back({info->name, it->second.data(), info->numel, &it->second,
                       /*finite_checked=*/true, squares_.at(info->name)});
    }
    if (grads.size() != buffers_.size()) {
      for (const auto& [name, buffer] : buffers_) {
        const TensorInfo* info = state_->layout().Find(name);
        if (!info->trainable()) {
          return Refuse(absl::StatusCode::kFailedPrecondition,
                        absl::StrCat("tensor ", name, " is a buffer: it takes no gradient"));
        }
      }
    }
    absl::StatusOr<bool> counted =
        state_->AddGradients(fields_.step, fields_.slot, fields_.slot_count, grads, run_);
    if (!counted.ok()) return ToGrpcStatus(counted.status());
    response->set_counted(*counted);
    response->set_tensors(static_cast<int32_t>(grads.size()));
    response->set_bytes(bytes_);
    service_->metrics_.pushed_bytes.Increment(static_cast<double>(bytes_));
    service_->metrics_.push_seconds.Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
    return grpc::Status::OK;
  }

 private:
  ShardServiceImpl* service_;
  bool first_ = true;
  Fields fields_;
  std::shared_ptr<ShardState> state_;
  int64_t run_ = -1;
  std::map<std::string, std::vector<float>> buffers_;
  std::unique_ptr<TensorAssembler> current_;
  float* current_buffer_ = nullptr;                      // where current_ assembles
  std::unique_ptr<SumOfSquaresStream> current_squares_;  // of current_buffer_
  std::map<std::string, double> squares_;                // of the complete tensors
  int64_t bytes_ = 0;
  absl::Status failed_;
  std::chrono::steady_clock::time_point start_;
};

// PushGradients served from gRPC's receive buffers: each message is decoded
// in place and its payload copied once, into the buffer it is assembled in.
class ShardServiceImpl::PushReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  PushReactor(ShardServiceImpl* service, grpc::CallbackServerContext* context,
              grpc::ByteBuffer* response)
      : session_(service), response_(response) {
    ReactionOrder::Scope scope(&order_);
    // An unauthorized push is refused; its messages are only drained.
    int64_t run = 0;
    if (absl::Status st = service->Authorize(*context, /*worker_call=*/true, &run); !st.ok()) {
      (void)session_.Fail(st);
    }
    session_.set_run(run);
    order_.Leave();
    StartRead(&buffer_);
  }

  void OnReadDone(bool ok) override {
    ReactionOrder::Scope scope(&order_);
    if (!ok) {  // the client closed its side (or the call ended)
      v1::PushGradientsResponse response;
      const grpc::Status status = session_.Finish(&response);
      if (status.ok()) {
        grpc::Slice slice(response.SerializeAsString());
        *response_ = grpc::ByteBuffer(&slice, 1);
      }
      order_.Leave();
      Finish(status);
      return;
    }
    if (!session_.failed()) Decode();
    buffer_.Clear();
    order_.Leave();
    StartRead(&buffer_);
  }

  void OnDone() override {
    order_.Enter();
    delete this;
  }

 private:
  void Decode() {
    grpc::ProtoBufferReader stream(&buffer_);
    const absl::Status st = DecodePush(
        &stream,
        [&](const PushFields& fields, bool has_chunk) -> absl::Status {
          session_.Begin(fields);
          if (!session_.failed() && !has_chunk) {
            return absl::InvalidArgumentError("chunk: a push message must carry a tensor chunk");
          }
          return session_.status();
        },
        [&](const v1::TensorChunk& header, int64_t bytes) {
          return session_.Reserve(header, bytes);
        },
        [&](int64_t bytes) { return session_.Commit(bytes); });
    if (!st.ok()) (void)session_.Fail(st);
  }

  PushSession session_;
  grpc::ByteBuffer* response_;
  grpc::ByteBuffer buffer_;
  ReactionOrder order_;
};

grpc::ServerReadReactor<grpc::ByteBuffer>* ShardServiceImpl::PushGradients(
    grpc::CallbackServerContext* context, grpc::ByteBuffer* response) {
  return new PushReactor(this, context, response);
}

}  // namespace muonps
