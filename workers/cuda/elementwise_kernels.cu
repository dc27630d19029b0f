#include "common/elementwise.h"
#include "workers/cuda/elementwise_kernels.h"

namespace muonps::cuda {
namespace {

namespace ew = ::muonps::elementwise;

constexpr int kThreads = 256;
constexpr int kWarp = 32;

int Blocks(int64_t n, int per_block) { return static_cast<int>((n + per_block - 1) / per_block); }

// Sum over a warp in a fixed butterfly order.
__device__ float WarpSum(float v) {
  for (int offset = kWarp / 2; offset > 0; offset /= 2)
    v += __shfl_xor_sync(0xffffffffu, v, offset);
  return v;
}

// One warp per row: lanes stride over channels, then the butterfly.
__global__ void RmsnormForwardKernel(float* out, float* rstd, const float* inp, const float* weight,
                                     int N, int C, float eps) {
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const float* x = inp + static_cast<int64_t>(row) * C;
  float ss = 0.0f;
  for (int c = lane; c < C; c += kWarp) ss += x[c] * x[c];
  ss = WarpSum(ss);
  const float r = ew::RmsnormInverse(ss, C, eps);
  if (lane == 0) rstd[row] = r;
  float* o = out + static_cast<int64_t>(row) * C;
  for (int c = lane; c < C; c += kWarp) o[c] = ew::RmsnormOut(x[c], r, weight[c]);
}

__global__ void RmsnormInputGradKernel(float* dinp, const float* dout, const float* inp,
                                       const float* weight, const float* rstd, int N, int C) {
  const int row = blockIdx.x * (blockDim.x / kWarp) + threadIdx.x / kWarp;
  const int lane = threadIdx.x % kWarp;
  if (row >= N) return;
  const int64_t base = static_cast<int64_t>(row) * C;
  const float r = rstd[row];
  float dot = 0.0f;
  for (int c = lane; c < C; c += kWarp) dot += dout[base + c] * weight[c] * inp[base + c];
  dot = WarpSum(dot);
  const float coef = r * r * dot / static_cast<float>(C);
  for (int c = lane; c < C; c += kWarp) {
    dinp[base + c] += ew::RmsnormInputGrad(dout[base + c], weight[c], inp[base + c], r, coef);
  }
}

// One thread per channel, rows in order: no atomics, fixed order.
__global__ void RmsnormWeightGradKernel(float* dweight, const float* dout, const float* inp,
                                        const float* rstd, int N, int C) {
  const int c = blockIdx.x * blockDim.x + threadIdx.x;
  if (c >= C) return;
  float acc = 0.0f;
  for (int n = 0; n < N; ++n) {
    const int64_t i = static_cast<int64_t>(n) * C + c;
    acc += ew::RmsnormWeightGrad(dout[i], inp[i], rstd[n]);
  }
  dweight[c] += acc;
}

// One thread per rotated pair.
__global__ void RopeKernel(float* out, const float* inp, const float* cos, const float* sin,
                           int64_t pairs, int T, int H, int D, bool backward) {
  const int64_t p = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (p >= pairs) return;
  const int half = D / 2;
  const int i = static_cast<int>(p % half);
  const int64_t head = p / half;  // (b, t, h) flattened
  const int t = static_cast<int>((head / H) % T);
  const int64_t x = head * D + i;
  const float c = cos[t * half + i], s = sin[t * half + i];
  float a, b;
  if (backward) {
    ew::RopeRotateBack(inp[x], inp[x + half], c, s, &a, &b);
    out[x] += a;
    out[x + half] += b;
  } else {
    ew::RopeRotate(inp[x], inp[x + half], c, s, &a, &b);
    out[x] = a;
    out[x + half] = b;
  }
}

__global__ void SwigluForwardKernel(float* out, const float* gate, const float* up, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) out[i] = ew::SwigluForward(gate[i], up[i]);
}

__global__ void SwigluBackwardKernel(float* dgate, float* dup, const float* dout, const float* gate,
                                     const float* up, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= n) return;
  if (dgate != nullptr) dgate[i] += ew::SwigluGateGrad(dout[i], gate[i], up[i]);
  if (dup != nullptr) dup[i] += ew::SwigluUpGrad(dout[i], gate[i]);
}

__global__ void AddKernel(float* a, const float* b, int64_t n) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i < n) a[i] += b[i];
}

}  // namespace

cudaError_t RmsnormForward(float* out, float* rstd, const float* inp, const float* weight, int N,
                           int C, float eps, cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  RmsnormForwardKernel<<<Blocks(N, kThreads / kWarp), kThreads, 0, stream>>>(out, rstd, inp, weight,
                                                                             N, C, eps);
  return cudaGetLastError();
}

cudaError_t RmsnormBackward(float* dinp, float* dweight, const float* dout, const float* inp,
                            const float* weight, const float* rstd, int N, int C,
                            cudaStream_t stream) {
  if (N <= 0) return cudaSuccess;
  if (dinp != nullptr) {
    RmsnormInputGradKernel<<<Blocks(N, kThreads / kWarp), kThreads, 0, stream>>>(
        dinp, dout, inp, weight, rstd, N, C);
    if (cudaError_t e = cudaGetLastError(); e != cudaSuccess) return e;
  }
  if (dweight != nullptr) {
    RmsnormWeightGradKernel<<<Blocks(C, kThreads), kThreads, 0, stream>>>(dweight, dout, inp, rstd,
                                                                          N, C);
  }
  return cudaGetLastError();
}

cudaError_t RopeForward(float* out, const float* inp, const float* cos, const float* sin, int B,
                        int T, int H, int D, cudaStream_t stream) {
  const int64_t pairs = static_cast<int64_t>(B) * T * H * (D / 2);
  if (pairs <= 0) return cudaSuccess;
  RopeKernel<<<Blocks(pairs, kThreads), kThreads, 0, stream>>>(out, inp, cos, sin, pairs, T, H, D,
                                                               false);
  return cudaGetLastError();
}

cudaError_t RopeBackward(float* dinp, const float* dout, const float* cos, const float* sin, int B,
                         int T, int H, int D, cudaStream_t stream) {
  const int64_t pairs = static_cast<int64_t>(B) * T * H * (D / 2);
  if (pairs <= 0 || dinp == nullptr) return cudaSuccess;
  RopeKernel<<<Blocks(pairs, kThreads), kThreads, 0, stream>>>(dinp, dout, cos, sin, pairs, T, H, D,
                                                               true);
  return cudaGetLastError();
}

cudaError_t SwigluForward(float* out, const float* gate, const float* up, int64_t N, int F,
                          cudaStream_t stream) {
  const int64_t n = N * F;
  if (n <= 0) return cudaSuccess;
  SwigluForwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(out, gate, up, n);
  return cudaGetLastError();
}

cudaError_t SwigluBackward(float* dgate, float* dup, const float* dout, const float* gate,
                           const float* up, int64_t N, int F, cudaStream_t stream) {
  const int64_t n = N * F;
  if (n <= 0 || (dgate == nullptr && dup == nullptr)) return cudaSuccess;
  SwigluBackwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(dgate, dup, dout, gate, up, n);
  return cudaGetLastError();
}

cudaError_t Add(float* a, const float* b, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  AddKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(a, b, n);
  return cudaGetLastError();
}

}  // namespace muonps::cuda
