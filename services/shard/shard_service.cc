#include "services/shard/shard_service.h"

#include <grpcpp/support/proto_buffer_reader.h>

#include <atomic>
#include <chrono>
#include <limits>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "checkpoint/checkpoint.h"
#include "common/job_spec.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "google/protobuf/util/message_differencer.h"
#include "google/protobuf/wire_format_lite.h"
#include "rpc/metrics.h"
#include "rpc/rpc_util.h"
#include "rpc/tensor_stream.h"
#include "rpc/wire.h"

namespace muonps {
namespace {}  // namespace

ShardServiceImpl::Metrics::Metrics(prometheus::Registry& r)
    : tensors(NewGauge(r, "muonps_shard_tensors", "Tensors this shard holds")),
      parameter_bytes(NewGauge(r, "muonps_shard_parameter_bytes", "Bytes of parameters held")),
      state_bytes(NewGauge(r, "muonps_shard_optimizer_state_bytes",
                           "Bytes of optimizer state held (Muon momentum, AdamW moments)")),
      version(
          NewGauge(r, "muonps_shard_parameter_version", "Optimizer steps applied to the held job")),
      muon_rms(prometheus::BuildGauge()
                   .Name("muonps_shard_update_rms")
                   .Help("RMS of the latest step's parameter change, by optimizer")
                   .Register(r)
                   .Add({{"optimizer", "muon"}})),
      adamw_rms(prometheus::BuildGauge()
                    .Name("muonps_shard_update_rms")
                    .Help("RMS of the latest step's parameter change, by optimizer")
                    .Register(r)
                    .Add({{"optimizer", "adamw"}})),
      pushed_bytes(
          NewCounter(r, "muonps_shard_pushed_bytes_total", "Gradient bytes received by pushes")),
      pulled_bytes(
          NewCounter(r, "muonps_shard_pulled_bytes_total", "Parameter bytes sent by pulls")),
      steps(NewCounter(r, "muonps_shard_steps_total", "Optimizer steps applied")),
      push_seconds(NewHistogram(r, "muonps_shard_push_duration_seconds",
                                "Duration of a gradient push stream, first message to answer")),
      pull_seconds(NewHistogram(r, "muonps_shard_pull_duration_seconds",
                                "Duration of a parameter pull stream once its version is there")),
      apply_seconds(NewHistogram(r, "muonps_shard_apply_duration_seconds",
                                 "Wall time of applying one optimizer step on this shard")),
      muon_seconds(prometheus::BuildHistogram()
                       .Name("muonps_shard_tensor_update_duration_seconds")
                       .Help("Time of one tensor's update (Newton-Schulz for Muon), by optimizer")
                       .Register(r)
                       .Add({{"optimizer", "muon"}}, FineLatencyBuckets())),
      adamw_seconds(prometheus::BuildHistogram()
                        .Name("muonps_shard_tensor_update_duration_seconds")
                        .Help("Time of one tensor's update (Newton-Schulz for Muon), by optimizer")
                        .Register(r)
                        .Add({{"optimizer", "adamw"}}, FineLatencyBuckets())) {}

ShardServiceImpl::ShardServiceImpl(std::shared_ptr<prometheus::Registry> metrics)
    : registry_(metrics != nullptr ? std::move(metrics) : std::make_shared<prometheus::Registry>()),
      metrics_(*registry_) {
  pull_timer_ = std::thread([this] { PullTimerLoop(); });
}

void ShardServiceImpl::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;
  }
  WakePulls();
}

std::string ShardServiceImpl::job_id() const {
  absl::MutexLock lock(&mu_);
  return job_id_;
}

int64_t ShardServiceImpl::version() const {
  absl::MutexLock lock(&mu_);
  return version_;
}

absl::StatusOr<std::shared_ptr<ShardState>> ShardServiceImpl::Find(
    const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  if (state_ == nullptr || job_id != job_id_) {
    return absl::NotFoundError(
        absl::StrCat("job_id: this shard does not hold job \"", job_id, "\"",
                     job_id_.empty() ? "" : absl::StrCat(" (it holds ", job_id_, ")")));
  }
  return state_;
}

