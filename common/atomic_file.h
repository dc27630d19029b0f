// Whole-file reads and crash-safe whole-file writes.
//
// A file written with WriteFileAtomically is either absent, the old version,
// or the complete new version after a crash at any point: the bytes go to a
// temporary file in the same directory, which is fsynced and then renamed
// over the destination, and the directory entry is fsynced too.
#ifndef MUONPS_COMMON_ATOMIC_FILE_H_
#define MUONPS_COMMON_ATOMIC_FILE_H_

#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace muonps {

// The whole contents of the file at `path`. NotFound (naming the path) when
// it does not exist; other I/O failures map from errno, also naming the path.
absl::StatusOr<std::string> ReadFileToString(const std::string& path);

// Replaces the file at `path` with `contents`: writes `path.tmp.<pid>` in the
// same directory, fsyncs it, renames it over `path` and fsyncs the directory.
// On failure the temporary file is removed and `path` is left untouched.
// Not safe for two threads of one process writing the same path at once.
absl::Status WriteFileAtomically(const std::string& path, std::string_view contents);

// Same, with the contents given as consecutive pieces written in order, so a
// large file can be assembled from existing buffers without copying them.
absl::Status WriteFileAtomically(const std::string& path,
                                 const std::vector<std::string_view>& pieces);

}  // namespace muonps

#endif  // MUONPS_COMMON_ATOMIC_FILE_H_
