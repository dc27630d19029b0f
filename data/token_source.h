// Token corpora: byte-level text or llm.c token shards, split into a
// training part and a held-out validation tail.
#ifndef MUONPS_DATA_TOKEN_SOURCE_H_
#define MUONPS_DATA_TOKEN_SOURCE_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "muonps/v1/job.pb.h"

namespace muonps {

// The corpus a job without data.path reads: Debian's fortunes.
inline constexpr char kDefaultCorpusPath[] = "/usr/share/games/fortunes";

// The magic number and version in the header of an llm.c token shard.
inline constexpr int32_t kLlmcShardMagic = 20240520;
inline constexpr int32_t kLlmcShardVersion = 1;  // uint16 tokens
// The header is this many little-endian int32: [0] magic, [1] version,
// [2] token count, the rest unused.
inline constexpr int kLlmcShardHeaderInts = 256;

struct TokenCorpus {
  std::vector<int32_t> train;  // training tokens, the head of the stream
  std::vector<int32_t> val;    // held-out validation tokens, the tail
  // What was read, e.g. "text: 123 files, 1456789 bytes from /usr/share/games/fortunes".
  std::string description;
};

// Loads the token stream that `data` names. Absent fields take the defaults
// documented in job.proto (path "/usr/share/games/fortunes", format "auto",
// val_fraction 0.05).
//
// - format "text" (or "auto" and the path does not end in ".bin"): one file,
//   or a directory walked recursively in sorted path order. Only regular
//   files are read: symlinks inside the directory are skipped (so Debian
//   fortunes' `*.u8 -> *` links are not read twice), and so are files that
//   contain a NUL byte (binary indexes such as fortune `.dat` files) or that
//   cannot be opened. Each byte is one token in 0..255; vocab_size >= 256.
// - format "bin" (or "auto" and the path ends in ".bin"): an llm.c token
//   shard, or with format "bin" a directory whose `*.bin` files (recursive,
//   sorted path order) are concatenated. Each shard's magic, version, size and
//   tokens (< vocab_size) are checked.
//
// The last floor(n * val_fraction) tokens form `val`, the rest `train`.
// Errors, each a one-line message naming the path or file: NotFound for a
// missing path; InvalidArgument for an unknown format, a val_fraction outside
// [0, 1), seq_len < 1, a bad shard, no readable text, a training part shorter
// than seq_len + 1 tokens, or (when val_fraction > 0) a validation part
// shorter than seq_len + 1 tokens.
absl::StatusOr<TokenCorpus> LoadTokenCorpus(const muonps::v1::DataConfig& data, int vocab_size,
                                            int seq_len);

}  // namespace muonps

#endif  // MUONPS_DATA_TOKEN_SOURCE_H_