grpc::Status ShardServiceImpl::LoadJob(grpc::ServerContext*, const v1::LoadJobRequest* request,
                                       v1::LoadJobResponse* response) {
  if (request->job_id().empty()) {
    return Refuse(absl::StatusCode::kInvalidArgument, "job_id: must not be empty");
  }
  const std::vector<std::string> tensors(request->tensors().begin(), request->tensors().end());
  v1::JobSpec spec = request->spec();
  FillJobDefaults(&spec);
  {
    absl::MutexLock lock(&mu_);
    if (state_ != nullptr) {
      if (job_id_ == request->job_id() && tensors_ == tensors &&
          google::protobuf::util::MessageDifferencer::Equals(state_->job(), spec)) {
        response->set_version(version_);
        return grpc::Status::OK;  // a repeated load
      }
      if (!request->replace()) {
        return Refuse(absl::StatusCode::kFailedPrecondition,
                      absl::StrCat("this shard holds job ", job_id_, "; drop it first"));
      }
    }
  }
  if (absl::Status st = ValidateJobSpec(spec); !st.ok()) return ToGrpcStatus(st);
  absl::StatusOr<std::unique_ptr<ShardState>> created = ShardState::Create(spec, tensors);
  if (!created.ok()) return ToGrpcStatus(created.status());
  std::shared_ptr<ShardState> state = std::move(*created);
  if (!request->resume_from().empty()) {
    absl::StatusOr<std::string> dir = ResolveCheckpointDir(request->resume_from());
    if (!dir.ok()) return ToGrpcStatus(dir.status());
    absl::StatusOr<v1::TrainerState> trainer = ReadTrainerState(*dir);
    if (!trainer.ok()) return ToGrpcStatus(trainer.status());
    absl::StatusOr<std::map<std::string, TensorState>> values = ReadCheckpointTensors(
        *dir, state->layout(), spec.model(), spec.optimizer().name(), tensors);
    if (!values.ok()) return ToGrpcStatus(values.status());
    for (auto& [name, v] : *values) {
      absl::Status st = state->Restore(name, std::move(v.value), std::move(v.momentum),
                                       std::move(v.exp_avg), std::move(v.exp_avg_sq));
      if (!st.ok()) return ToGrpcStatus(st);
    }
    state->set_version(trainer->step());
    *response->mutable_checkpoint_numerics() = trainer->numerics();
  }
  absl::Status installed =
      Install(request->job_id(), tensors, std::move(state), request->replace());
  if (!installed.ok()) return ToGrpcStatus(installed);
  response->set_version(version());
  WakePulls();
  return grpc::Status::OK;
}

absl::Status ShardServiceImpl::Install(const std::string& job_id,
                                       const std::vector<std::string>& tensors,
                                       std::shared_ptr<ShardState> state, bool replace) {
  absl::MutexLock lock(&mu_);
  if (state_ != nullptr && !replace) {
    return absl::FailedPreconditionError(
        absl::StrCat("this shard holds job ", job_id_, "; drop it first"));
  }
  job_id_ = job_id;
  tensors_ = tensors;
  version_ = state->version();
  int64_t params = 0, optimizer_state = 0;
  state->Visit([&](const TensorInfo&, const std::vector<float>& value,
                   const std::vector<float>& momentum, const std::vector<float>& exp_avg,
                   const std::vector<float>& exp_avg_sq) {
    params += static_cast<int64_t>(value.size() * sizeof(float));
    optimizer_state += static_cast<int64_t>((momentum.size() + exp_avg.size() + exp_avg_sq.size()) *
                                            sizeof(float));
  });
  metrics_.tensors.Set(static_cast<double>(tensors.size()));
  metrics_.parameter_bytes.Set(static_cast<double>(params));
  metrics_.state_bytes.Set(static_cast<double>(optimizer_state));
  metrics_.version.Set(static_cast<double>(version_));
  state_ = std::move(state);
  return absl::OkStatus();
}

