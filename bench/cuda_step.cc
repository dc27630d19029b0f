// GPU figures, each next to its baseline measured in the same run
// (scripts/device_check.sh runs it on a machine with an NVIDIA GPU):
//   - a worker's slot (forward + backward) on the CUDA backend for the
//     default model and the small preset: tokens/s and model FLOP
//     utilisation against --peak_tflops, and the same slot on the CPU;
//   - Newton-Schulz (5 steps) on cuBLAS, fp32 and bf16, on Moonlight's
//     expert shapes batched and a square matrix, against a strided-batched
//     GEMM of the same products' FLOPs (goal: NS at >= 0.8 of that rate).
//
//   ./build/bench/cuda_step [--reps=5] [--peak_tflops=67] [--cpu_reps=1]
//
// Figures are medians over --reps timed runs after one warm-up.
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <string>
#include <vector>

#include "bench/bench_util.h"
#include "common/blas_runtime.h"
#include "common/job_spec.h"
#include "common/model_layout.h"
#include "common/parallel.h"
#include "common/philox.h"
#include "model/moe_model.h"
#include "optim/newton_schulz.h"
#include "workers/cuda/cuda_backend.h"
#include "workers/cuda/cuda_status.h"
#include "workers/cuda/newton_schulz.h"
#include "workers/worker/worker.h"

namespace muonps {
namespace {

constexpr double kNsGoal = 0.8;

[[noreturn]] void Die(const std::string& what) { muonps::Die("cuda_step", what); }

double Seconds(std::chrono::steady_clock::time_point start) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
}

// Median seconds of one slot's ForwardBackward on `backend`.
double SlotSeconds(const v1::JobSpec& job, ComputeBackend* backend, int reps) {
  const v1::ModelConfig& m = job.model();
  MoeModel model(m, backend);
  const ModelLayout& layout = model.layout();
  BackendArray<float> params, grads;
  params.Assign(backend, layout.total_floats());
  grads.Assign(backend, layout.total_floats());
  std::vector<float> host(layout.total_floats());
  InitParameters(layout, job.seed(), m.initializer_range(), host.data());
  backend->Copy(params.data(), host.data(), host.size() * sizeof(float));
  const int B = job.batch().micro_batch(), T = m.max_position_embeddings();
  std::vector<int32_t> inputs(static_cast<size_t>(B) * T), targets(inputs.size());
  for (size_t i = 0; i < inputs.size(); ++i) {
    inputs[i] = static_cast<int32_t>((i * 7919 + 13) % m.vocab_size());
    targets[i] = static_cast<int32_t>((i * 104729 + 7) % m.vocab_size());
  }
  std::vector<double> times;
  for (int r = 0; r <= reps; ++r) {
    backend->Zero(grads.data(), static_cast<int64_t>(grads.size()));
    backend->Synchronize();
    const auto start = std::chrono::steady_clock::now();
    model.ForwardBackward(params.data(), inputs.data(), targets.data(), B, 1.0f / (B * T), 0.0f,
                          grads.data());
    if (r > 0) times.push_back(Seconds(start));  // the first run warms up
  }
  return Median(times);
}

void SlotRow(const std::string& preset, ComputeBackend* gpu, int reps, int cpu_reps,
             double peak_flops) {
  absl::StatusOr<v1::JobSpec> job = PresetJobSpec(preset);
  if (!job.ok()) Die(std::string(job.status().message()));
  const v1::ModelConfig& m = job->model();
  const double tokens =
      static_cast<double>(job->batch().micro_batch()) * m.max_position_embeddings();
  const double flops = ModelFlopsPerToken(m) * tokens;
  const double gpu_s = SlotSeconds(*job, gpu, reps);
  const double cpu_s = SlotSeconds(*job, CpuBackend(), cpu_reps);
  std::printf(
      "| slot, %s preset (%.0f tokens) | %.1f ms, %.0f tokens/s, MFU %.1f%% (fp32) | "
      "CPU %.1f ms (%d threads): GPU/CPU speed %.1fx |\n",
      preset.c_str(), tokens, gpu_s * 1e3, tokens / gpu_s, flops / gpu_s / peak_flops * 1e2,
      cpu_s * 1e3, NumThreads(), cpu_s / gpu_s);
  std::fflush(stdout);
}

float* DeviceRandom(int64_t n) {
  std::vector<float> host(static_cast<size_t>(n));
  FillNormal(host.data(), n, 5, "ns", 1.0);
  void* p = nullptr;
  if (cudaMalloc(&p, n * sizeof(float)) != cudaSuccess) Die("cudaMalloc");
  cudaMemcpy(p, host.data(), n * sizeof(float), cudaMemcpyHostToDevice);
  return static_cast<float*>(p);
}

void NsRow(cuda::NewtonSchulzRunner& ns, int rows, int cols, int batch, cuda::NsPrecision p,
           int reps) {
  const int64_t size = static_cast<int64_t>(rows) * cols;
  float* in = DeviceRandom(size * batch);
  float* out = DeviceRandom(size * batch);
  const int m = std::min(rows, cols), n = std::max(rows, cols);
  float* a = DeviceRandom(static_cast<int64_t>(m) * n * batch);
  float* b = DeviceRandom(static_cast<int64_t>(n) * m * batch);
  float* c = DeviceRandom(static_cast<int64_t>(m) * m * batch);
  auto time = [&](const std::function<absl::Status()>& fn) {
    std::vector<double> t;
    for (int r = 0; r <= reps; ++r) {
      cudaDeviceSynchronize();
      const auto start = std::chrono::steady_clock::now();
      if (absl::Status st = fn(); !st.ok()) Die(st.ToString());
      cudaDeviceSynchronize();
      if (r > 0) t.push_back(Seconds(start));
    }
    return Median(t);
  };
  const double ns_s = time([&] { return ns.Run(out, in, rows, cols, batch, 5, p); });
  // The same FLOPs as (m, n) x (n, m) products: NewtonSchulzFlops / (2 m^2 n) of them.
  const double ns_flops = NewtonSchulzFlops(rows, cols, 5) * batch;
  const double one = 2.0 * m * m * n * batch;
  const int products = std::max(1, static_cast<int>(ns_flops / one + 0.5));
  const double gemm_s = time([&] {
    for (int i = 0; i < products; ++i) {
      if (absl::Status st = ns.Gemm(c, a, b, m, m, n, batch, p); !st.ok()) return st;
    }
    return absl::OkStatus();
  });
  const double ns_rate = ns_flops / ns_s, gemm_rate = products * one / gemm_s;
  const double ratio = ns_rate / gemm_rate;
  std::printf(
      "| NS5 %s %dx%d x%d | %.2f ms, %.1f TFLOP/s | GEMM %.1f TFLOP/s: ratio %.2f (goal >= "
      "%.1f: %s) |\n",
      p == cuda::NsPrecision::kBF16 ? "bf16" : "fp32", rows, cols, batch, ns_s * 1e3,
      ns_rate * 1e-12, gemm_rate * 1e-12, ratio, kNsGoal, ratio >= kNsGoal ? "met" : "NOT MET");
  std::fflush(stdout);
  for (float* ptr : {in, out, a, b, c}) cudaFree(ptr);
}

}  // namespace
}  // namespace muonps

