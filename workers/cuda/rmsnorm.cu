#include "workers/cuda/rmsnorm.h"

namespace muonps::cuda {
namespace {

// One warp per row: lanes stride over channels, then a butterfly reduction.
__global__ void RmsnormForwardKernel(float* out, float* rstd, const float* inp, const float* weight,
                                     int N, int C, float eps) {
  const int row = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  if (row >= N) return;
  const float* x = inp + static_cast<size_t>(row) * C;
  float sum = 0.0f;
  for (int c = lane; c < C; c += 32) sum += x[c] * x[c];
  for (int offset = 16; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  const float s = rsqrtf(sum / C + eps);
  if (lane == 0) rstd[row] = s;
  float* o = out + static_cast<size_t>(row) * C;
  for (int c = lane; c < C; c += 32) o[c] = x[c] * s * weight[c];
}

}  // namespace

cudaError_t RmsnormForward(float* out, float* rstd, const float* inp, const float* weight, int N,
                           int C, float eps, cudaStream_t stream) {
  constexpr int kThreads = 256;
  constexpr int kRowsPerBlock = kThreads / 32;
  const int blocks = (N + kRowsPerBlock - 1) / kRowsPerBlock;
  RmsnormForwardKernel<<<blocks, kThreads, 0, stream>>>(out, rstd, inp, weight, N, C, eps);
  return cudaGetLastError();
}

}  // namespace muonps::cuda
