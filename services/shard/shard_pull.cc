// The pull path of the shard service: PullParameters streams a version of
// the shard's tensors once the shard has reached it.
#include <grpcpp/support/proto_buffer_reader.h>

#include <atomic>
#include <chrono>
#include <map>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "checkpoint/checkpoint.h"
#include "common/job_spec.h"
#include "rpc/metrics.h"
#include "rpc/reaction_order.h"
#include "rpc/rpc_util.h"
#include "rpc/tensor_stream.h"
#include "rpc/wire.h"
#include "services/shard/shard_service.h"

namespace muonps {

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
    ReactionOrder::Scope scope(&order_);
    error_ = service->Authorize(*context, /*worker_call=*/true);
    if (!error_.ok()) return;
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
  }

  // Starts the stream when its version is there or is being applied,
  // resumes it when the tensor it waits for has been published, finishes it
  // on an error or an expired wait, else keeps waiting. Safe to call at any
  // time.
  void Wake() {
    absl::MutexLock lock(&mu_);
    if (state_ != State::kWaiting && state_ != State::kWaitingTensor) return;
    if (!error_.ok()) return FinishLocked(ToGrpcStatus(error_));
    std::vector<std::string> names;
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
      if (state_ == State::kWaitingTensor) {
        if (service_->state_ != shard_) {
          return FinishLocked(Refuse(absl::StatusCode::kAborted,
                                     "the job was loaded again while the pull streamed"));
        }
      } else {
        names = request_.tensors().empty() ? service_->served_
                                           : std::vector<std::string>(request_.tensors().begin(),
                                                                      request_.tensors().end());
        // The version itself, or the next one, streamed tensor by tensor as
        // the step that makes it is applied. A shard that owns nothing
        // streams nothing once it is at the version.
        const int64_t reachable = service_->version_ + (names.empty() ? 0 : 1);
        if (reachable < request_.version()) {
          if (absl::Now() < deadline_) return;  // keep waiting
          return FinishLocked(NotReachedLocked(service_->version_));
        }
        shard_ = service_->state_;
      }
    }
    if (state_ == State::kWaiting) {
      if (names.empty()) {
        const int64_t now = shard_->served_version();
        if (now != request_.version()) {
          return FinishLocked(Refuse(absl::StatusCode::kFailedPrecondition,
                                     absl::StrCat("version: ", request_.version(),
                                                  " is gone; the shard is at version ", now)));
        }
      }
      for (const std::string& name : names) {
        if (!shard_->Holds(name)) {
          return FinishLocked(
              Refuse(absl::StatusCode::kNotFound,
                     absl::StrCat("tensors: ", name.substr(0, 256), " is not on this shard")));
        }
      }
      names_ = std::move(names);
      // The version's own field, in front of every message's chunk.
      prefix_ = EncodePullVersion(request_.version());
      dtype_ = TransferDtypeOf(shard_->job());
      start_ = std::chrono::steady_clock::now();
    }
    state_ = State::kStreaming;
    WriteNextLocked();
  }

  void OnWriteDone(bool ok) override {
    ReactionOrder::Scope scope(&order_);
    absl::MutexLock lock(&mu_);
    if (state_ != State::kStreaming) return;
    if (!ok)
      return FinishLocked(Refuse(absl::StatusCode::kCancelled, "the client closed the stream"));
    WriteNextLocked();
  }

  void OnCancel() override {
    ReactionOrder::Scope scope(&order_);
    absl::MutexLock lock(&mu_);
    if (state_ == State::kWaiting || state_ == State::kWaitingTensor) {
      FinishLocked(Refuse(absl::StatusCode::kCancelled, "cancelled"));
    }
  }

  // The service deletes the reactor (under its pull lock) once this is set.
  void OnDone() override {
    order_.Enter();
    done_.store(true);
  }

  // Called by PullParameters after its first Wake(): what the handler did
  // happens before the reactions.
  void HandlerReturns() { order_.Leave(); }
  bool done() const { return done_.load(); }

 private:
  // kWaiting: for the version (nothing sent); kWaitingTensor: for the next
  // tensor's new version, mid-stream.
  enum class State { kWaiting, kStreaming, kWaitingTensor, kFinished };

  grpc::Status NotReachedLocked(int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return Refuse(absl::StatusCode::kDeadlineExceeded,
                  absl::StrCat("version ", request_.version(), " not reached within ",
                               wait_seconds_, " s; the shard is at version ", now));
  }

  void WriteNextLocked() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    while (tensor_ < names_.size()) {
      if (tensor_ == values_.size()) {
        // The next tensor, once it is at the version: until then the stream
        // waits (Wake resumes it when a tensor is published).
        absl::StatusOr<std::optional<ShardState::Snapshot>> served =
            shard_->ServedTensor(names_[tensor_], request_.version());
        if (!served.ok()) return FinishLocked(ToGrpcStatus(served.status()));
        if (!served->has_value()) {
          if (absl::Now() >= deadline_) {
            return FinishLocked(Refuse(
                absl::StatusCode::kDeadlineExceeded,
                absl::StrCat("tensor ", names_[tensor_], " not at version ", request_.version(),
                             " within ", wait_seconds_, " s; the shard is at version ",
                             shard_->served_version(), " (its update is still running)")));
          }
          state_ = State::kWaitingTensor;
          return;
        }
        values_.emplace_back(shard_->layout().Find(names_[tensor_]), std::move(**served));
      }
      const TensorInfo& info = *values_[tensor_].first;
      const int64_t element = ElementBytes(dtype_);
      const int64_t total = info.numel * element;
      if (offset_ < total || (total == 0 && offset_ == 0 && !wrote_empty_)) {
        const int64_t step = ChunkPayloadBytes(chunk_bytes_, dtype_);
        const int64_t bytes = std::min(step, total - offset_);
        const float* values = values_[tensor_].second->data();
        const char* data = reinterpret_cast<const char*>(values) + offset_;
        if (dtype_ == TransferDtype::kBF16) {
          // Rounded chunk by chunk into a buffer the message references
          // until its write is done.
          encoded_.resize(static_cast<size_t>(bytes / element));
          EncodeBf16(values + offset_ / element, bytes / element, encoded_.data());
          data = reinterpret_cast<const char*>(encoded_.data());
        }
        out_ = ChunkMessage(
            prefix_, /*chunk_field=*/2,
            EncodeChunkHeader(info.name, offset_ == 0 ? &info.shape : nullptr, offset_, dtype_),
            data, bytes);
        offset_ += bytes;
        pulled_ += bytes;
        wrote_empty_ = total == 0;
        order_.Leave();
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
    order_.Leave();
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
  std::shared_ptr<ShardState> shard_ ABSL_GUARDED_BY(mu_);  // once streaming
  std::vector<std::string> names_ ABSL_GUARDED_BY(mu_);     // what it streams, in order
  // The tensors taken so far (names_' first ones), at the version.
  std::vector<std::pair<const TensorInfo*, ShardState::Snapshot>> values_ ABSL_GUARDED_BY(mu_);
  std::string prefix_ ABSL_GUARDED_BY(mu_);
  TransferDtype dtype_ ABSL_GUARDED_BY(mu_) = TransferDtype::kF32;
  std::vector<uint16_t> encoded_ ABSL_GUARDED_BY(mu_);  // the BF16 chunk in flight
  size_t tensor_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t offset_ ABSL_GUARDED_BY(mu_) = 0;
  bool wrote_empty_ ABSL_GUARDED_BY(mu_) = false;
  int64_t pulled_ ABSL_GUARDED_BY(mu_) = 0;
  grpc::ByteBuffer out_ ABSL_GUARDED_BY(mu_);
  std::chrono::steady_clock::time_point start_;
  std::atomic<bool> done_{false};
  ReactionOrder order_;
};

grpc::ServerWriteReactor<grpc::ByteBuffer>* ShardServiceImpl::PullParameters(
    grpc::CallbackServerContext* context, const grpc::ByteBuffer* request) {
  auto* reactor = new PullReactor(this, context, request);
  {
    absl::MutexLock lock(&pulls_mu_);
    pulls_.insert(reactor);
  }
  reactor->Wake();
  reactor->HandlerReturns();
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
    absl::MutexLock lock(&wake_mu_);
    timer_stop_ = true;
  }
  pull_timer_.join();
  absl::MutexLock lock(&pulls_mu_);
  for (PullReactor* reactor : pulls_) delete reactor;  // the server has stopped: all are done
}

void ShardServiceImpl::RequestWake() {
  absl::MutexLock lock(&wake_mu_);
  wake_requested_ = true;
}

void ShardServiceImpl::PullTimerLoop() {
  auto woken = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(wake_mu_) {
    return timer_stop_ || wake_requested_;
  };
  while (true) {
    {
      absl::MutexLock lock(&wake_mu_);
      wake_mu_.AwaitWithTimeout(absl::Condition(&woken), absl::Milliseconds(50));
      if (timer_stop_) return;
      wake_requested_ = false;
    }
    WakePulls();
  }
}

}  // namespace muonps
