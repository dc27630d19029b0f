// A gRPC server as every muonps service runs it: the standard health service
// (grpc.health.v1) and server reflection enabled, a bounded message size,
// readiness under the caller's control, and the process's transport security
// (rpc/security.h): mutual TLS, or plaintext with a warning on stderr when the
// address is reachable from other machines. Health answers NOT_SERVING until
// SetServing(true), so Kubernetes' gRPC probes and generic clients only route
// to a server that is really ready.
//
// Thread safety: all methods may be called from any thread.
#ifndef MUONPS_RPC_GRPC_SERVER_H_
#define MUONPS_RPC_GRPC_SERVER_H_

#include <grpcpp/grpcpp.h>

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "prometheus/registry.h"

namespace muonps {

struct GrpcServerOptions {
  // host:port to listen on; port 0 picks a free port (see GrpcServer::port()).
  // "0.0.0.0:PORT" in a cluster, "127.0.0.1:0" on one machine.
  std::string address = "127.0.0.1:0";
  // Largest message accepted, in bytes. Tensors travel in chunks well below it.
  int max_receive_message_bytes = 16 << 20;
  // When set, every call is counted in it (rpc/metrics.h).
  std::shared_ptr<prometheus::Registry> metrics;
};

class GrpcServer {
 public:
  // Starts serving `services` (not owned; they must outlive the server).
  // Fails with UNAVAILABLE naming the address when it cannot be bound.
  static absl::StatusOr<std::unique_ptr<GrpcServer>> Start(
      const GrpcServerOptions& options, const std::vector<grpc::Service*>& services);
  ~GrpcServer();

  // The bound port (useful with port 0) and "host:port" to dial.
  int port() const { return port_; }
  const std::string& address() const { return address_; }

  // Readiness as reported by grpc.health.v1, for the whole server ("") and
  // every registered service alike.
  void SetServing(bool serving);

  // Stops accepting calls, waits up to `grace_seconds` for calls in flight.
  void Shutdown(double grace_seconds = 2.0);
  grpc::Server* server() { return server_.get(); }

 private:
  GrpcServer() = default;

  std::unique_ptr<grpc::Server> server_;
  std::vector<std::string> health_names_;  // every registered service
  std::string address_;
  int port_ = 0;
};

}  // namespace muonps

#endif  // MUONPS_RPC_GRPC_SERVER_H_