grpc::Status ShardServiceImpl::DropJob(grpc::ServerContext*, const v1::DropJobRequest* request,
                                       v1::DropJobResponse*) {
  {
    absl::MutexLock lock(&mu_);
    if (job_id_ == request->job_id()) {
      job_id_.clear();
      tensors_.clear();
      state_.reset();
      version_ = 0;
      metrics_.tensors.Set(0);
      metrics_.parameter_bytes.Set(0);
      metrics_.state_bytes.Set(0);
      metrics_.version.Set(0);
    }
  }
  WakePulls();
  return grpc::Status::OK;
}

// PullParameters as a raw callback method: it waits for its version without
// holding a thread (the service wakes waiting pulls when the version, the
// job or the shutdown state changes, and every 50 ms for deadlines), then
// streams the version's snapshot as messages whose payload slices point at
// the snapshot itself.
class ShardServiceImpl::PullReactor final : public grpc::ServerWriteReactor<grpc::ByteBuffer> {
 public:
  PullReactor(ShardServiceImpl* service, grpc::CallbackServerContext* context,
              const grpc::ByteBuffer* request)
      : service_(service) {
    grpc::ByteBuffer copy(*request);
    grpc::ProtoBufferReader stream(&copy);
    if (!request_.ParseFromZeroCopyStream(&stream)) {
      error_ = absl::InvalidArgumentError("malformed PullParametersRequest");
      return;
    }
    chunk_bytes_ =
        request_.max_chunk_bytes() == 0 ? kDefaultChunkBytes : request_.max_chunk_bytes();
    if (chunk_bytes_ < 4 || chunk_bytes_ > kMaxChunkBytes) {
      error_ = absl::InvalidArgumentError(absl::StrCat("max_chunk_bytes: must be in [4, ",
                                                       kMaxChunkBytes, "], got ",
                                                       request_.max_chunk_bytes()));
    } else if (request_.version() < 0) {
      error_ = absl::InvalidArgumentError("version: must be >= 0");
    }
    wait_seconds_ = std::min(600.0, std::max(0.0, request_.wait_seconds()));
    deadline_ = absl::Now() + absl::Seconds(wait_seconds_);
    (void)context;
  }

  // Starts the stream when its version is there, finishes it on an error or
  // an expired wait, else keeps waiting. Safe to call at any time.
  void Wake() {
    absl::MutexLock lock(&mu_);
    if (state_ != State::kWaiting) return;
    if (!error_.ok()) return FinishLocked(ToGrpcStatus(error_));
    std::shared_ptr<ShardState> shard;
    {
      absl::MutexLock service_lock(&service_->mu_);
      if (service_->shutdown_) {
        return FinishLocked(Refuse(absl::StatusCode::kUnavailable, "shard is shutting down"));
      }
      if (service_->state_ == nullptr || service_->job_id_ != request_.job_id()) {
        return FinishLocked(Refuse(
            absl::StatusCode::kNotFound,
            absl::StrCat("job_id: this shard does not hold job \"", request_.job_id(), "\"")));
      }
      if (service_->version_ < request_.version()) {
        if (absl::Now() < deadline_) return;  // keep waiting
        return FinishLocked(Refuse(
            absl::StatusCode::kDeadlineExceeded,
            absl::StrCat("version ", request_.version(), " not reached within ", wait_seconds_,
                         " s; the shard is at version ", service_->version_)));
      }
      shard = service_->state_;
    }
    const std::vector<std::string> names(request_.tensors().begin(), request_.tensors().end());
    absl::StatusOr<int64_t> version = shard->Parameters(names, &values_);
    if (!version.ok()) return FinishLocked(ToGrpcStatus(version.status()));
    if (*version != request_.version()) {
      return FinishLocked(Refuse(absl::StatusCode::kFailedPrecondition,
                                 absl::StrCat("version: ", request_.version(),
                                              " is gone; the shard is at version ", *version)));
    }
    // The version's own field, in front of every message's chunk.
    {
      google::protobuf::io::StringOutputStream stream(&prefix_);
      google::protobuf::io::CodedOutputStream coded(&stream);
      if (*version != 0)
        google::protobuf::internal::WireFormatLite::WriteInt64(
            v1::PullParametersResponse::kVersionFieldNumber, *version, &coded);
    }
    state_ = State::kStreaming;
    start_ = std::chrono::steady_clock::now();
    WriteNextLocked();
  }

