#include "common/parallel.h"

#include <algorithm>
#include <atomic>

#include <cblas.h>

namespace muonps {
namespace {
std::atomic<int> g_threads{0};  // 0: not set, OpenMP's default
}  // namespace

int RegionThreads() {
  const int threads = g_threads.load(std::memory_order_relaxed);
  return threads > 0 ? threads : omp_get_max_threads();
}

void SetNumThreads(int threads) {
  threads = std::max(1, threads);
  g_threads.store(threads);
  omp_set_num_threads(threads);
  omp_set_max_active_levels(1);
  openblas_set_num_threads(threads);
}

int NumThreads() { return RegionThreads(); }

}  // namespace muonps
