#include "common/failpoint.h"

#include <signal.h>

#include <atomic>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <map>
#include <memory>
#include <string>

#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"

namespace muonps {
namespace {

struct Point {
  int64_t at = 0;  // the pass that kills
  std::atomic<int64_t> passes{0};
};

// The points MUONPS_FAILPOINTS names; empty when unset. A malformed entry
// is ignored (with a note on stderr): a fail point is a test's tool, never
// a reason for a service not to start.
const std::map<std::string, std::unique_ptr<Point>>& Points() {
  static const auto* points = [] {
    auto* out = new std::map<std::string, std::unique_ptr<Point>>();
    const char* env = std::getenv("MUONPS_FAILPOINTS");
    if (env == nullptr) return out;
    for (absl::string_view entry : absl::StrSplit(env, ',', absl::SkipWhitespace())) {
      const std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(entry, '@');
      int64_t at = 0;
      if (kv.first.empty() || !absl::SimpleAtoi(kv.second, &at) || at < 1) {
        std::fprintf(stderr, "MUONPS_FAILPOINTS: ignoring '%.*s' (want NAME@PASS, PASS >= 1)\n",
                     static_cast<int>(entry.size()), entry.data());
        continue;
      }
      auto point = std::make_unique<Point>();
      point->at = at;
      (*out)[std::string(kv.first)] = std::move(point);
    }
    return out;
  }();
  return *points;
}

std::atomic<bool> g_armed{std::getenv("MUONPS_FAILPOINTS") != nullptr};

}  // namespace

void FailPoint(const char* name) {
  if (!g_armed.load(std::memory_order_relaxed)) return;
  const auto& points = Points();
  const auto it = points.find(name);
  if (it == points.end()) return;
  if (it->second->passes.fetch_add(1) + 1 == it->second->at) {
    std::fprintf(stderr, "fail point %s: killing this process (pass %lld)\n", name,
                 static_cast<long long>(it->second->at));
    std::fflush(stderr);
    raise(SIGKILL);
  }
}

}  // namespace muonps