  void OnWriteDone(bool ok) override {
    absl::MutexLock lock(&mu_);
    if (state_ != State::kStreaming) return;
    if (!ok)
      return FinishLocked(Refuse(absl::StatusCode::kCancelled, "the client closed the stream"));
    WriteNextLocked();
  }

  void OnCancel() override {
    absl::MutexLock lock(&mu_);
    if (state_ == State::kWaiting) FinishLocked(Refuse(absl::StatusCode::kCancelled, "cancelled"));
  }

  // The service deletes the reactor (under its pull lock) once this is set.
  void OnDone() override { done_.store(true); }
  bool done() const { return done_.load(); }

 private:
  enum class State { kWaiting, kStreaming, kFinished };

  void WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    while (tensor_ < values_.size()) {
      const TensorInfo& info = *values_[tensor_].first;
      const int64_t total = info.numel * static_cast<int64_t>(sizeof(float));
      if (offset_ < total || (total == 0 && offset_ == 0 && !wrote_empty_)) {
        const int64_t step = ChunkPayloadBytes(chunk_bytes_);
        const int64_t bytes = std::min(step, total - offset_);
        const char* data = reinterpret_cast<const char*>(values_[tensor_].second->data());
        out_ = ChunkMessage(
            prefix_, /*chunk_field=*/2,
            EncodeChunkHeader(info.name, offset_ == 0 ? &info.shape : nullptr, offset_),
            data + offset_, bytes);
        offset_ += bytes;
        pulled_ += bytes;
        wrote_empty_ = total == 0;
        StartWrite(&out_);
        return;
      }
      ++tensor_;
      offset_ = 0;
      wrote_empty_ = false;
    }
    service_->metrics_.pulled_bytes.Increment(static_cast<double>(pulled_));
    service_->metrics_.pull_seconds.Observe(
        std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count());
    FinishLocked(grpc::Status::OK);
  }

  void FinishLocked(const grpc::Status& status) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (state_ == State::kFinished) return;
    state_ = State::kFinished;
    Finish(status);
  }

  ShardServiceImpl* service_;
  v1::PullParametersRequest request_;
  absl::Status error_;
  int64_t chunk_bytes_ = kDefaultChunkBytes;
  double wait_seconds_ = 0.0;
  absl::Time deadline_;
  absl::Mutex mu_;
  State state_ ABSL_GUARDED_BY(mu_) = State::kWaiting;
  std::vector<std::pair<const TensorInfo*, ShardState::Snapshot>> values_ ABSL_GUARDED_BY(mu_);
  std::string prefix_ ABSL_GUARDED_BY(mu_);
  size_t tensor_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t offset_ ABSL_GUARDED_BY(mu_) = 0;
  bool wrote_empty_ ABSL_GUARDED_BY(mu_) = false;
  int64_t pulled_ ABSL_GUARDED_BY(mu_) = 0;
  grpc::ByteBuffer out_ ABSL_GUARDED_BY(mu_);
  std::chrono::steady_clock::time_point start_;
  std::atomic<bool> done_{false};
};

grpc::ServerWriteReactor<grpc::ByteBuffer>* ShardServiceImpl::PullParameters(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  auto* reactor = new PullReactor(this, context, request);
  {
    absl::MutexLock lock(&pulls_mu_);
    pulls_.insert(reactor);
  }
  reactor->Wake();
  return reactor;
}

void ShardServiceImpl::WakePulls() {
  absl::MutexLock lock(&pulls_mu_);
  for (auto it = pulls_.begin(); it != pulls_.end();) {
    PullReactor* reactor = *it;
    if (reactor->done()) {
      it = pulls_.erase(it);
      delete reactor;
    } else {
      reactor->Wake();
      ++it;
    }
  }
}

ShardServiceImpl::~ShardServiceImpl() {
  {
    absl::MutexLock lock(&mu_);
    timer_stop_ = true;
  }
  pull_timer_.join();
  absl::MutexLock lock(&pulls_mu_);
  for (PullReactor* reactor : pulls_) delete reactor;  // the server has stopped: all are done
}

