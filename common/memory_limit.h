// How much memory this process may use: what admission control compares a
// job's estimated footprint against.
#ifndef MUONPS_COMMON_MEMORY_LIMIT_H_
#define MUONPS_COMMON_MEMORY_LIMIT_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace muonps {

// The cgroup's memory limit (v2 memory.max, else v1 memory.limit_in_bytes)
// when there is one, else the machine's physical memory.
int64_t DetectedMemoryLimitBytes();

// Parses a size such as "24G", "512Mi", "1.5GiB" or "1073741824" (bytes;
// K/M/G/T are powers of 1024 with or without "i"/"iB"). 0 means "detect".
absl::StatusOr<int64_t> ParseMemorySize(const std::string& text);

// Bytes as "1.5 GiB".
std::string FormatBytes(double bytes);

}  // namespace muonps

#endif  // MUONPS_COMMON_MEMORY_LIMIT_H_
