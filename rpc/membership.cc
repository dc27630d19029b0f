#include "rpc/membership.h"

#include <chrono>

#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "common/numerics.h"
#include "rpc/auth.h"
#include "rpc/rpc_util.h"

namespace muonps {

Membership::Membership(Kind kind, const std::string& coordinator, const std::string& address,
                       int threads, std::string cluster_secret, int64_t memory_bytes)
    : kind_(kind),
      coordinator_(coordinator),
      address_(address),
      threads_(threads),
      cluster_secret_(std::move(cluster_secret)),
      memory_bytes_(memory_bytes),
      stub_(v1::ClusterService::NewStub(MakeChannel(coordinator))) {}

Membership::~Membership() { Stop(); }

absl::Status Membership::RegisterOnce() {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(5.0));
  if (!cluster_secret_.empty()) context.AddMetadata(kClusterSecretHeader, cluster_secret_);
  std::string id, secret;
  double heartbeat = 0.5;
  grpc::Status status;
  if (kind_ == Kind::kShard) {
    v1::RegisterShardRequest request;
    request.set_address(address_);
    *request.mutable_numerics() = LocalNumerics();
    request.mutable_numerics()->set_device(device_);
    request.set_memory_bytes(memory_bytes_);
    v1::RegisterShardResponse response;
    status = stub_->RegisterShard(&context, request, &response);
    id = response.member_id();
    secret = response.member_secret();
    heartbeat = response.heartbeat_seconds();
  } else {
    v1::RegisterWorkerRequest request;
    request.set_address(address_);
    request.set_threads(threads_);
    *request.mutable_numerics() = LocalNumerics();
    request.mutable_numerics()->set_device(device_);
    request.set_memory_bytes(memory_bytes_);
    v1::RegisterWorkerResponse response;
    status = stub_->RegisterWorker(&context, request, &response);
    id = response.member_id();
    secret = response.member_secret();
    heartbeat = response.heartbeat_seconds();
  }
  if (!status.ok()) return FromGrpcStatus(status, absl::StrCat("coordinator ", coordinator_));
  std::function<void(const std::string&, const std::string&)> callback;
  {
    absl::MutexLock lock(&mu_);
    member_id_ = id;
    member_secret_ = secret;
    if (heartbeat > 0) heartbeat_seconds_ = heartbeat;
    callback = on_registered_;
  }
  if (callback) callback(id, secret);
  return absl::OkStatus();
}

absl::Status Membership::Start(double timeout_seconds) {
  const auto deadline = std::chrono::steady_clock::now() +
                        std::chrono::milliseconds(static_cast<int64_t>(timeout_seconds * 1000));
  absl::Status last;
  while (true) {
    last = RegisterOnce();
    if (last.ok()) break;
    // A refusal (e.g. numerics the cluster cannot use) will not change by
    // retrying: report it at once.
    if (absl::IsFailedPrecondition(last) || absl::IsInvalidArgument(last) ||
        absl::IsUnauthenticated(last)) {
      return absl::Status(last.code(), absl::StrCat("the coordinator at ", coordinator_,
                                                    " refused this member: ", last.message()));
    }
    {
      absl::MutexLock lock(&mu_);
      if (stopping_) return absl::CancelledError("stopped before registering");
    }
    if (std::chrono::steady_clock::now() >= deadline) {
      return absl::UnavailableError(absl::StrCat("cannot register with the coordinator at ",
                                                 coordinator_, ": ", last.message()));
    }
    std::this_thread::sleep_for(std::chrono::milliseconds(500));
  }
  heartbeat_ = std::thread([this] { HeartbeatLoop(); });
  return absl::OkStatus();
}

void Membership::Stop() {
  {
    absl::MutexLock lock(&mu_);
    stopping_ = true;
  }
  if (heartbeat_.joinable()) heartbeat_.join();
}

void Membership::SetDraining() {
  absl::MutexLock lock(&mu_);
  draining_ = true;
}

std::string Membership::member_id() const {
  absl::MutexLock lock(&mu_);
  return member_id_;
}

std::string Membership::member_secret() const {
  absl::MutexLock lock(&mu_);
  return member_secret_;
}

void Membership::Authenticate(grpc::ClientContext* context) const {
  context->AddMetadata(kMemberSecretHeader, member_secret());
}

void Membership::set_on_registered(
    std::function<void(const std::string& id, const std::string& secret)> callback) {
  absl::MutexLock lock(&mu_);
  on_registered_ = std::move(callback);
}

absl::Status Membership::Reregister() { return RegisterOnce(); }

void Membership::set_on_ended_jobs(std::function<void(const std::vector<std::string>&)> callback) {
  absl::MutexLock lock(&mu_);
  on_ended_ = std::move(callback);
}

void Membership::HeartbeatLoop() {
  while (true) {
    std::string id;
    bool draining = false;
    {
      absl::MutexLock lock(&mu_);
      const bool stop =
          mu_.AwaitWithTimeout(absl::Condition(&stopping_), absl::Seconds(heartbeat_seconds_));
      if (stop) return;
      id = member_id_;
      draining = draining_;
    }
    grpc::ClientContext context;
    context.set_deadline(DeadlineIn(5.0));
    Authenticate(&context);
    v1::HeartbeatRequest request;
    request.set_member_id(id);
    request.set_draining(draining);
    v1::HeartbeatResponse response;
    const grpc::Status status = stub_->Heartbeat(&context, request, &response);
    if (status.error_code() == grpc::StatusCode::NOT_FOUND) {
      (void)RegisterOnce();  // retried at the next beat when it fails
      continue;
    }
    if (status.ok() && response.ended_job_ids_size() > 0) {
      std::function<void(const std::vector<std::string>&)> callback;
      {
        absl::MutexLock lock(&mu_);
        callback = on_ended_;
      }
      if (callback) {
        callback(std::vector<std::string>(response.ended_job_ids().begin(),
                                          response.ended_job_ids().end()));
      }
    }
  }
}

}  // namespace muonps
