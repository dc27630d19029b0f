// CUDA RMSNorm forward: the GPU twin of rmsnorm_forward in model/ops.h.
#ifndef MUONPS_WORKERS_CUDA_RMSNORM_H_
#define MUONPS_WORKERS_CUDA_RMSNORM_H_

#include <cuda_runtime.h>

namespace muonps::cuda {

// out (N, C), rstd (N), inp (N, C), weight (C): device pointers.
// Launches on `stream`; returns the launch status.
cudaError_t RmsnormForward(float* out, float* rstd, const float* inp, const float* weight, int N,
                           int C, float eps, cudaStream_t stream);

}  // namespace muonps::cuda

#endif  // MUONPS_WORKERS_CUDA_RMSNORM_H_
