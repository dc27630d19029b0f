#include "common/confine.h"

#include <filesystem>
#include <system_error>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace muonps {
namespace {

namespace fs = std::filesystem;

// The absolute, symlink-free form of `path` as far as it exists.
fs::path Resolve(const std::string& path, std::error_code& ec) {
  fs::path p = fs::absolute(fs::path(path), ec);
  if (ec) return {};
  p = fs::weakly_canonical(p, ec);
  if (ec) return {};
  return p.lexically_normal();
}

bool Within(const fs::path& path, const fs::path& root) {
  auto p = path.begin();
  for (auto r = root.begin(); r != root.end(); ++r, ++p) {
    if (r->empty()) continue;  // a trailing separator
    if (p == path.end() || *p != *r) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<std::string> ConfinedPath(const std::string& path,
                                         const std::vector<std::string>& roots,
                                         absl::string_view field) {
  if (path.empty()) return absl::InvalidArgumentError(absl::StrCat(field, ": empty path"));
  if (path.size() > 4096 || path.find('\0') != std::string::npos) {
    return absl::InvalidArgumentError(absl::StrCat(field, ": not a valid path"));
  }
  auto refuse = [&] {
    return absl::PermissionDeniedError(absl::StrCat(
        field, ": \"", path, "\" is not under ",
        roots.empty() ? "any allowed root (none is configured)"
                      : absl::StrCat("the allowed roots [", absl::StrJoin(roots, ", "), "]")));
  };
  std::error_code ec;
  const fs::path resolved = Resolve(path, ec);
  if (ec) return refuse();
  for (const std::string& root : roots) {
    std::error_code root_ec;
    const fs::path r = Resolve(root, root_ec);
    if (!root_ec && Within(resolved, r)) return resolved.string();
  }
  return refuse();
}

}  // namespace muonps
