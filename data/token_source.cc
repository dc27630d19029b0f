#include "data/token_source.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <system_error>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/atomic_file.h"

namespace muonps {
namespace {

namespace fs = std::filesystem;

constexpr double kDefaultValFraction = 0.05;
constexpr int64_t kShardHeaderBytes = 4 * kLlmcShardHeaderInts;

// Regular files under the directory `root`, recursively, in sorted path
// order. Symlinks (to files or directories) are neither read nor followed.
absl::StatusOr<std::vector<std::string>> ListRegularFiles(const std::string& root,
                                                          int64_t* symlinks_skipped) {
  std::vector<std::string> files;
  std::error_code ec;
  fs::recursive_directory_iterator it(root, fs::directory_options::skip_permission_denied, ec);
  for (; !ec && it != fs::recursive_directory_iterator(); it.increment(ec)) {
    std::error_code status_ec;
    const fs::file_status status = it->symlink_status(status_ec);
    if (status_ec) continue;
    if (fs::is_symlink(status)) {
      ++*symlinks_skipped;
    } else if (fs::is_regular_file(status)) {
      files.push_back(it->path().string());
    }
  }
  if (ec) return absl::InvalidArgumentError(absl::StrCat("cannot list ", root, ": ", ec.message()));
  std::sort(files.begin(), files.end());
  return files;
}

absl::Status LoadText(const std::string& path, bool is_directory, std::vector<int32_t>* tokens,
                      std::string* description) {
  std::vector<std::string> files;
  int64_t symlinks = 0;
  if (is_directory) {
    absl::StatusOr<std::vector<std::string>> listed = ListRegularFiles(path, &symlinks);
    if (!listed.ok()) return listed.status();
    files = std::move(*listed);
  } else {
    files.push_back(path);
  }
  int64_t read = 0, binary = 0, unreadable = 0;
  for (const std::string& file : files) {
    absl::StatusOr<std::string> bytes = ReadFileToString(file);
    if (!bytes.ok()) {
      if (!is_directory) return bytes.status();
      ++unreadable;
      continue;
    }
    // NOLINTNEXTLINE(bugprone-not-null-terminated-result): memchr looks for a byte only.
    if (std::memchr(bytes->data(), '\0', bytes->size()) != nullptr) {
      ++binary;
      continue;
    }
    ++read;
    tokens->reserve(tokens->size() + bytes->size());
    for (unsigned char c : *bytes) tokens->push_back(c);
  }
  if (read == 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "no readable text in %s (%d files: %d contain NUL bytes, %d cannot be read)", path,
        files.size(), binary, unreadable));
  }
  *description = absl::StrFormat("text: %d files, %d bytes from %s", read, tokens->size(), path);
  if (symlinks + binary + unreadable > 0) {
    absl::StrAppendFormat(description, " (skipped %d symlinks, %d binary, %d unreadable)", symlinks,
                          binary, unreadable);
  }
  return absl::OkStatus();
}

int32_t LittleEndianInt32(const unsigned char* p) {
  return static_cast<int32_t>(static_cast<uint32_t>(p[0]) | static_cast<uint32_t>(p[1]) << 8 |
                              static_cast<uint32_t>(p[2]) << 16 |
                              static_cast<uint32_t>(p[3]) << 24);
}

// Appends the tokens of one llm.c shard, checking its header, its size and
// every token against the vocabulary.
absl::Status AppendShard(const std::string& file, int vocab_size, std::vector<int32_t>* tokens) {
  absl::StatusOr<std::string> contents = ReadFileToString(file);
  if (!contents.ok()) return contents.status();
  const auto* bytes = reinterpret_cast<const unsigned char*>(contents->data());
  const int64_t size = static_cast<int64_t>(contents->size());
  if (size < kShardHeaderBytes) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: %d bytes, shorter than the %d-byte llm.c shard header", file, size,
                        kShardHeaderBytes));
  }
  const int32_t magic = LittleEndianInt32(bytes);
  const int32_t version = LittleEndianInt32(bytes + 4);
  const int32_t count = LittleEndianInt32(bytes + 8);
  if (magic != kLlmcShardMagic) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: bad magic %d, expected %d (not an llm.c token shard)", file, magic, kLlmcShardMagic));
  }
  if (version != kLlmcShardVersion) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: unsupported shard version %d, expected %d (uint16 tokens)", file,
                        version, kLlmcShardVersion));
  }
  const int64_t expected = kShardHeaderBytes + 2 * static_cast<int64_t>(count);
  if (count < 0 || size != expected) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: header says %d tokens (%d bytes) but the file has %d bytes%s", file,
                        count, expected, size, size < expected ? " (truncated)" : ""));
  }
  tokens->reserve(tokens->size() + static_cast<size_t>(count));
  const unsigned char* p = bytes + kShardHeaderBytes;
  for (int64_t i = 0; i < count; ++i, p += 2) {
    const int32_t token = static_cast<int32_t>(p[0] | p[1] << 8);
    if (token >= vocab_size) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "%s: token %d at index %d is outside the vocabulary of %d", file, token, i, vocab_size));
    }
    tokens->push_back(token);
  }
  return absl::OkStatus();
}

