// Paths a request names, confined to the roots an operator configured.
#ifndef MUONPS_COMMON_CONFINE_H_
#define MUONPS_COMMON_CONFINE_H_

#include <cstddef>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/string_view.h"

namespace muonps {

// The longest path a request may name.
inline constexpr size_t kMaxPathBytes = 4096;

// `path` made absolute (relative to the working directory) with every
// symlink of its existing part followed and "."/".." removed, if it then
// lies under one of `roots` (resolved the same way) or is one of them.
// PERMISSION_DENIED otherwise, naming `field` and the roots and nothing
// about whether `path` exists; INVALID_ARGUMENT for an empty path, one over
// 4096 bytes or one with a NUL byte. No roots: every path is refused.
absl::StatusOr<std::string> ConfinedPath(const std::string& path,
                                         const std::vector<std::string>& roots,
                                         absl::string_view field);

}  // namespace muonps

#endif  // MUONPS_COMMON_CONFINE_H_
