// The --tls_cert, --tls_key, --tls_ca and --tls_server_name flags of every
// command that serves or dials gRPC (rpc/security.h says what they mean).
#ifndef MUONPS_CLI_TLS_FLAGS_H_
#define MUONPS_CLI_TLS_FLAGS_H_

#include <string>
#include <vector>

#include "absl/status/status.h"

namespace muonps {

// Loads the files the flags name and makes them the process's transport;
// INVALID_ARGUMENT naming the flag at fault (see LoadTransportSecurity).
// Call once, before the first server or channel.
absl::Status ApplyTlsFlags();

// The flags as given, for the processes `muonps local` starts: paths made
// absolute, "" flags left out.
std::vector<std::string> TlsFlagsForChildren();

// `status` of a client call, with a hint when a plaintext client could not
// reach the server: it may require TLS (gRPC says only "Socket closed").
absl::Status WithTlsHint(absl::Status status);

}  // namespace muonps

#endif  // MUONPS_CLI_TLS_FLAGS_H_
