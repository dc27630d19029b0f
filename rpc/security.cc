#include "rpc/security.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <openssl/bio.h>
#include <openssl/err.h>
#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509_vfy.h>

#include <cerrno>
#include <cstring>
#include <fstream>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/synchronization/mutex.h"

namespace muonps {
namespace {

ABSL_CONST_INIT absl::Mutex g_mu(absl::kConstInit);
// Null until SetTransportSecurity: plaintext.
std::shared_ptr<const TransportSecurity>* g_security ABSL_GUARDED_BY(g_mu) = nullptr;

std::shared_ptr<const TransportSecurity> Current() {
  absl::MutexLock lock(&g_mu);
  return g_security == nullptr ? nullptr : *g_security;
}

// The whole of file `path`, given as --`flag`.
absl::StatusOr<std::string> ReadPemFile(const std::string& flag, const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    return absl::InvalidArgumentError(
        absl::StrCat("--", flag, ": cannot read ", path, ": ", std::strerror(errno)));
  }
  std::string text(static_cast<size_t>(kMaxPemFileBytes) + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  if (in.bad()) return absl::InvalidArgumentError(absl::StrCat("--", flag, ": cannot read ", path));
  text.resize(static_cast<size_t>(in.gcount()));
  if (static_cast<int64_t>(text.size()) > kMaxPemFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat("--", flag, ": ", path, " is larger than ",
                                                   kMaxPemFileBytes, " bytes; not a PEM file"));
  }
  return text;
}

struct X509Free {
  void operator()(X509* x) const { X509_free(x); }
};
struct EvpPkeyFree {
  void operator()(EVP_PKEY* k) const { EVP_PKEY_free(k); }
};
struct BioFree {
  void operator()(BIO* b) const { BIO_free(b); }
};
struct StoreFree {
  void operator()(X509_STORE* s) const { X509_STORE_free(s); }
};
struct StoreCtxFree {
  void operator()(X509_STORE_CTX* c) const { X509_STORE_CTX_free(c); }
};
struct StackFree {
  void operator()(STACK_OF(X509) * s) const { sk_X509_free(s); }
};
using X509Ptr = std::unique_ptr<X509, X509Free>;

std::unique_ptr<BIO, BioFree> MemoryBio(const std::string& text) {
  return std::unique_ptr<BIO, BioFree>(BIO_new_mem_buf(text.data(), static_cast<int>(text.size())));
}

// Every certificate in PEM `text`, in order.
std::vector<X509Ptr> ParseCertificates(const std::string& text) {
  std::vector<X509Ptr> certs;
  auto bio = MemoryBio(text);
  while (X509* cert = PEM_read_bio_X509(bio.get(), nullptr, nullptr, nullptr)) {
    certs.emplace_back(cert);
  }
  ERR_clear_error();  // the read past the last block
  return certs;
}

// A password callback that has none: OpenSSL would otherwise prompt on the
// terminal for an encrypted key.
int NoPassword(char*, int, int, void*) { return 0; }

// Checks what gRPC would otherwise only find at the first handshake: the key
// belongs to the leaf certificate, and the chain verifies against the CA now.
absl::Status CheckMaterial(const TransportSecurityFiles& files, const TransportSecurity& s) {
  const std::vector<X509Ptr> chain = ParseCertificates(s.cert_chain);
  if (chain.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_cert: ", files.cert, " holds no PEM certificate"));
  }
  const std::vector<X509Ptr> authorities = ParseCertificates(s.ca_bundle);
  if (authorities.empty()) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_ca: ", files.ca, " holds no PEM certificate"));
  }
  if (absl::StrContains(s.private_key, "ENCRYPTED")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--tls_key: ", files.key,
        " is encrypted; gRPC needs an unencrypted key (openssl pkey -in KEY -out PLAIN_KEY)"));
  }
  auto key_bio = MemoryBio(s.private_key);
  std::unique_ptr<EVP_PKEY, EvpPkeyFree> key(
      PEM_read_bio_PrivateKey(key_bio.get(), nullptr, NoPassword, nullptr));
  ERR_clear_error();
  if (key == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrCat("--tls_key: ", files.key, " holds no PEM private key"));
  }
  if (X509_check_private_key(chain[0].get(), key.get()) != 1) {
    ERR_clear_error();
    return absl::InvalidArgumentError(absl::StrCat("--tls_key: ", files.key,
                                                   " is not the key of the certificate in ",
                                                   files.cert, " (--tls_cert)"));
  }
  std::unique_ptr<X509_STORE, StoreFree> store(X509_STORE_new());
  for (const X509Ptr& ca : authorities) X509_STORE_add_cert(store.get(), ca.get());
  std::unique_ptr<STACK_OF(X509), StackFree> intermediates(sk_X509_new_null());
  for (size_t i = 1; i < chain.size(); ++i) sk_X509_push(intermediates.get(), chain[i].get());
  std::unique_ptr<X509_STORE_CTX, StoreCtxFree> context(X509_STORE_CTX_new());
  if (store == nullptr || intermediates == nullptr || context == nullptr ||
      X509_STORE_CTX_init(context.get(), store.get(), chain[0].get(), intermediates.get()) != 1) {
    return absl::InternalError("cannot set up certificate verification");
  }
  const bool verified = X509_verify_cert(context.get()) == 1;
  const int error = X509_STORE_CTX_get_error(context.get());
  ERR_clear_error();
  if (!verified) {
    return absl::InvalidArgumentError(absl::StrCat("--tls_cert: ", files.cert,
                                                   " does not verify against --tls_ca ", files.ca,
                                                   ": ", X509_verify_cert_error_string(error)));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TransportSecurity> LoadTransportSecurity(const TransportSecurityFiles& files) {
  std::vector<std::string> missing;
  if (files.cert.empty()) missing.emplace_back("--tls_cert");
  if (files.key.empty()) missing.emplace_back("--tls_key");
  if (files.ca.empty()) missing.emplace_back("--tls_ca");
  if (missing.size() == 3) {
    if (!files.server_name.empty()) {
      return absl::InvalidArgumentError(
          "--tls_server_name is only for TLS: give --tls_cert, --tls_key and --tls_ca too");
    }
    return TransportSecurity();
  }
  if (!missing.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(
        absl::StrJoin(missing, " and "), missing.size() == 1 ? " is" : " are",
        " missing: TLS needs --tls_cert, --tls_key and --tls_ca together (none of them: plaintext, "
        "for loopback only)"));
  }
  absl::StatusOr<std::string> cert = ReadPemFile("tls_cert", files.cert);
  if (!cert.ok()) return cert.status();
  absl::StatusOr<std::string> key = ReadPemFile("tls_key", files.key);
  if (!key.ok()) return key.status();
  absl::StatusOr<std::string> ca = ReadPemFile("tls_ca", files.ca);
  if (!ca.ok()) return ca.status();
  TransportSecurity security;
  security.cert_chain = *std::move(cert);
  security.private_key = *std::move(key);
  security.ca_bundle = *std::move(ca);
  security.server_name = files.server_name;
  if (absl::Status st = CheckMaterial(files, security); !st.ok()) return st;
  return security;
}

