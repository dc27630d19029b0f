// A shard's or worker's membership in the cluster: it registers with the
// coordinator (retrying while the coordinator is not up yet), then renews its
// lease from a background thread, registering again when the coordinator no
// longer knows it (a restarted coordinator, or a lease that expired while
// the process was stalled).
//
// Thread safety: all methods may be called from any thread.
#ifndef MUONPS_RPC_MEMBERSHIP_H_
#define MUONPS_RPC_MEMBERSHIP_H_

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/synchronization/mutex.h"
#include "muonps/v1/coordinator.grpc.pb.h"

namespace muonps {

class Membership {
 public:
  enum class Kind { kShard, kWorker };
  // `address`: where this member serves; `threads`: reported by workers.
  Membership(Kind kind, const std::string& coordinator, const std::string& address, int threads);
  ~Membership();

  // Registers (sending LocalNumerics()), retrying every 0.5 s for up to
  // `timeout_seconds` (or until Stop()), then starts heartbeats. UNAVAILABLE
  // naming the coordinator when it could not be reached in time; the
  // coordinator's FAILED_PRECONDITION or INVALID_ARGUMENT (e.g. numerics
  // that are not the cluster's) at once, without retrying.
  absl::Status Start(double timeout_seconds);
  // Stops heartbeats (the lease then lapses at the coordinator).
  void Stop();

  // The current member id (changes when registering again).
  std::string member_id() const;
  // Registers again now (e.g. after a NOT_FOUND from the coordinator).
  absl::Status Reregister();
  // Called with the ended job ids every heartbeat reports.
  void set_on_ended_jobs(std::function<void(const std::vector<std::string>&)> callback);
  v1::ClusterService::Stub* stub() { return stub_.get(); }

 private:
  absl::Status RegisterOnce();
  void HeartbeatLoop();

  const Kind kind_;
  const std::string coordinator_, address_;
  const int threads_;
  std::unique_ptr<v1::ClusterService::Stub> stub_;
  mutable absl::Mutex mu_;
  std::string member_id_ ABSL_GUARDED_BY(mu_);
  double heartbeat_seconds_ ABSL_GUARDED_BY(mu_) = 0.5;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void(const std::vector<std::string>&)> on_ended_ ABSL_GUARDED_BY(mu_);
  std::thread heartbeat_;
};

}  // namespace muonps

#endif  // MUONPS_RPC_MEMBERSHIP_H_
