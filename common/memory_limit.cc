#include "common/memory_limit.h"

#include <unistd.h>

#include <cmath>
#include <fstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace muonps {
namespace {

// A positive limit read from a cgroup file; 0 when absent or unlimited.
int64_t ReadLimit(const char* path) {
  std::ifstream in(path);
  std::string text;
  if (!(in >> text) || text == "max") return 0;
  int64_t v = 0;
  if (!absl::SimpleAtoi(text, &v) || v <= 0 || v >= (int64_t{1} << 60)) return 0;
  return v;
}

}  // namespace

int64_t DetectedMemoryLimitBytes() {
  const int64_t physical =
      static_cast<int64_t>(sysconf(_SC_PHYS_PAGES)) * static_cast<int64_t>(sysconf(_SC_PAGESIZE));
  for (const char* path :
       {"/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory/memory.limit_in_bytes"}) {
    const int64_t limit = ReadLimit(path);
    if (limit > 0) return physical > 0 ? std::min(limit, physical) : limit;
  }
  return physical > 0 ? physical : (int64_t{1} << 34);
}

absl::StatusOr<int64_t> ParseMemorySize(const std::string& text) {
  std::string t(absl::StripAsciiWhitespace(text));
  double scale = 1;
  for (const char* suffix : {"iB", "i", "B"}) {
    const std::string s(suffix);
    if (t.size() > s.size() && t.compare(t.size() - s.size(), s.size(), s) == 0) {
      t.resize(t.size() - s.size());
      break;
    }
  }
  if (!t.empty()) {
    const char unit = static_cast<char>(absl::ascii_toupper(static_cast<unsigned char>(t.back())));
    const std::string units = "KMGT";
    const size_t k = units.find(unit);
    if (k != std::string::npos) {
      scale = std::pow(1024.0, static_cast<double>(k + 1));
      t.pop_back();
    }
  }
  double v = 0;
  if (t.empty() || !absl::SimpleAtod(t, &v) || !(v >= 0) || v * scale > 9.0e18) {
    return absl::InvalidArgumentError(
        absl::StrCat("--memory_limit: \"", text, "\" is not a size such as 24G or 512Mi"));
  }
  return static_cast<int64_t>(v * scale);
}

std::string FormatBytes(double bytes) {
  const char* units[] = {"B", "KiB", "MiB", "GiB", "TiB", "PiB", "EiB"};
  int u = 0;
  while (bytes >= 1024.0 && u < 6) {
    bytes /= 1024.0;
    ++u;
  }
  return absl::StrFormat("%.1f %s", bytes, units[u]);
}

}  // namespace muonps