void ShardServiceImpl::PullTimerLoop() {
  while (true) {
    {
      absl::MutexLock lock(&mu_);
      if (mu_.AwaitWithTimeout(absl::Condition(&timer_stop_), absl::Milliseconds(50))) return;
    }
    WakePulls();
  }
}

// One gradient push, message by message: the first message names the job,
// step and slot range; chunks are assembled into buffers recycled by the
// shard; the whole push is handed to ShardState at the end, or refused with
// the first error (later messages are then only drained).
class ShardServiceImpl::PushSession {
 public:
  explicit PushSession(ShardServiceImpl* service) : service_(service) {}

  struct Fields {
    std::string job_id;
    int64_t step = 0;
    int slot = 0, slot_count = 0;
  };

  bool failed() const { return !failed_.ok(); }

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
        if (absl::Status st = current_->Finish(); !st.ok()) return Fail(st);
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
      // Finiteness is checked once, by ShardState, before anything is kept.
      current_ = std::make_unique<TensorAssembler>(header.name(), info->shape, buffer.data(),
                                                   /*require_finite=*/false);
    }
    absl::StatusOr<char*> dst = current_->Reserve(header, bytes);
    if (!dst.ok()) return Fail(dst.status());
    last_ = *dst;
    last_offset_ = header.offset();
    return dst;
  }

  absl::Status Commit(int64_t bytes) {
    // Checked now, while the chunk is in cache, not later over the whole push.
    const int64_t bad = FirstNonFinite(last_, bytes / static_cast<int64_t>(sizeof(float)));
    if (bad >= 0) {
      return Fail(absl::InvalidArgumentError(
          absl::StrCat("tensor ", current_->name(), ": non-finite gradient value at element ",
                       last_offset_ / static_cast<int64_t>(sizeof(float)) + bad)));
    }
    if (absl::Status st = current_->Commit(bytes); !st.ok()) return Fail(st);
    bytes_ += bytes;
    return absl::OkStatus();
  }

  // Records a refusal (the first one wins) and returns it.
  absl::Status Fail(const absl::Status& status) {
    if (failed_.ok()) failed_ = status;
    return failed_;
  }

  // After the last message.
  grpc::Status Finish(v1::PushGradientsResponse* response) {
    if (first_) return Refuse(absl::StatusCode::kInvalidArgument, "empty push: no messages");
    if (failed_.ok() && current_ != nullptr) failed_ = current_->Finish();
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
                       /*finite_checked=*/true});
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
        state_->AddGradients(fields_.step, fields_.slot, fields_.slot_count, grads);
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
  std::map<std::string, std::vector<float>> buffers_;
  std::unique_ptr<TensorAssembler> current_;
  char* last_ = nullptr;  // the chunk being received
  int64_t last_offset_ = 0;
  int64_t bytes_ = 0;
  absl::Status failed_;
  std::chrono::steady_clock::time_point start_;
};

// PushGradients served from gRPC's receive buffers: each message is decoded
// in place and its payload copied once, into the buffer it is assembled in.
class ShardServiceImpl::PushReactor final : public grpc::ServerReadReactor<grpc::ByteBuffer> {
 public:
  PushReactor(ShardServiceImpl* service, grpc::ByteBuffer* response)
      : session_(service), response_(response) {
    StartRead(&buffer_);
  }

  void OnReadDone(bool ok) override {
    if (!ok) {  // the client closed its side (or the call ended)
      v1::PushGradientsResponse response;
      const grpc::Status status = session_.Finish(&response);
      if (status.ok()) {
        grpc::Slice slice(response.SerializeAsString());
        *response_ = grpc::ByteBuffer(&slice, 1);
      }
      Finish(status);
      return;
    }
    if (!session_.failed()) Decode();
    buffer_.Clear();
    StartRead(&buffer_);
  }

  void OnDone() override { delete this; }

 private:
  // Field numbers of shard.proto's PushGradientsRequest.
  enum : int {
    kJobId = v1::PushGradientsRequest::kJobIdFieldNumber,
    kStep = v1::PushGradientsRequest::kStepFieldNumber,
    kSlot = v1::PushGradientsRequest::kSlotFieldNumber,
    kSlotCount = v1::PushGradientsRequest::kSlotCountFieldNumber,
    kChunk = v1::PushGradientsRequest::kChunkFieldNumber,
  };

