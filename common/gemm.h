// Every matrix product of muonps goes through this file, the only one that
// calls the BLAS library.
//
// Why: a multithreaded OpenBLAS sgemm partitions its output by the number of
// threads, and its edge kernels round differently from its main kernels, so
// the same product can differ in the last bit between 1 and 2 threads (seen
// with OpenBLAS 0.3.21 on AVX2 kernels at shapes such as 517x384x128). Worse,
// the OpenMP build of OpenBLAS takes its thread count from the *calling*
// thread's OpenMP settings, so a product made from a gRPC handler thread used
// all cores even in a process started with one thread.
//
// The guarantee: muonps links OpenBLAS's OpenMP build (CheckBlasRuntime() in
// common/blas_runtime.h refuses any other), which computes a call on the
// calling thread alone when that thread's omp_get_max_threads() is 1 or it is
// inside an active parallel region. Sgemm, the only caller of cblas_sgemm,
// sets the calling thread's OpenMP thread count to 1 before every call
// (ParallelFor names its team size explicitly, so nothing else reads it):
// one BLAS call is always computed by one thread, with a blocking that
// depends only on its shape and the kernel. All parallelism is ours: TiledSgemm cuts C into tiles
// of a fixed size and spreads those tiles over the threads, so which call computes an element, and
// so its rounding, depends only on the shapes, never on the thread count, on whether the call is
// made inside another parallel region, or on which thread makes it.
#ifndef MUONPS_COMMON_GEMM_H_
#define MUONPS_COMMON_GEMM_H_

#include <cstdint>

namespace muonps {

struct GemmTiles {
  int rows = 128;  // tile height (rows of C)
  int cols = 256;  // tile width (columns of C)
};

// C (M, N) = alpha * op(A) · op(B) + beta * C, all row-major, where op(A) is
// (M, K) and op(B) is (K, N): one BLAS call on the calling thread. For
// products inside a parallel loop of the caller's (e.g. one per attention
// head). K <= 0 scales C by beta.
void Sgemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* a,
           int64_t lda, const float* b, int64_t ldb, float beta, float* c, int64_t ldc);

// The same product spread over the threads (ParallelFor) as one Sgemm per
// output tile of `tiles`. With upper_only (M == N; tiles made square) only the
// tiles on or above the diagonal are computed: enough for a symmetric result
// whose lower triangle the caller mirrors. Inside another parallel region the
// tiles run one after the other on the calling thread, with the same bits.
void TiledSgemm(bool trans_a, bool trans_b, int M, int N, int K, float alpha, const float* a,
                int lda, const float* b, int ldb, float beta, float* c, int ldc,
                GemmTiles tiles = {}, bool upper_only = false);

}  // namespace muonps

#endif  // MUONPS_COMMON_GEMM_H_
