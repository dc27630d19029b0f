// The CUDA kernels against the CPU ops they mirror, on random inputs, with
// per-op tolerances, and Newton-Schulz on cuBLAS against the float64
// PyTorch golden vectors and the CPU, in float32 and bfloat16, batched and
// repeated (the same bits twice on one device), and the shard's
// orthogonalizer from several threads. The CUDA ComputeBackend has its own
// tests (cuda_backend_test.cc).
//
// Without a GPU every test is skipped with the reason (built without CUDA,
// or what cudaGetDeviceCount said); scripts/device_check.sh runs them on a
// machine with one.
#include <gtest/gtest.h>

#include <cmath>
#include <fstream>
#include <memory>
#include <nlohmann/json.hpp>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "model/ops.h"
#include "optim/newton_schulz.h"

#if MUONPS_HAVE_CUDA
#include "tests/cuda_test_util.h"
#include "workers/cuda/cuda_orthogonalizer.h"
#include "workers/cuda/elementwise_kernels.h"
#include "workers/cuda/newton_schulz.h"
#endif

namespace muonps {
namespace {

#if MUONPS_HAVE_CUDA

class CudaOpsTest : public CudaDeviceTest {
 protected:
  // Device copies that free themselves.
  struct Buffer {
    float* p = nullptr;
    size_t n = 0;
    explicit Buffer(const std::vector<float>& host) : n(host.size()) {
      EXPECT_EQ(cudaMalloc(&p, n * sizeof(float)), cudaSuccess);
      EXPECT_EQ(cudaMemcpy(p, host.data(), n * sizeof(float), cudaMemcpyHostToDevice), cudaSuccess);
    }
    ~Buffer() { cudaFree(p); }
    std::vector<float> Host() const {
      std::vector<float> out(n);
      EXPECT_EQ(cudaDeviceSynchronize(), cudaSuccess);
      EXPECT_EQ(cudaMemcpy(out.data(), p, n * sizeof(float), cudaMemcpyDeviceToHost), cudaSuccess);
      return out;
    }
  };
};

TEST_F(CudaOpsTest, RmsnormForwardAndBackwardMatchTheCpu) {
  const int N = 96, C = 200;
  const float eps = 1e-6f;
  const std::vector<float> x = Random(N * C, "x"), w = Random(C, "w"), dy = Random(N * C, "dy");
  std::vector<float> out(N * C), rstd(N), dx(N * C, 0.0f), dw(C, 0.0f);
  rmsnorm_forward(out.data(), rstd.data(), x.data(), w.data(), N, C, eps);
  rmsnorm_backward(dx.data(), dw.data(), dy.data(), x.data(), w.data(), rstd.data(), N, C);
  Buffer gx(x), gw(w), gdy(dy), gout(Zeros(N * C)), grstd(Zeros(N)), gdx(Zeros(N * C)),
      gdw(Zeros(C));
  ASSERT_EQ(cuda::RmsnormForward(gout.p, grstd.p, gx.p, gw.p, N, C, eps, nullptr), cudaSuccess);
  ASSERT_EQ(cuda::RmsnormBackward(gdx.p, gdw.p, gdy.p, gx.p, gw.p, grstd.p, N, C, nullptr),
            cudaSuccess);
  EXPECT_LE(RelMaxError(gout.Host(), out), kReductionTol);
  EXPECT_LE(RelMaxError(grstd.Host(), rstd), kReductionTol);
  EXPECT_LE(RelMaxError(gdx.Host(), dx), kReductionTol);
  EXPECT_LE(RelMaxError(gdw.Host(), dw), kReductionTol);
}

TEST_F(CudaOpsTest, RopeForwardAndBackwardMatchTheCpu) {
  const int B = 2, T = 16, H = 3, D = 8, n = B * T * H * D;
  std::vector<float> cos(T * D / 2), sin(T * D / 2);
  rope_tables(cos.data(), sin.data(), T, D, 10000.0);
  const std::vector<float> x = Random(n, "x"), dy = Random(n, "dy");
  std::vector<float> out(n), dx(n, 0.0f);
  rope_forward(out.data(), x.data(), cos.data(), sin.data(), B, T, H, D);
  rope_backward(dx.data(), dy.data(), cos.data(), sin.data(), B, T, H, D);
  Buffer gc(cos), gs(sin), gx(x), gdy(dy), gout(Zeros(n)), gdx(Zeros(n));
  ASSERT_EQ(cuda::RopeForward(gout.p, gx.p, gc.p, gs.p, B, T, H, D, nullptr), cudaSuccess);
  ASSERT_EQ(cuda::RopeBackward(gdx.p, gdy.p, gc.p, gs.p, B, T, H, D, nullptr), cudaSuccess);
  EXPECT_LE(RelMaxError(gout.Host(), out), kElementwiseTol);
  EXPECT_LE(RelMaxError(gdx.Host(), dx), kElementwiseTol);
}

TEST_F(CudaOpsTest, SwigluForwardAndBackwardMatchTheCpu) {
  const int64_t N = 77;
  const int F = 40;
  const std::vector<float> g = Random(N * F, "g", 3.0), u = Random(N * F, "u"),
                           dy = Random(N * F, "dy");
  std::vector<float> out(N * F), dg(N * F, 0.0f), du(N * F, 0.0f);
  swiglu_forward(out.data(), g.data(), u.data(), N, F);
  swiglu_backward(dg.data(), du.data(), dy.data(), g.data(), u.data(), N, F);
  Buffer gg(g), gu(u), gdy(dy), gout(Zeros(N * F)), gdg(Zeros(N * F)), gdu(Zeros(N * F));
  ASSERT_EQ(cuda::SwigluForward(gout.p, gg.p, gu.p, N, F, nullptr), cudaSuccess);
  ASSERT_EQ(cuda::SwigluBackward(gdg.p, gdu.p, gdy.p, gg.p, gu.p, N, F, nullptr), cudaSuccess);
  EXPECT_LE(RelMaxError(gout.Host(), out), kElementwiseTol);
  EXPECT_LE(RelMaxError(gdg.Host(), dg), kElementwiseTol);
  EXPECT_LE(RelMaxError(gdu.Host(), du), kElementwiseTol);
}

const nlohmann::json& Golden() {
  static const nlohmann::json* golden = [] {
    std::ifstream file(std::string(MUONPS_TEST_DATA_DIR) + "/muon_golden.json");
    return new nlohmann::json(nlohmann::json::parse(file, nullptr, false));
  }();
  return *golden;
}

// ||a - ref|| / ||ref|| in double.
double RelError(const std::vector<float>& a, const std::vector<double>& ref) {
  double d = 0.0, r = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    d += (a[i] - ref[i]) * (a[i] - ref[i]);
    r += ref[i] * ref[i];
  }
  return std::sqrt(d / r);
}

TEST_F(CudaOpsTest, NewtonSchulzMatchesTheGoldenVectorsInFloat32AndBfloat16) {
  absl::StatusOr<cuda::NewtonSchulzRunner> ns = cuda::NewtonSchulzRunner::Create(nullptr);
  ASSERT_TRUE(ns.ok()) << ns.status();
  ASSERT_FALSE(Golden()["ns5"].empty());
  for (const auto& c : Golden()["ns5"]) {
    const int rows = c["rows"], cols = c["cols"];
    SCOPED_TRACE(std::to_string(rows) + "x" + std::to_string(cols));
    std::vector<float> in;
    for (const auto& v : c["input"]) in.push_back(static_cast<float>(v.get<double>()));
    const std::vector<double> ref = c["output"].get<std::vector<double>>();
    Buffer g(in), out(Zeros(in.size()));
    ASSERT_TRUE(ns->Run(out.p, g.p, rows, cols, 1, 5, cuda::NsPrecision::kF32).ok());
    EXPECT_LE(RelError(out.Host(), ref), 1e-5);
    ASSERT_TRUE(ns->Run(out.p, g.p, rows, cols, 1, 5, cuda::NsPrecision::kBF16).ok());
    EXPECT_LE(RelError(out.Host(), ref), 3e-2) << "bf16";
  }
}

TEST_F(CudaOpsTest, BatchedNewtonSchulzEqualsOneByOneAndTheCpuAndRepeatsBitForBit) {
  absl::StatusOr<cuda::NewtonSchulzRunner> ns = cuda::NewtonSchulzRunner::Create(nullptr);
  ASSERT_TRUE(ns.ok()) << ns.status();
  for (const auto& [rows, cols] : std::vector<std::pair<int, int>>{{64, 160}, {160, 64}}) {
    const int batch = 4;
    const int64_t size = static_cast<int64_t>(rows) * cols;
    const std::vector<float> in = Random(size * batch, "experts");
    Buffer g(in), out(Zeros(in.size()));
    ASSERT_TRUE(ns->Run(out.p, g.p, rows, cols, batch, 5, cuda::NsPrecision::kF32).ok());
    const std::vector<float> batched = out.Host();
    ASSERT_TRUE(ns->Run(out.p, g.p, rows, cols, batch, 5, cuda::NsPrecision::kF32).ok());
    EXPECT_EQ(batched, out.Host()) << "a repeated call changed bits";
    for (int k = 0; k < batch; ++k) {
      const std::vector<float> one_in(in.begin() + k * size, in.begin() + (k + 1) * size);
      std::vector<float> cpu(size);
      NewtonSchulz(cpu.data(), one_in.data(), rows, cols, 5);
      const std::vector<float> mine(batched.begin() + k * size, batched.begin() + (k + 1) * size);
      EXPECT_LE(RelMaxError(mine, cpu), 1e-4) << rows << "x" << cols << " matrix " << k;
    }
  }
}

// What `muonps shard --device cuda` runs: host matrices in and out, from
// several threads at once, against the CPU's NewtonSchulz.
TEST_F(CudaOpsTest, TheShardsOrthogonalizerMatchesTheCpuFromSeveralThreads) {
  absl::StatusOr<std::unique_ptr<Orthogonalizer>> gpu = cuda::CreateCudaOrthogonalizer(0);
  ASSERT_TRUE(gpu.ok()) << gpu.status();
  std::vector<std::thread> threads;
  std::vector<double> errors(4, 1.0);
  for (int k = 0; k < 4; ++k) {
    threads.emplace_back([&, k] {
      const int rows = 48 + 16 * k, cols = 96;
      const std::vector<float> in =
          Random(static_cast<int64_t>(rows) * cols, "shard" + std::to_string(k));
      std::vector<float> cpu(in.size()), mine = in;
      NewtonSchulz(cpu.data(), in.data(), rows, cols, 5);
      (*gpu)->Orthogonalize(mine.data(), rows, cols, 5);
      errors[k] = RelMaxError(mine, cpu);
    });
  }
  for (std::thread& t : threads) t.join();
  for (double e : errors) EXPECT_LE(e, 1e-4);
}

#else

TEST(CudaOpsTest, SkippedWithoutCuda) {
  GTEST_SKIP() << "built without CUDA (nvcc not found when configuring; MUONPS_CUDA=AUTO)";
}

#endif

}  // namespace
}  // namespace muonps
