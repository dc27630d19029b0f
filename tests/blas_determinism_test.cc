// Every BLAS entry point of muonps, through its wrapper, gives the same bits
// at 1, 2 and 3 threads, called from the main thread, from a thread that
// never configured OpenMP (as a gRPC handler is), and from inside a parallel
// region: on the shapes the default model and its optimizer use, and on the
// shapes where OpenBLAS's own threading was seen to change the bits.
//
// The suite holds for whichever OpenBLAS kernel the process runs;
// tests/blas_kernels.sh reruns it under every kernel this CPU can execute.
#include <gtest/gtest.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "common/blas_runtime.h"
#include "common/gemm.h"
#include "common/job_spec.h"
#include "common/model_layout.h"
#include "common/numerics.h"
#include "common/parallel.h"
#include "common/philox.h"
#include "model/ops.h"
#include "optim/newton_schulz.h"

namespace muonps {
namespace {

std::vector<float> Random(int64_t n, const std::string& name, double stddev = 1.0) {
  std::vector<float> v(static_cast<size_t>(n));
  FillNormal(v.data(), n, 42, name, stddev);
  return v;
}

// Where a computation runs.
enum class Caller { kMainThread, kFreshThread, kInsideParallelRegion };

std::string CallerName(Caller c) {
  switch (c) {
    case Caller::kMainThread:
      return "main thread";
    case Caller::kFreshThread:
      return "fresh std::thread";
    case Caller::kInsideParallelRegion:
      return "inside a parallel region";
  }
  return "?";
}

// Runs `fn` with `threads` threads configured, from `caller`.
void RunAs(Caller caller, int threads, const std::function<void()>& fn) {
  SetNumThreads(threads);
  switch (caller) {
    case Caller::kMainThread:
      fn();
      break;
    case Caller::kFreshThread: {
      std::thread t(fn);
      t.join();
      break;
    }
    case Caller::kInsideParallelRegion:
      // One iteration does the work; the others keep the region busy, so the
      // work runs in an active region of `threads` threads.
      ParallelFor(threads, [&](int64_t i) {
        if (i == 0) fn();
      });
      break;
  }
}

// `compute` writes its result; it must give the bits of the main thread at
// one thread, for every thread count and caller.
void ExpectSameEverywhere(const std::string& what,
                          const std::function<std::vector<float>()>& compute) {
  std::vector<float> want;
  RunAs(Caller::kMainThread, 1, [&] { want = compute(); });
  ASSERT_FALSE(want.empty());
  for (Caller caller : {Caller::kMainThread, Caller::kFreshThread, Caller::kInsideParallelRegion}) {
    for (int threads : {1, 2, 3}) {
      std::vector<float> got;
      RunAs(caller, threads, [&] { got = compute(); });
      ASSERT_EQ(got.size(), want.size());
      EXPECT_EQ(std::memcmp(got.data(), want.data(), want.size() * sizeof(float)), 0)
          << what << ": " << threads << " threads, " << CallerName(caller) << " (BLAS kernel "
          << BlasCoreName() << ")";
    }
  }
  SetNumThreads(2);
}

TEST(BlasDeterminismTest, TheBlasLibraryIsTheOpenMPBuild) {
  const absl::Status st = CheckBlasRuntime();
  EXPECT_TRUE(st.ok()) << st;
  EXPECT_EQ(BlasParallelMode(), 2) << BlasConfig();
}

// Under tests/blas_kernels.sh: the kernel forced is the kernel running.
TEST(BlasDeterminismTest, RunsTheKernelItWasAskedFor) {
  const char* forced = std::getenv("OPENBLAS_CORETYPE");
  if (forced == nullptr) GTEST_SKIP() << "OPENBLAS_CORETYPE not set";
  EXPECT_EQ(absl::AsciiStrToLower(BlasCoreName()), absl::AsciiStrToLower(forced));
}

struct Product {
  bool ta, tb;
  int M, N, K;
};

// The shapes from the OpenBLAS report (517x384x128, 256x128x512,
// 2048x128x1408), the default model's linear layers at micro_batch x T = 512
// rows (C = 128, 3C fused attention input, F = 512 dense, 128 experts'
// width, vocab 256) in all three products of matmul_forward/backward, and
// odd sizes.
const Product kProducts[] = {
    {false, true, 517, 384, 128}, {true, false, 256, 128, 512},  {false, false, 2048, 128, 1408},
    {false, true, 512, 512, 128}, {false, false, 512, 128, 512}, {true, false, 512, 128, 512},
    {false, true, 512, 256, 128}, {true, false, 256, 128, 512},  {false, true, 512, 128, 128},
    {true, true, 70, 300, 33},    {false, true, 1, 5, 7},
};

TEST(BlasDeterminismTest, TiledSgemmAndSgemm) {
  for (const Product& p : kProducts) {
    const std::string name =
        absl::StrCat(p.M, "x", p.N, "x", p.K, p.ta ? "T" : "N", p.tb ? "T" : "N");
    const std::vector<float> a = Random(int64_t{p.M} * p.K, "a" + name);
    const std::vector<float> b = Random(int64_t{p.K} * p.N, "b" + name);
    const std::vector<float> c0 = Random(int64_t{p.M} * p.N, "c" + name);
    const int lda = p.ta ? p.M : p.K, ldb = p.tb ? p.K : p.N;
    ExpectSameEverywhere("TiledSgemm " + name, [&] {
      std::vector<float> c = c0;
      TiledSgemm(p.ta, p.tb, p.M, p.N, p.K, 0.5f, a.data(), lda, b.data(), ldb, 1.0f, c.data(),
                 p.N);
      return c;
    });
    if (int64_t{p.M} * p.N * p.K <= int64_t{1} << 24) {
      ExpectSameEverywhere("Sgemm " + name, [&] {
        std::vector<float> c = c0;
        Sgemm(p.ta, p.tb, p.M, p.N, p.K, 0.5f, a.data(), lda, b.data(), ldb, 1.0f, c.data(), p.N);
        return c;
      });
    }
  }
  // The symmetric form Newton-Schulz uses.
  const std::vector<float> x = Random(300 * 700, "sym");
  ExpectSameEverywhere("TiledSgemm upper_only 300x300x700", [&] {
    std::vector<float> c(300 * 300, 0.0f);
    TiledSgemm(false, true, 300, 300, 700, 1.0f, x.data(), 700, x.data(), 700, 0.0f, c.data(), 300,
               GemmTiles{}, /*upper_only=*/true);
    for (int i = 0; i < 300; ++i) {
      for (int j = 0; j < i; ++j) c[i * 300 + j] = 0.0f;
    }
    return c;
  });
}

TEST(BlasDeterminismTest, NewtonSchulzOnEveryShapeOfTheDefaultModel) {
  const ModelLayout layout(DefaultJobSpec().model());
  std::vector<std::pair<int, int>> shapes = {{517, 384}, {128, 1408}};
  for (const TensorInfo& t : layout.tensors()) {
    if (t.role != TensorRole::kMatrix || t.shape.size() != 2) continue;
    const std::pair<int, int> s = {t.rows(), t.cols()};
    if (std::find(shapes.begin(), shapes.end(), s) == shapes.end()) shapes.push_back(s);
  }
  ASSERT_GE(shapes.size(), 4u);
  for (const auto& [rows, cols] : shapes) {
    const std::vector<float> g = Random(int64_t{rows} * cols, absl::StrCat("g", rows, "x", cols));
    ExpectSameEverywhere(absl::StrCat("NewtonSchulz ", rows, "x", cols),
                         [&, rows = rows, cols = cols] {
                           std::vector<float> out(g.size());
                           NewtonSchulz(out.data(), g.data(), rows, cols, 5);
                           return out;
                         });
  }
}

TEST(BlasDeterminismTest, LinearAndAttentionOpsOfTheDefaultModel) {
  const v1::ModelConfig m = DefaultJobSpec().model();
  const int B = DefaultJobSpec().batch().micro_batch(), T = m.max_position_embeddings();
  const int C = m.hidden_size(), H = m.num_attention_heads(), D = C / H;
  const int N = B * T;
  for (const auto& [ic, oc] : std::vector<std::pair<int, int>>{{C, 3 * C},
                                                               {C, m.intermediate_size()},
                                                               {m.intermediate_size(), C},
                                                               {C, m.moe_intermediate_size()},
                                                               {C, m.vocab_size()}}) {
    const std::vector<float> inp = Random(int64_t{N} * ic, "inp");
    const std::vector<float> w = Random(int64_t{oc} * ic, "w", 0.02);
    const std::vector<float> dout = Random(int64_t{N} * oc, "dout");
    ExpectSameEverywhere(absl::StrCat("matmul ", N, "x", ic, "->", oc), [&, ic = ic, oc = oc] {
      std::vector<float> out(int64_t{N} * oc), dinp(inp.size(), 0.0f), dw(w.size(), 0.0f);
      matmul_forward(out.data(), inp.data(), w.data(), N, ic, oc);
      matmul_backward(dinp.data(), dw.data(), dout.data(), inp.data(), w.data(), N, ic, oc);
      out.insert(out.end(), dinp.begin(), dinp.end());
      out.insert(out.end(), dw.begin(), dw.end());
      return out;
    });
  }
  const std::vector<float> q = Random(int64_t{N} * C, "q"), k = Random(int64_t{N} * C, "k"),
                           v = Random(int64_t{N} * C, "v"), dout = Random(int64_t{N} * C, "do");
  ExpectSameEverywhere("attention", [&] {
    std::vector<float> out(int64_t{N} * C), att(int64_t{B} * H * T * T);
    std::vector<float> dq(out.size(), 0.0f), dk(out.size(), 0.0f), dv(out.size(), 0.0f);
    attention_forward(out.data(), att.data(), q.data(), k.data(), v.data(), B, T, H, D);
    attention_backward(dq.data(), dk.data(), dv.data(), dout.data(), q.data(), k.data(), v.data(),
                       att.data(), B, T, H, D);
    for (const auto* x : {&dq, &dk, &dv}) out.insert(out.end(), x->begin(), x->end());
    return out;
  });
}

// The fingerprint the cluster compares is a property of the kernel, not of
// the thread count or of the thread that computes it.
TEST(BlasDeterminismTest, NumericsFingerprintIgnoresThreads) {
  ExpectSameEverywhere("fingerprint", [] {
    const uint64_t h = ComputeNumericsFingerprint();
    std::vector<float> out(2);
    std::memcpy(out.data(), &h, sizeof(h));
    return out;
  });
  EXPECT_EQ(LocalNumerics().blas_core(), BlasCoreName());
  EXPECT_EQ(LocalNumerics().fingerprint().size(), 16u);
}

}  // namespace
}  // namespace muonps
