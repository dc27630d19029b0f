// Small helpers the benchmark programs share.
#ifndef MUONPS_BENCH_BENCH_UTIL_H_
#define MUONPS_BENCH_BENCH_UTIL_H_

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

namespace muonps {

// Median of `v` (the mean of the middle two for an even count); v non-empty.
inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const size_t mid = v.size() / 2;
  return v.size() % 2 == 1 ? v[mid] : 0.5 * (v[mid - 1] + v[mid]);
}

// Prints "PROGRAM: WHAT" to stderr and exits with status 1.
[[noreturn]] inline void Die(const char* program, const std::string& what) {
  std::fprintf(stderr, "%s: %s\n", program, what.c_str());
  std::exit(1);
}

}  // namespace muonps

#endif  // MUONPS_BENCH_BENCH_UTIL_H_
