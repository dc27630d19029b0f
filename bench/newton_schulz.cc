// Newton-Schulz (5 iterations, fp32) throughput next to plain BLAS sgemm on
// the same shapes, measured in the same run.
//
//   ./build-opt/bench/newton_schulz [--repeats=N]
//
// For a (rows, cols) input with m = min, n = max, NS does per iteration the
// products X X^T (m, n)(n, m), A A (m, m)(m, m) and B X (m, m)(m, n); its
// FLOP count is 2 m^2 n + 2 m^3 + 2 m^2 n per iteration (NewtonSchulzFlops),
// whatever shortcuts the implementation takes. The baseline is the BLAS
// limit of the machine: exactly those three products as single cblas_sgemm
// calls (alpha = 1, beta = 0, row-major, the X X^T one with the second
// operand transposed) on one thread, the BLAS build muonps uses being the
// single-threaded one, and their combined rate (the same FLOPs divided by
// the summed median times) times the thread count: perfect scaling, which no
// multithreaded sgemm exceeds. ratio = NS GFLOP/s / baseline GFLOP/s. NS computes only
// the upper triangle of its two symmetric products, so the ratio can exceed 1.
// Every time is the median of --repeats runs after one warm-up run.
#include "optim/newton_schulz.h"

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "common/blas_runtime.h"
#include "common/gemm.h"
#include "common/parallel.h"
#include "common/philox.h"

namespace muonps {
namespace {

constexpr double kGoalRatio = 0.8;
constexpr int kSteps = 5;

// Median wall time of fn() in seconds, after one warm-up call.
double MedianSeconds(int repeats, const std::function<void()>& fn) {
  fn();
  std::vector<double> times;
  for (int r = 0; r < repeats; ++r) {
    const auto start = std::chrono::steady_clock::now();
    fn();
    const auto stop = std::chrono::steady_clock::now();
    times.push_back(std::chrono::duration<double>(stop - start).count());
  }
  std::sort(times.begin(), times.end());
  const size_t mid = times.size() / 2;
  return times.size() % 2 == 1 ? times[mid] : 0.5 * (times[mid - 1] + times[mid]);
}

// C (M, N) = A (M, K) · op(B), op(B) = B (K, N) or B^T for B (N, K): one
// cblas_sgemm call on one thread (muonps::Sgemm pins it).
void OneThreadSgemm(bool trans_b, int M, int N, int K, const float* a, const float* b, float* c) {
  Sgemm(false, trans_b, M, N, K, 1.0f, a, K, b, trans_b ? K : N, 0.0f, c, N);
}

void RunShape(int rows, int cols, int repeats) {
  const int m = std::min(rows, cols);
  const int n = std::max(rows, cols);
  const int64_t size = static_cast<int64_t>(rows) * cols;
  std::vector<float> in(size), out(size);
  FillNormal(in.data(), size, 1, "bench_ns", 1.0);

  const double ns_s =
      MedianSeconds(repeats, [&] { NewtonSchulz(out.data(), in.data(), rows, cols, kSteps); });
  const double ns_flops = NewtonSchulzFlops(rows, cols, kSteps);

  // Operands for the baseline: x (m, n), s (m, m); products land in c.
  std::vector<float> x(in.begin(), in.end());
  std::vector<float> s(static_cast<size_t>(m) * m), c(static_cast<size_t>(m) * n);
  FillNormal(s.data(), static_cast<int64_t>(s.size()), 2, "bench_square", 1.0);
  const double xxt_s =
      MedianSeconds(repeats, [&] { OneThreadSgemm(true, m, m, n, x.data(), x.data(), c.data()); });
  const double sq_s =
      MedianSeconds(repeats, [&] { OneThreadSgemm(false, m, m, m, s.data(), s.data(), c.data()); });
  const double bx_s =
      MedianSeconds(repeats, [&] { OneThreadSgemm(false, m, n, m, s.data(), x.data(), c.data()); });
  const double mmn = 2.0 * m * m * n, mmm = 2.0 * m * m * m;
  const double baseline_gflops = (2 * mmn + mmm) / (xxt_s + sq_s + bx_s) * 1e-9 * NumThreads();
  const double ns_gflops = ns_flops / ns_s * 1e-9;
  const double ratio = ns_gflops / baseline_gflops;

  std::printf(
      "%5dx%-5d  NS %8.1f ms  %7.1f GFLOP/s | 1-thread sgemm XX^T %7.1f  AA %7.1f  BX %7.1f  "
      "x threads %7.1f GFLOP/s | ratio %.3f (%s)\n",
      rows, cols, ns_s * 1e3, ns_gflops, mmn / xxt_s * 1e-9, mmm / sq_s * 1e-9, mmn / bx_s * 1e-9,
      baseline_gflops, ratio, ratio >= kGoalRatio ? "goal met" : "BELOW GOAL");
}

}  // namespace
}  // namespace muonps

int main(int argc, char** argv) {
  muonps::PrepareComputeRuntime(argc, argv);
  int repeats = 5;
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--repeats=", 10) == 0) {
      repeats = std::max(1, std::atoi(argv[i] + 10));
    } else {
      std::fprintf(stderr, "usage: %s [--repeats=N]\n", argv[0]);
      return 2;
    }
  }
  const std::string core = muonps::BlasCoreName();
  std::printf("BLAS core: %s\nBLAS config: %s\n", core.c_str(), muonps::BlasConfig().c_str());
  std::printf("generic fallback kernel: %s\n",
              muonps::IsGenericBlasCore(core) ? "YES (slow; set OPENBLAS_CORETYPE)" : "no");
  std::printf("threads: %d   NS steps: %d   repeats: %d (median reported)   goal: ratio >= %.1f\n",
              muonps::NumThreads(), muonps::kSteps, repeats, muonps::kGoalRatio);
  std::printf("NS FLOPs/iteration: 2 m^2 n (X X^T) + 2 m^3 (A A) + 2 m^2 n (B X), m = min dim\n");
  std::printf("baseline: the same three products as one-thread cblas_sgemm, rate x threads\n");
  for (auto [rows, cols] : {std::pair{1024, 4096}, std::pair{4096, 1024}, std::pair{2048, 2048}}) {
    muonps::RunShape(rows, cols, repeats);
  }
  return 0;
}
