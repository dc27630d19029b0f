// Newton-Schulz on the GPU for optimizer shards (`muonps shard --device
// cuda`): the quintic iteration of optim/newton_schulz.h on cuBLAS, a batch
// of same-shaped matrices (the routed experts of a layer) per call, every
// product one strided-batched GEMM.
//
// Precision: kF32 computes in float32 with TF32 off (comparable with the
// CPU within the tolerances of tests/cuda_ops_test.cc); kBF16 lets cuBLAS
// round the products' inputs to bfloat16 on the tensor cores and
// accumulate in float32 (CUBLAS_COMPUTE_32F_FAST_16BF), the values staying
// float32 between products. The Frobenius norm of each matrix is a
// fixed-order block reduction in double, so a call repeated on the same
// device gives the same bits.
#ifndef MUONPS_WORKERS_CUDA_NEWTON_SCHULZ_H_
#define MUONPS_WORKERS_CUDA_NEWTON_SCHULZ_H_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace muonps::cuda {

enum class NsPrecision { kF32, kBF16 };

class NewtonSchulzRunner {
 public:
  // A cuBLAS handle on the current device, bound to `stream`.
  static absl::StatusOr<NewtonSchulzRunner> Create(cudaStream_t stream);
  NewtonSchulzRunner(NewtonSchulzRunner&& other) noexcept;
  NewtonSchulzRunner& operator=(NewtonSchulzRunner&&) = delete;
  ~NewtonSchulzRunner();

  // out[k] = NewtonSchulz(in[k]) for k < batch: `batch` row-major (rows,
  // cols) float32 matrices stored one after another on the device. out may
  // alias in. Scratch grows as needed and is kept for later calls.
  absl::Status Run(float* out, const float* in, int rows, int cols, int batch, int steps,
                   NsPrecision precision);

  // A plain strided-batched GEMM C = A B of (m, k) x (k, n), row-major, at
  // `precision`: the rate Newton-Schulz is measured against.
  absl::Status Gemm(float* c, const float* a, const float* b, int m, int n, int k, int batch,
                    NsPrecision precision);

 private:
  NewtonSchulzRunner(cublasHandle_t handle, cudaStream_t stream)
      : handle_(handle), stream_(stream) {}
  absl::Status Reserve(int64_t floats);

  cublasHandle_t handle_ = nullptr;
  cudaStream_t stream_ = nullptr;
  float* scratch_ = nullptr;
  int64_t scratch_floats_ = 0;
  double* norms_ = nullptr;
  int norms_capacity_ = 0;
};

}  // namespace muonps::cuda

#endif  // MUONPS_WORKERS_CUDA_NEWTON_SCHULZ_H_
