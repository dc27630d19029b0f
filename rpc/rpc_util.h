// Small pieces every muonps service and client shares: status conversion
// between Abseil and gRPC (codes map one to one), and channels with the
// message limits the services expect.
#ifndef MUONPS_RPC_RPC_UTIL_H_
#define MUONPS_RPC_RPC_UTIL_H_

#include <grpcpp/grpcpp.h>

#include <chrono>
#include <memory>
#include <string>

#include "absl/status/status.h"

namespace muonps {

// Largest tensor chunk payload a service accepts (RESOURCE_EXHAUSTED above).
inline constexpr int64_t kMaxChunkBytes = 4 << 20;

grpc::Status ToGrpcStatus(const absl::Status& status);
// A refusal with `code` and `message` (naming the field or object at fault).
grpc::Status Refuse(absl::StatusCode code, const std::string& message);
// `what` prefixes the message, e.g. "shard 127.0.0.1:7001: PullParameters".
absl::Status FromGrpcStatus(const grpc::Status& status, const std::string& what = "");

// Transport settings for large tensor streams, used by channels and servers.
void TuneTransport(grpc::ChannelArguments* args);

// A channel to host:port that accepts messages up to 16 MiB, with the
// process's transport security (rpc/security.h: mutual TLS or plaintext).
std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address);

// A deadline `seconds` from now.
std::chrono::system_clock::time_point DeadlineIn(double seconds);

}  // namespace muonps

#endif  // MUONPS_RPC_RPC_UTIL_H_
