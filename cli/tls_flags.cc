#include "cli/tls_flags.h"

#include <filesystem>

#include "absl/flags/flag.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "rpc/security.h"

ABSL_FLAG(std::string, tls_cert, "",
          "PEM certificate chain of this process (leaf first), signed by --tls_ca; with "
          "--tls_key and --tls_ca every server and channel uses mutual TLS (none of the three: "
          "plaintext, for loopback). Env MUONPS_TLS_CERT");
ABSL_FLAG(std::string, tls_key, "",
          "PEM private key of --tls_cert, unencrypted. Env MUONPS_TLS_KEY");
ABSL_FLAG(std::string, tls_ca, "",
          "PEM CA certificates that sign every member's and user's certificate; servers require "
          "a client certificate signed by it, clients accept only servers signed by it. "
          "Env MUONPS_TLS_CA");
ABSL_FLAG(std::string, tls_server_name, "",
          "Check servers' certificates against this name instead of the host dialled (e.g. when "
          "dialling by IP address); TLS only. Env MUONPS_TLS_SERVER_NAME");

namespace muonps {

absl::Status ApplyTlsFlags() {
  TransportSecurityFiles files;
  files.cert = absl::GetFlag(FLAGS_tls_cert);
  files.key = absl::GetFlag(FLAGS_tls_key);
  files.ca = absl::GetFlag(FLAGS_tls_ca);
  files.server_name = absl::GetFlag(FLAGS_tls_server_name);
  absl::StatusOr<TransportSecurity> security = LoadTransportSecurity(files);
  if (!security.ok()) return security.status();
  SetTransportSecurity(*std::move(security));
  return absl::OkStatus();
}

std::vector<std::string> TlsFlagsForChildren() {
  std::vector<std::string> flags;
  for (const auto& [name, flag] :
       {std::pair<const char*, const absl::Flag<std::string>*>{"tls_cert", &FLAGS_tls_cert},
        {"tls_key", &FLAGS_tls_key},
        {"tls_ca", &FLAGS_tls_ca}}) {
    const std::string path = absl::GetFlag(*flag);
    if (path.empty()) continue;
    std::error_code ec;
    const std::filesystem::path absolute = std::filesystem::absolute(path, ec);
    flags.push_back(std::string("--") + name + "=" + (ec ? path : absolute.string()));
  }
  const std::string server_name = absl::GetFlag(FLAGS_tls_server_name);
  if (!server_name.empty()) flags.push_back("--tls_server_name=" + server_name);
  return flags;
}

absl::Status WithTlsHint(absl::Status status) {
  if (!absl::IsUnavailable(status) || TransportUsesTls()) return status;
  return absl::Status(status.code(),
                      absl::StrCat(status.message(),
                                   " (this client speaks plaintext; if the server requires TLS, "
                                   "give --tls_cert, --tls_key and --tls_ca)"));
}

}  // namespace muonps
