#include "common/parallel.h"

#include <algorithm>

#include <cblas.h>

namespace muonps {

void SetNumThreads(int threads) {
  threads = std::max(1, threads);
  omp_set_num_threads(threads);
  omp_set_max_active_levels(1);
  openblas_set_num_threads(threads);
}

int NumThreads() { return omp_get_max_threads(); }

}  // namespace muonps
