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
  // `cluster_secret`: sent when registering (empty: none); `memory_bytes`:
  // what this member may use, reported for admission (0: unknown).
  Membership(Kind kind, const std::string& coordinator, const std::string& address, int threads,
             std::string cluster_secret = "", int64_t memory_bytes = 0);
  ~Membership();

  // Registers (sending LocalNumerics()), retrying every 0.5 s for up to
  // `timeout_seconds` (or until Stop()), then starts heartbeats. UNAVAILABLE
  // naming the coordinator when it could not be reached in time; the
  // coordinator's FAILED_PRECONDITION or INVALID_ARGUMENT (e.g. numerics
  // that are not the cluster's) at once, without retrying.
  // Where this member computes (NumericsProfile.device; empty: the CPU),
  // sent at every registration. Set before Start.
  void set_device(const std::string& device) { device_ = device; }
  absl::Status Start(double timeout_seconds);
  // Stops heartbeats (the lease then lapses at the coordinator).
  void Stop();
  // Tells the coordinator, from the next heartbeat on, that this member is
  // leaving (HeartbeatRequest.draining).
  void SetDraining();

  // The current member id (changes when registering again).
  std::string member_id() const;
  // The secret issued with it: Authenticate adds it to a call to the
  // coordinator, which refuses member calls without it.
  std::string member_secret() const;
  void Authenticate(grpc::ClientContext* context) const;
  // Called (from any thread) after every successful registration with the
  // new id and secret, e.g. for a shard to accept the coordinator's calls.
  void set_on_registered(
      std::function<void(const std::string& id, const std::string& secret)> callback);
  // Registers again now (e.g. after a NOT_FOUND from the coordinator).
  absl::Status Reregister();
  // Called with the ended job ids every heartbeat reports.
  void set_on_ended_jobs(std::function<void(const std::vector<std::string>&)> callback);
  v1::ClusterService::Stub* stub() { return stub_.get(); }

 private:
  std::string device_;
  absl::Status RegisterOnce();
  void HeartbeatLoop();

  const Kind kind_;
  const std::string coordinator_, address_;
  const int threads_;
  const std::string cluster_secret_;
  const int64_t memory_bytes_;
  std::unique_ptr<v1::ClusterService::Stub> stub_;
  mutable absl::Mutex mu_;
  std::string member_id_ ABSL_GUARDED_BY(mu_);
  std::string member_secret_ ABSL_GUARDED_BY(mu_);
  std::function<void(const std::string&, const std::string&)> on_registered_ ABSL_GUARDED_BY(mu_);
  double heartbeat_seconds_ ABSL_GUARDED_BY(mu_) = 0.5;
  bool stopping_ ABSL_GUARDED_BY(mu_) = false;
  bool draining_ ABSL_GUARDED_BY(mu_) = false;
  std::function<void(const std::vector<std::string>&)> on_ended_ ABSL_GUARDED_BY(mu_);
  std::thread heartbeat_;
};

}  // namespace muonps

#endif  // MUONPS_RPC_MEMBERSHIP_H_