  void Decode() {
    using google::protobuf::internal::WireFormatLite;
    grpc::ProtoBufferReader stream(&buffer_);
    google::protobuf::io::CodedInputStream in(&stream);
    in.SetTotalBytesLimit(std::numeric_limits<int>::max());
    auto malformed = [&] {
      (void)session_.Fail(absl::InvalidArgumentError("malformed PushGradientsRequest"));
    };
    PushSession::Fields fields;
    bool begun = false;
    while (uint32_t tag = in.ReadTag()) {
      const int field = WireFormatLite::GetTagFieldNumber(tag);
      const auto type = WireFormatLite::GetTagWireType(tag);
      uint64_t v = 0;
      if (field == kJobId && type == WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
        if (!WireFormatLite::ReadString(&in, &fields.job_id)) return malformed();
      } else if ((field == kStep || field == kSlot || field == kSlotCount) &&
                 type == WireFormatLite::WIRETYPE_VARINT) {
        if (!in.ReadVarint64(&v)) return malformed();
        if (field == kStep) fields.step = static_cast<int64_t>(v);
        if (field == kSlot) fields.slot = static_cast<int32_t>(v);
        if (field == kSlotCount) fields.slot_count = static_cast<int32_t>(v);
      } else if (field == kChunk && type == WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
        // The request's own fields come first (protobuf writes fields in number order).
        session_.Begin(fields);
        begun = true;
        if (session_.failed()) return;
        uint32_t length = 0;
        if (!in.ReadVarint32(&length)) return malformed();
        absl::Status st = ReadChunk(
            &in, length,
            [&](const v1::TensorChunk& header, int64_t bytes) {
              return session_.Reserve(header, bytes);
            },
            [&](int64_t bytes) { return session_.Commit(bytes); }, "PushGradientsRequest");
        if (!st.ok()) (void)session_.Fail(st);
        if (session_.failed()) return;
      } else if (!WireFormatLite::SkipField(&in, tag)) {
        return malformed();
      }
    }
    if (!begun) {  // a message without a chunk: its fields still count
      session_.Begin(fields);
      if (!session_.failed()) {
        (void)session_.Fail(
            absl::InvalidArgumentError("chunk: a push message must carry a tensor chunk"));
      }
    }
  }

  PushSession session_;
  grpc::ByteBuffer* response_;
  grpc::ByteBuffer buffer_;
};

grpc::ServerReadReactor<grpc::ByteBuffer>* ShardServiceImpl::PushGradients(
    grpc::CallbackServerContext*, grpc::ByteBuffer* response) {
  return new PushReactor(this, response);
}

grpc::Status ShardServiceImpl::GetGradientSquares(grpc::ServerContext*,
                                                  const v1::GetGradientSquaresRequest* request,
                                                  v1::GetGradientSquaresResponse* response) {
  absl::StatusOr<std::shared_ptr<ShardState>> state = Find(request->job_id());
  if (!state.ok()) return ToGrpcStatus(state.status());
  if ((*state)->version() != request->step()) {
    return Refuse(
        absl::StatusCode::kFailedPrecondition,
        absl::StrCat("step: ", request->step(), ", the shard is at step ", (*state)->version()));
  }
  absl::StatusOr<std::vector<std::pair<std::string, double>>> squares = (*state)->GradientSquares();
  if (!squares.ok()) return ToGrpcStatus(squares.status());
  for (const auto& [name, sq] : *squares) {
    v1::TensorSquares* t = response->add_tensors();
    t->set_name(name);
    t->set_sum_of_squares(sq);
  }
  return grpc::Status::OK;
}

