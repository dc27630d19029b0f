// Data-parallel loops over the process-wide OpenMP pool. Every BLAS call runs
// on one thread (common/gemm.h): every parallel loop of muonps is one of these,
// and each names its team size, so results never depend on the per-thread
// OpenMP setting.
//
// Contract for every kernel that uses ParallelFor: each output element is
// produced by exactly one iteration, in an order fixed by the code and not by
// the partition, so results are bit-identical for any thread count.
//
// Under ThreadSanitizer (scripts/sanitize.sh tsan) both loops run serially on
// the calling thread, and so the OpenMP runtime never starts a thread: libgomp
// is not instrumented, TSan cannot see the barriers that end a parallel
// region, and it would report every hand-off between a region's threads as a
// race. By the contract above the results are the same bits; what TSan then
// checks are the threads muonps starts itself (gRPC handlers, service loops).
// MUONPS_SERIAL_LOOPS=1 asks for the serial loops in any build.
#ifndef MUONPS_COMMON_PARALLEL_H_
#define MUONPS_COMMON_PARALLEL_H_

#include <omp.h>

#include <cstdint>

#ifndef MUONPS_SERIAL_LOOPS
#if defined(__SANITIZE_THREAD__)  // GCC
#define MUONPS_SERIAL_LOOPS 1
#elif defined(__has_feature)  // clang
#if __has_feature(thread_sanitizer)
#define MUONPS_SERIAL_LOOPS 1
#endif
#endif
#endif
#ifndef MUONPS_SERIAL_LOOPS
#define MUONPS_SERIAL_LOOPS 0
#endif

namespace muonps {

// Whether ParallelFor and ParallelForDynamic run serially (see above).
inline constexpr bool kSerialLoops = MUONPS_SERIAL_LOOPS != 0;

// Threads for a new parallel region: the count set by SetNumThreads, on
// every thread of the process (OpenMP's own setting is per thread, so gRPC
// handler threads would otherwise use all cores).
int RegionThreads();

// Calls fn(i) for i in [0, n), statically partitioned over the threads.
// Inside another parallel region, or with kSerialLoops, it runs serially.
template <typename Fn>
void ParallelFor(int64_t n, Fn&& fn) {
  if (n <= 0) return;
  if (kSerialLoops || omp_in_parallel()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
#pragma omp parallel for schedule(static) num_threads(RegionThreads())
  for (int64_t i = 0; i < n; ++i) fn(i);
}

// Calls fn(i) for i in [0, n), handing iterations to threads as they become
// free: for uneven work whose results do not depend on which thread runs it.
// Inside another parallel region, or with kSerialLoops, it runs serially.
template <typename Fn>
void ParallelForDynamic(int64_t n, Fn&& fn) {
  if (n <= 0) return;
  if (kSerialLoops || omp_in_parallel()) {
    for (int64_t i = 0; i < n; ++i) fn(i);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(RegionThreads())
  for (int64_t i = 0; i < n; ++i) fn(i);
}

// Sets the number of threads used by ParallelFor (>= 1), and so by TiledSgemm. Nested
// regions run on one thread: a loop inside a ParallelFor iteration is serial.
void SetNumThreads(int threads);
// The current number of threads.
int NumThreads();

}  // namespace muonps

#endif  // MUONPS_COMMON_PARALLEL_H_
