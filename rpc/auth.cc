#include "rpc/auth.h"

#include <sys/random.h>

#include <cerrno>
#include <cstdint>
#include <fstream>
#include <sstream>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"

namespace muonps {
namespace {

constexpr size_t kMaxMetadataBytes = 4096;
constexpr int64_t kMaxFileBytes = 1 << 20;

bool ValidName(absl::string_view name) {
  if (name.empty() || name.size() > 64) return false;
  for (char c : name) {
    if (!absl::ascii_isalnum(static_cast<unsigned char>(c)) && c != '.' && c != '_' && c != '-') {
      return false;
    }
  }
  return true;
}

absl::StatusOr<std::string> ReadSmallFile(const std::string& path, absl::string_view flag) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::InvalidArgumentError(absl::StrCat(flag, ": cannot read ", path));
  std::string text(kMaxFileBytes + 1, '\0');
  in.read(text.data(), static_cast<std::streamsize>(text.size()));
  text.resize(static_cast<size_t>(in.gcount()));
  if (static_cast<int64_t>(text.size()) > kMaxFileBytes) {
    return absl::InvalidArgumentError(absl::StrCat(flag, ": ", path, " is over 1 MiB"));
  }
  return text;
}

}  // namespace

std::string RandomHex(int bytes) {
  std::vector<unsigned char> raw(static_cast<size_t>(bytes));
  size_t got = 0;
  while (got < raw.size()) {
    const ssize_t n = getrandom(raw.data() + got, raw.size() - got, 0);
    if (n < 0) {
      if (errno == EINTR) continue;
      std::abort();  // no kernel randomness: nothing safe to hand out
    }
    got += static_cast<size_t>(n);
  }
  static constexpr char kHex[] = "0123456789abcdef";
  std::string out;
  out.reserve(raw.size() * 2);
  for (unsigned char c : raw) {
    out.push_back(kHex[c >> 4]);
    out.push_back(kHex[c & 15]);
  }
  return out;
}

bool SecretEquals(absl::string_view a, absl::string_view b) {
  if (a.size() != b.size()) return false;
  unsigned char diff = 0;
  for (size_t i = 0; i < a.size(); ++i) diff |= static_cast<unsigned char>(a[i] ^ b[i]);
  return diff == 0;
}

std::optional<std::string> CallerMetadata(const grpc::ServerContextBase& context,
                                          absl::string_view key) {
  const auto& metadata = context.client_metadata();
  auto it = metadata.find(grpc::string_ref(key.data(), key.size()));
  if (it == metadata.end() || it->second.size() > kMaxMetadataBytes) return std::nullopt;
  return std::string(it->second.data(), it->second.size());
}

bool CallerPresents(const grpc::ServerContextBase& context, absl::string_view key,
                    absl::string_view secret) {
  if (secret.empty()) return false;
  const std::optional<std::string> sent = CallerMetadata(context, key);
  return sent.has_value() && SecretEquals(*sent, secret);
}

absl::StatusOr<std::string> ReadSecretFile(const std::string& path, absl::string_view flag) {
  absl::StatusOr<std::string> text = ReadSmallFile(path, flag);
  if (!text.ok()) return text.status();
  absl::string_view line = *text;
  line = line.substr(0, line.find('\n'));
  const std::string secret(absl::StripAsciiWhitespace(line));
  if (secret.size() < 16) {
    return absl::InvalidArgumentError(
        absl::StrCat(flag, ": the secret in ", path, " is shorter than 16 characters"));
  }
  return secret;
}

absl::StatusOr<UserTokens> UserTokens::Load(const std::string& path) {
  absl::StatusOr<std::string> text = ReadSmallFile(path, "--tokens_file");
  if (!text.ok()) return text.status();
  return Parse(*text, path);
}

absl::StatusOr<UserTokens> UserTokens::Parse(absl::string_view text, const std::string& what) {
  UserTokens tokens;
  int line_number = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_number;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    const std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    auto bad = [&](absl::string_view why) {
      return absl::InvalidArgumentError(
          absl::StrCat("--tokens_file: ", what, " line ", line_number, ": ", why));
    };
    if (fields.size() < 2 || fields.size() > 3) return bad("expected TOKEN NAME [admin]");
    if (fields[0].size() < 16) return bad("token shorter than 16 characters");
    if (!ValidName(fields[1])) return bad("name must be 1-64 of [A-Za-z0-9._-]");
    if (fields.size() == 3 && fields[2] != "admin") return bad("third field must be 'admin'");
    if (tokens.users_.count(std::string(fields[0])) != 0) return bad("token listed twice");
    tokens.users_[std::string(fields[0])] = User{std::string(fields[1]), fields.size() == 3};
  }
  if (tokens.users_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat("--tokens_file: ", what, " lists no token"));
  }
  return tokens;
}

absl::StatusOr<User> UserTokens::Authenticate(const grpc::ServerContextBase& context) const {
  const std::optional<std::string> header = CallerMetadata(context, kAuthorizationHeader);
  constexpr absl::string_view kBearer = "Bearer ";
  if (!header.has_value() || !absl::StartsWith(*header, kBearer)) {
    return absl::UnauthenticatedError(
        "this coordinator requires a bearer token (muonps --token_file or MUONPS_TOKEN)");
  }
  const absl::string_view token = absl::string_view(*header).substr(kBearer.size());
  // Every token is compared, so the time does not tell which one is close.
  const User* found = nullptr;
  for (const auto& [known, user] : users_) {
    if (SecretEquals(known, token)) found = &user;
  }
  if (found == nullptr) return absl::UnauthenticatedError("unknown bearer token");
  return *found;
}

void AttachToken(grpc::ClientContext* context, const std::string& token) {
  if (!token.empty()) context->AddMetadata(kAuthorizationHeader, absl::StrCat("Bearer ", token));
}

}  // namespace muonps