grpc::Status ShardServiceImpl::ApplyStep(grpc::ServerContext*, const v1::ApplyStepRequest* request,
                                         v1::ApplyStepResponse* response) {
  absl::StatusOr<std::shared_ptr<ShardState>> state = Find(request->job_id());
  if (!state.ok()) return ToGrpcStatus(state.status());
  if (!(request->lr() >= 0.0) || !std::isfinite(request->lr())) {
    return Refuse(absl::StatusCode::kInvalidArgument, "lr: must be finite and >= 0");
  }
  if (!(request->clip_coef() > 0.0) || !std::isfinite(request->clip_coef())) {
    return Refuse(absl::StatusCode::kInvalidArgument, "clip_coef: must be finite and > 0");
  }
  const int64_t now = (*state)->version();
  if (now > 0 && request->step() == now - 1) {
    response->set_version(now);  // a repeat of the step just applied
    return grpc::Status::OK;
  }
  std::vector<std::vector<int64_t>> loads;
  for (const v1::ExpertLoad& layer : request->expert_load()) {
    loads.emplace_back(layer.tokens().begin(), layer.tokens().end());
  }
  const auto t0 = std::chrono::steady_clock::now();
  ShardState::ApplyStats stats;
  absl::Status st =
      (*state)->ApplyStep(request->step(), request->lr(), request->clip_coef(), loads, &stats);
  if (!st.ok()) return ToGrpcStatus(st);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  response->set_seconds(seconds);
  metrics_.apply_seconds.Observe(seconds);
  metrics_.steps.Increment();
  for (const auto& [muon, s] : stats.tensor_seconds)
    (muon ? metrics_.muon_seconds : metrics_.adamw_seconds).Observe(s);
  if (stats.muon_numel > 0)
    metrics_.muon_rms.Set(std::sqrt(stats.muon_update_sq / stats.muon_numel));
  if (stats.adamw_numel > 0)
    metrics_.adamw_rms.Set(std::sqrt(stats.adamw_update_sq / stats.adamw_numel));
  {
    absl::MutexLock lock(&mu_);
    if (state_ == *state) version_ = state_->version();
    metrics_.version.Set(static_cast<double>(version_));
    response->set_version(version_);
  }
  WakePulls();
  return grpc::Status::OK;
}

grpc::Status ShardServiceImpl::SaveCheckpoint(grpc::ServerContext*,
                                              const v1::SaveCheckpointRequest* request,
                                              v1::SaveCheckpointResponse* response) {
  absl::StatusOr<std::shared_ptr<ShardState>> state = Find(request->job_id());
  if (!state.ok()) return ToGrpcStatus(state.status());
  if (request->shard_count() < 1 || request->shard_index() < 0 ||
      request->shard_index() >= request->shard_count()) {
    return Refuse(absl::StatusCode::kInvalidArgument,
                  absl::StrCat("shard_index: ", request->shard_index(), " not in [0, ",
                               request->shard_count(), ")"));
  }
  if (request->dir().empty()) return Refuse(absl::StatusCode::kInvalidArgument, "dir: empty");
  // Copies under the state's lock, written without it.
  std::vector<TensorState> copies;
  std::vector<const TensorInfo*> infos;
  const int64_t version =
      (*state)->Visit([&](const TensorInfo& info, const std::vector<float>& value,
                          const std::vector<float>& momentum, const std::vector<float>& exp_avg,
                          const std::vector<float>& exp_avg_sq) {
        infos.push_back(&info);
        copies.push_back(TensorState{value, momentum, exp_avg, exp_avg_sq});
      });
  if (version != request->version()) {
    return Refuse(absl::StatusCode::kFailedPrecondition,
                  absl::StrCat("version: checkpoint asked at version ", request->version(),
                               ", the shard is at ", version));
  }
  std::vector<std::pair<const TensorInfo*, const TensorState*>> tensors;
  int64_t bytes = 0;
  for (size_t i = 0; i < infos.size(); ++i) {
    tensors.emplace_back(infos[i], &copies[i]);
    const TensorState& c = copies[i];
    bytes += static_cast<int64_t>(
        (c.value.size() + c.momentum.size() + c.exp_avg.size() + c.exp_avg_sq.size()) *
        sizeof(float));
  }
  absl::Status st =
      WriteCheckpointShard(request->dir(), request->shard_index(), request->shard_count(),
                           (*state)->layout(), (*state)->job().optimizer().name(), tensors);
  if (!st.ok()) return ToGrpcStatus(st);
  response->set_bytes(bytes);
  return grpc::Status::OK;
}

}  // namespace muonps