int main(int argc, char** argv) {
  muonps::PrepareComputeRuntime(argc, argv);
  int reps = 5, cpu_reps = 1;
  double peak_tflops = 67.0;  // H100 SXM fp32 (non-tensor) peak
  for (int i = 1; i < argc; ++i) {
    if (std::strncmp(argv[i], "--reps=", 7) == 0) {
      reps = std::max(1, std::atoi(argv[i] + 7));
    } else if (std::strncmp(argv[i], "--cpu_reps=", 11) == 0) {
      cpu_reps = std::max(1, std::atoi(argv[i] + 11));
    } else if (std::strncmp(argv[i], "--peak_tflops=", 14) == 0) {
      peak_tflops = std::atof(argv[i] + 14);
    } else {
      std::fprintf(stderr, "usage: %s [--reps=N] [--cpu_reps=N] [--peak_tflops=F]\n", argv[0]);
      return 2;
    }
  }
  std::string why;
  if (muonps::cuda::VisibleDevices(&why) == 0) {
    std::printf("cuda_step: no CUDA device visible (%s): nothing measured\n", why.c_str());
    return 0;
  }
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  std::printf(
      "device: %s (sm_%d%d, %.0f GiB); CPU BLAS %s, %d threads; peak for MFU %.1f TFLOP/s\n",
      prop.name, prop.major, prop.minor, prop.totalGlobalMem / 1073741824.0,
      muonps::BlasCoreName().c_str(), muonps::NumThreads(), peak_tflops);
  std::printf("| figure | GPU | baseline in the same run |\n|---|---|---|\n");
  absl::StatusOr<std::unique_ptr<muonps::ComputeBackend>> gpu = muonps::cuda::CreateCudaBackend(0);
  if (!gpu.ok()) muonps::Die("cuda_step", gpu.status().ToString());
  for (const char* preset : {"default", "small"}) {
    muonps::SlotRow(preset, gpu->get(), reps, cpu_reps, peak_tflops * 1e12);
  }
  absl::StatusOr<muonps::cuda::NewtonSchulzRunner> ns =
      muonps::cuda::NewtonSchulzRunner::Create(nullptr);
  if (!ns.ok()) muonps::Die("cuda_step", ns.status().ToString());
  // Moonlight-16B-A3B: routed experts 1408 x 2048 (gate/up), 64 per layer;
  // attention-sized 2048 x 2048.
  for (auto p : {muonps::cuda::NsPrecision::kF32, muonps::cuda::NsPrecision::kBF16}) {
    muonps::NsRow(*ns, 1408, 2048, 16, p, reps);
    muonps::NsRow(*ns, 2048, 2048, 1, p, reps);
  }
  return 0;
}