absl::Status LoadShards(const std::string& path, bool is_directory, int vocab_size,
                        std::vector<int32_t>* tokens, std::string* description) {
  std::vector<std::string> files;
  if (is_directory) {
    int64_t symlinks = 0;
    absl::StatusOr<std::vector<std::string>> listed = ListRegularFiles(path, &symlinks);
    if (!listed.ok()) return listed.status();
    for (std::string& file : *listed) {
      if (absl::EndsWith(file, ".bin")) files.push_back(std::move(file));
    }
    if (files.empty()) {
      return absl::InvalidArgumentError(absl::StrCat("no .bin token shards in ", path));
    }
  } else {
    files.push_back(path);
  }
  for (const std::string& file : files) {
    if (absl::Status status = AppendShard(file, vocab_size, tokens); !status.ok()) return status;
  }
  *description =
      absl::StrFormat("bin: %d shards, %d tokens from %s", files.size(), tokens->size(), path);
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<TokenCorpus> LoadTokenCorpus(const muonps::v1::DataConfig& data, int vocab_size,
                                            int seq_len) {
  const std::string path = data.has_path() ? data.path() : kDefaultCorpusPath;
  const std::string format = data.has_format() ? data.format() : "auto";
  const double val_fraction = data.has_val_fraction() ? data.val_fraction() : kDefaultValFraction;

  if (format != "auto" && format != "text" && format != "bin") {
    return absl::InvalidArgumentError(absl::StrFormat(
        "data.format: unknown format \"%s\" (expected \"auto\", \"text\" or \"bin\")", format));
  }
  if (!(val_fraction >= 0.0 && val_fraction < 1.0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("data.val_fraction: must be in [0, 1), got %g", val_fraction));
  }
  if (seq_len < 1) {
    return absl::InvalidArgumentError(absl::StrFormat("seq_len must be >= 1, got %d", seq_len));
  }
  if (path.empty()) return absl::InvalidArgumentError("data.path is empty");

  std::error_code ec;
  const fs::file_status status = fs::status(path, ec);  // follows a symlinked root
  if (!fs::exists(status)) {
    return absl::NotFoundError(absl::StrCat("data path not found: ", path));
  }
  const bool is_directory = fs::is_directory(status);
  const bool bin =
      format == "bin" || (format == "auto" && !is_directory && absl::EndsWith(path, ".bin"));

  TokenCorpus corpus;
  std::vector<int32_t> tokens;
  if (bin) {
    if (vocab_size < 1) {
      return absl::InvalidArgumentError(
          absl::StrFormat("vocab_size must be >= 1, got %d", vocab_size));
    }
    if (absl::Status s = LoadShards(path, is_directory, vocab_size, &tokens, &corpus.description);
        !s.ok()) {
      return s;
    }
  } else {
    if (vocab_size < 256) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "byte-level text needs vocab_size >= 256, got %d (%s)", vocab_size, path));
    }
    if (absl::Status s = LoadText(path, is_directory, &tokens, &corpus.description); !s.ok()) {
      return s;
    }
  }

  const int64_t n = static_cast<int64_t>(tokens.size());
  const int64_t n_val = static_cast<int64_t>(std::floor(static_cast<double>(n) * val_fraction));
  const int64_t n_train = n - n_val;
  const int64_t need = static_cast<int64_t>(seq_len) + 1;
  if (n_train < need) {
    return absl::InvalidArgumentError(
        absl::StrFormat("corpus too short: %d training tokens, need at least T+1 = %d (%s)",
                        n_train, need, corpus.description));
  }
  if (val_fraction > 0.0 && n_val < need) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "validation split too short: %d tokens (val_fraction %g of %d), need at least T+1 = %d "
        "(%s)",
        n_val, val_fraction, n, need, corpus.description));
  }
  corpus.val.assign(tokens.begin() + n_train, tokens.end());
  tokens.resize(static_cast<size_t>(n_train));
  corpus.train = std::move(tokens);
  return corpus;
}

}  // namespace muonps