void SetTransportSecurity(TransportSecurity security) {
  auto next = std::make_shared<const TransportSecurity>(std::move(security));
  absl::MutexLock lock(&g_mu);
  if (g_security == nullptr) g_security = new std::shared_ptr<const TransportSecurity>();
  *g_security = std::move(next);
}

bool TransportUsesTls() {
  const std::shared_ptr<const TransportSecurity> s = Current();
  return s != nullptr && s->tls();
}

std::shared_ptr<grpc::ServerCredentials> ServerTransportCredentials() {
  const std::shared_ptr<const TransportSecurity> s = Current();
  if (s == nullptr || !s->tls()) return grpc::InsecureServerCredentials();
  grpc::SslServerCredentialsOptions options(
      GRPC_SSL_REQUEST_AND_REQUIRE_CLIENT_CERTIFICATE_AND_VERIFY);
  options.pem_root_certs = s->ca_bundle;
  options.pem_key_cert_pairs.push_back({s->private_key, s->cert_chain});
  return grpc::SslServerCredentials(options);
}

std::shared_ptr<grpc::ChannelCredentials> ChannelTransportCredentials() {
  const std::shared_ptr<const TransportSecurity> s = Current();
  if (s == nullptr || !s->tls()) return grpc::InsecureChannelCredentials();
  grpc::SslCredentialsOptions options;
  options.pem_root_certs = s->ca_bundle;
  options.pem_private_key = s->private_key;
  options.pem_cert_chain = s->cert_chain;
  return grpc::SslCredentials(options);
}

void AddTransportChannelArguments(grpc::ChannelArguments* args) {
  const std::shared_ptr<const TransportSecurity> s = Current();
  if (s != nullptr && s->tls() && !s->server_name.empty()) {
    args->SetSslTargetNameOverride(s->server_name);
  }
}

bool IsLoopbackAddress(const std::string& address) {
  if (absl::StartsWith(address, "unix:") || absl::StartsWith(address, "unix-abstract:")) {
    return true;
  }
  std::string host = address;
  if (!host.empty() && host[0] == '[') {  // [IPv6]:port
    const size_t close = host.find(']');
    host = host.substr(1, close == std::string::npos ? std::string::npos : close - 1);
  } else if (host.find(':') == host.rfind(':') && host.find(':') != std::string::npos) {
    host = host.substr(0, host.find(':'));  // host:port (a bare IPv6 address has several)
  }
  if (absl::AsciiStrToLower(host) == "localhost") return true;
  in_addr v4;
  if (inet_pton(AF_INET, host.c_str(), &v4) == 1) {
    return (ntohl(v4.s_addr) >> 24) == 127;
  }
  in6_addr v6;
  if (inet_pton(AF_INET6, host.c_str(), &v6) == 1) {
    if (IN6_IS_ADDR_LOOPBACK(&v6)) return true;
    return IN6_IS_ADDR_V4MAPPED(&v6) && v6.s6_addr[12] == 127;
  }
  return false;
}

}  // namespace muonps
