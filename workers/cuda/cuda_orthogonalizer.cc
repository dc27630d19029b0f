#include "workers/cuda/cuda_orthogonalizer.h"

#include <cuda_runtime.h>

#include <cstdio>
#include <cstdlib>
#include <mutex>
#include <optional>

#include "absl/strings/str_cat.h"
#include "workers/cuda/cuda_status.h"
#include "workers/cuda/newton_schulz.h"

namespace muonps::cuda {
namespace {

class CudaOrthogonalizer final : public Orthogonalizer {
 public:
  CudaOrthogonalizer(int device, NewtonSchulzRunner runner, cudaStream_t stream)
      : device_(device),
        name_(absl::StrCat("cuda:", device)),
        runner_(std::move(runner)),
        stream_(stream) {}
  ~CudaOrthogonalizer() override {
    cudaSetDevice(device_);
    if (buffer_ != nullptr) cudaFree(buffer_);
    cudaStreamDestroy(stream_);
  }

  void Orthogonalize(float* u, int rows, int cols, int steps) override {
    std::lock_guard<std::mutex> lock(mu_);
    const size_t bytes = static_cast<size_t>(rows) * cols * sizeof(float);
    absl::Status st = CudaStatus(cudaSetDevice(device_), "cudaSetDevice");
    if (st.ok() && bytes > capacity_) {
      if (buffer_ != nullptr) cudaFree(buffer_);
      buffer_ = nullptr;
      capacity_ = 0;
      void* p = nullptr;
      st = CudaStatus(cudaMalloc(&p, bytes), "cudaMalloc");
      if (st.ok()) {
        buffer_ = static_cast<float*>(p);
        capacity_ = bytes;
      }
    }
    if (st.ok()) {
      st = CudaStatus(cudaMemcpyAsync(buffer_, u, bytes, cudaMemcpyHostToDevice, stream_),
                      "copy to the device");
    }
    if (st.ok()) st = runner_.Run(buffer_, buffer_, rows, cols, 1, steps, NsPrecision::kF32);
    if (st.ok()) {
      st = CudaStatus(cudaMemcpyAsync(u, buffer_, bytes, cudaMemcpyDeviceToHost, stream_),
                      "copy to the host");
    }
    if (st.ok()) st = CudaStatus(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    if (!st.ok()) {
      // An update computed from a failed call would be wrong: the shard
      // stops, and the coordinator recovers the job from its checkpoint.
      std::fprintf(stderr, "muonps shard: Newton-Schulz on %s failed: %s\n", name_.c_str(),
                   st.ToString().c_str());
      std::abort();
    }
  }

  const char* name() const override { return name_.c_str(); }

 private:
  const int device_;
  const std::string name_;
  std::mutex mu_;
  NewtonSchulzRunner runner_;
  cudaStream_t stream_;
  float* buffer_ = nullptr;
  size_t capacity_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Orthogonalizer>> CreateCudaOrthogonalizer(int device) {
  if (absl::Status st = CudaStatus(cudaSetDevice(device), "cudaSetDevice"); !st.ok()) return st;
  cudaStream_t stream = nullptr;
  if (absl::Status st =
          CudaStatus(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), "cudaStreamCreate");
      !st.ok()) {
    return st;
  }
  absl::StatusOr<NewtonSchulzRunner> runner = NewtonSchulzRunner::Create(stream);
  if (!runner.ok()) {
    cudaStreamDestroy(stream);
    return runner.status();
  }
  return std::unique_ptr<Orthogonalizer>(
      new CudaOrthogonalizer(device, std::move(*runner), stream));
}

}  // namespace muonps::cuda
