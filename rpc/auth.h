// Who may call: the secrets and tokens every muonps service checks, on top of
// the transport security of rpc/security.h.
//
//   cluster secret  an operator's file shared by the coordinator and its
//                   members (--cluster_secret_file); required to register
//                   when the coordinator has one.
//   member secret   random, issued by the coordinator at each registration;
//                   the member sends it with every later call, and a shard
//                   accepts the coordinator's calls only with its own.
//   job key         random per job run, given to the shards (LoadJob) and to
//                   the workers (Task); pushes and pulls must carry it.
//   user tokens     bearer tokens from the coordinator's --tokens_file; jobs
//                   belong to the user whose token submitted them.
//
// Secrets travel as gRPC metadata. Comparisons take a time independent of
// where the strings differ.
#ifndef MUONPS_RPC_AUTH_H_
#define MUONPS_RPC_AUTH_H_

#include <grpcpp/client_context.h>
#include <grpcpp/server_context.h>

#include <map>
#include <optional>
#include <string>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace muonps {

inline constexpr char kClusterSecretHeader[] = "x-muonps-cluster-secret";
inline constexpr char kMemberSecretHeader[] = "x-muonps-member-secret";
inline constexpr char kJobKeyHeader[] = "x-muonps-job-key";
inline constexpr char kAuthorizationHeader[] = "authorization";

// `bytes` random bytes from the kernel's generator, as lowercase hex.
std::string RandomHex(int bytes);

// a == b in a time that depends only on the lengths.
bool SecretEquals(absl::string_view a, absl::string_view b);

// The first value of metadata `key` a caller sent (bounded: values over
// 4 KiB count as absent).
std::optional<std::string> CallerMetadata(const grpc::ServerContextBase& context,
                                          absl::string_view key);

// True when the caller sent metadata `key` equal to `secret` (never for an
// empty secret).
bool CallerPresents(const grpc::ServerContextBase& context, absl::string_view key,
                    absl::string_view secret);

// Reads a secret from a file: its first line, without surrounding
// whitespace; at least 16 characters. Errors name `flag` and the path.
absl::StatusOr<std::string> ReadSecretFile(const std::string& path, absl::string_view flag);

// A user known by a bearer token.
struct User {
  std::string name;
  bool admin = false;
};

// The coordinator's token file: one "TOKEN NAME [admin]" per line; blank
// lines and lines starting with '#' are ignored. Tokens are at least 16
// characters; names are [A-Za-z0-9._-]{1,64}.
class UserTokens {
 public:
  static absl::StatusOr<UserTokens> Load(const std::string& path);
  static absl::StatusOr<UserTokens> Parse(absl::string_view text, const std::string& what);
  // The caller's user: UNAUTHENTICATED without an "authorization: Bearer"
  // header or with an unknown token.
  absl::StatusOr<User> Authenticate(const grpc::ServerContextBase& context) const;
  size_t size() const { return users_.size(); }

 private:
  std::map<std::string, User> users_;  // by token
};

// Adds "authorization: Bearer TOKEN" to a client call (nothing when empty).
void AttachToken(grpc::ClientContext* context, const std::string& token);

}  // namespace muonps

#endif  // MUONPS_RPC_AUTH_H_
