#include "common/parallel.h"

#include <algorithm>
#include <atomic>

namespace muonps {
namespace {
std::atomic<int> g_threads{0};  // 0: not set, OpenMP's default

// OpenMP's default team size (OMP_NUM_THREADS, else the cores), read once at
// load time: the per-thread setting is later pinned to 1 by Sgemm
// (common/gemm.h), so it cannot be read again.
const int g_default_threads = omp_get_max_threads();
}  // namespace

int RegionThreads() {
  const int threads = g_threads.load(std::memory_order_relaxed);
  return threads > 0 ? threads : std::max(1, g_default_threads);
}

void SetNumThreads(int threads) {
  threads = std::max(1, threads);
  g_threads.store(threads);
  omp_set_max_active_levels(1);
}

int NumThreads() { return RegionThreads(); }

}  // namespace muonps
