// Transport security of every muonps server and channel: mutual TLS when the
// process has a certificate, its private key and the CA bundle of the cluster
// (--tls_cert, --tls_key, --tls_ca); plaintext when it has none of them, which
// is meant for loopback (`muonps local`, tests).
//
// With TLS, a server accepts only callers that present a certificate signed by
// the CA (members and users alike), and a client accepts only servers whose
// certificate is signed by the CA and names the dialled host (a subjectAltName
// such as IP:127.0.0.1 or DNS:shard-0.muonps-shard...; or the name given as
// TransportSecurity::server_name).
//
// The process has one configuration, set at start-up before its first server
// starts or channel is made; GrpcServer::Start (rpc/grpc_server.h) and
// MakeChannel (rpc/rpc_util.h) use it. Thread safety: every function may be
// called from any thread; servers and channels made before a change keep the
// credentials they were made with.
#ifndef MUONPS_RPC_SECURITY_H_
#define MUONPS_RPC_SECURITY_H_

#include <grpcpp/grpcpp.h>

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"

namespace muonps {

// Largest PEM file read, in bytes.
inline constexpr int64_t kMaxPemFileBytes = 1 << 20;

// Paths of the PEM files, as given on the command line ("" = not given).
struct TransportSecurityFiles {
  std::string cert;         // --tls_cert: this process's certificate chain, leaf first
  std::string key;          // --tls_key: the leaf certificate's private key, unencrypted
  std::string ca;           // --tls_ca: the CA certificates that sign every member and user
  std::string server_name;  // --tls_server_name: see TransportSecurity::server_name
};

// The PEM texts of the files; all empty = plaintext.
struct TransportSecurity {
  std::string cert_chain;
  std::string private_key;
  std::string ca_bundle;
  // When not empty, clients check servers' certificates against this name
  // instead of the dialled host (gRPC's ssl_target_name_override).
  std::string server_name;

  bool tls() const { return !cert_chain.empty(); }
};

// Reads the files of `files`, each once (at most kMaxPemFileBytes). None
// given: plaintext. All of cert, key and ca given: TLS, once the certificate
// chain verifies against the CA at this time and the key is the leaf
// certificate's. Anything else is INVALID_ARGUMENT naming the flag at fault
// (a missing one, or one whose file cannot be read or holds no usable PEM,
// with its path).
absl::StatusOr<TransportSecurity> LoadTransportSecurity(const TransportSecurityFiles& files);

// Sets the process's transport (plaintext until called).
void SetTransportSecurity(TransportSecurity security);
// Whether servers and channels made now use TLS.
bool TransportUsesTls();

// Credentials for a server made now: mutual TLS requiring and verifying a
// client certificate, or insecure.
std::shared_ptr<grpc::ServerCredentials> ServerTransportCredentials();
// Credentials for a channel made now, and the channel arguments they need
// (the target name override).
std::shared_ptr<grpc::ChannelCredentials> ChannelTransportCredentials();
void AddTransportChannelArguments(grpc::ChannelArguments* args);

// True when only this machine can reach `address` (host:port): 127.0.0.0/8,
// ::1, "localhost", and unix: sockets. Any other host, 0.0.0.0 and :: among
// them, is reachable from the network.
bool IsLoopbackAddress(const std::string& address);

}  // namespace muonps

#endif  // MUONPS_RPC_SECURITY_H_
