// The kernels of moe_kernels.h: one thread per token for the router's
// rows, one thread per output element (or assignment) for dispatch and
// combine, one block per expert for the load counts.
#include "common/elementwise.h"
#include "workers/cuda/block_reduce.h"
#include "workers/cuda/moe_kernels.h"

namespace muonps::cuda::kernels {
namespace {

namespace ew = ::muonps::elementwise;

// ---- router ---------------------------------------------------------------------

__global__ void SigmoidKernel(float* scores, const float* logits, int64_t n) {
  const int64_t i = GlobalThread();
  if (i < n) scores[i] = ew::Sigmoid(logits[i]);
}

__global__ void SoftmaxRowsKernel(float* scores, const float* logits, int N, int E) {
  const int64_t n = GlobalThread();
  if (n < N) ew::SoftmaxRow(scores + n * E, logits + n * E, E);
}

__global__ void SigmoidBackwardKernel(float* dlogits, const float* dscores, const float* scores,
                                      int64_t n) {
  const int64_t i = GlobalThread();
  if (i < n) dlogits[i] += ew::SigmoidGrad(dscores[i], scores[i]);
}

__global__ void SoftmaxRowsBackwardKernel(float* dlogits, const float* dscores, const float* scores,
                                          int N, int E) {
  const int64_t n = GlobalThread();
  if (n < N) ew::SoftmaxRowBackward(dlogits + n * E, dscores + n * E, scores + n * E, E);
}

// One thread per token, the CPU's selection (common/elementwise.h).
__global__ void RouterTopkKernel(int32_t* idx, const float* scores, const float* bias, int N, int E,
                                 int K) {
  const int64_t n = GlobalThread();
  if (n < N) ew::RouterTopkRow(idx + n * K, scores + n * E, bias, E, K);
}

__global__ void TopkWeightsForwardKernel(float* weights, const float* scores, const int32_t* idx,
                                         int N, int E, int K, bool norm, float scale) {
  const int64_t n = GlobalThread();
  if (n < N) ew::TopkWeightsRow(weights + n * K, scores + n * E, idx + n * K, K, norm, scale);
}

// One thread per token owns its row of dscores (the CPU's scatter, in j order).
__global__ void TopkWeightsBackwardKernel(float* dscores, const float* dweights,
                                          const float* scores, const int32_t* idx, int N, int E,
                                          int K, bool norm, float scale) {
  const int64_t n = GlobalThread();
  if (n < N) {
    ew::TopkWeightsRowBackward(dscores + n * E, dweights + n * K, scores + n * E, idx + n * K, K,
                               norm, scale);
  }
}

// ---- expert dispatch / combine -------------------------------------------------

__global__ void DispatchForwardKernel(float* xe, const float* x, const int32_t* token, int64_t n,
                                      int C) {
  const int64_t i = GlobalThread();
  if (i >= n) return;
  xe[i] = x[static_cast<int64_t>(token[i / C]) * C + i % C];
}

// One thread per element of dx: the K sorted rows in j order.
__global__ void DispatchBackwardKernel(float* dx, const float* dxe, const int32_t* pos, int64_t n,
                                       int K, int C) {
  const int64_t i = GlobalThread();
  if (i >= n) return;
  const int64_t row = i / C, c = i % C;
  float acc = dx[i];
  for (int j = 0; j < K; ++j) acc += dxe[static_cast<int64_t>(pos[row * K + j]) * C + c];
  dx[i] = acc;
}

// One thread per element of out: the K weighted rows in j order.
__global__ void CombineForwardKernel(float* out, const float* ye, const float* weights,
                                     const int32_t* pos, int64_t n, int K, int C) {
  const int64_t i = GlobalThread();
  if (i >= n) return;
  const int64_t row = i / C, c = i % C;
  float acc = out[i];
  for (int j = 0; j < K; ++j) {
    const int64_t a = row * K + j;
    acc += weights[a] * ye[static_cast<int64_t>(pos[a]) * C + c];
  }
  out[i] = acc;
}

// One thread per element of the assignment rows of dye: each sorted
// position belongs to exactly one assignment (n, j).
__global__ void CombineDyeKernel(float* dye, const float* dout, const float* weights,
                                 const int32_t* pos, int64_t n, int K, int C) {
  const int64_t i = GlobalThread();
  if (i >= n) return;
  const int64_t a = i / C, c = i % C;
  dye[static_cast<int64_t>(pos[a]) * C + c] += weights[a] * dout[(a / K) * C + c];
}

// One thread per assignment: <dout[n], ye[pos[n, j]]> over c in order.
__global__ void CombineDweightsKernel(float* dweights, const float* dout, const float* ye,
                                      const int32_t* pos, int64_t P, int K, int C) {
  const int64_t a = GlobalThread();
  if (a >= P) return;
  const float* g = dout + (a / K) * C;
  const float* y = ye + static_cast<int64_t>(pos[a]) * C;
  float dot = 0.0f;
  for (int c = 0; c < C; ++c) dot += g[c] * y[c];
  dweights[a] += dot;
}

// ---- aux loss -----------------------------------------------------------------

// One block per expert: f[e] = norm * #{a : idx[a] = e}, the count an
// integer tree sum.
__global__ void LoadFractionKernel(float* f, const int32_t* idx, int64_t P, double norm) {
  __shared__ long long shared[kRowThreads];
  const int e = blockIdx.x;
  long long count = 0;
  for (int64_t a = threadIdx.x; a < P; a += kRowThreads) count += idx[a] == e ? 1 : 0;
  count = BlockReduce(count, shared, SumOp());
  if (threadIdx.x == 0) f[e] = static_cast<float>(norm * static_cast<double>(count));
}

// One thread per token: the CPU's float64 row sums and its update.
__global__ void AuxLossBackwardKernel(float* dscores, float daux, const float* scores,
                                      const float* f, int N, int E) {
  const int64_t n = GlobalThread();
  if (n < N) ew::AuxLossRowBackward(dscores + n * E, scores + n * E, f, daux, N, E);
}

}  // namespace

cudaError_t RouterSigmoid(float* scores, const float* logits, int64_t n, cudaStream_t stream) {
  SigmoidKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(scores, logits, n);
  return cudaGetLastError();
}

cudaError_t RouterSoftmax(float* scores, const float* logits, int N, int E, cudaStream_t stream) {
  SoftmaxRowsKernel<<<Blocks(N, kThreads), kThreads, 0, stream>>>(scores, logits, N, E);
  return cudaGetLastError();
}

cudaError_t RouterSigmoidBackward(float* dlogits, const float* dscores, const float* scores,
                                  int64_t n, cudaStream_t stream) {
  SigmoidBackwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(dlogits, dscores, scores, n);
  return cudaGetLastError();
}

cudaError_t RouterSoftmaxBackward(float* dlogits, const float* dscores, const float* scores, int N,
                                  int E, cudaStream_t stream) {
  SoftmaxRowsBackwardKernel<<<Blocks(N, kThreads), kThreads, 0, stream>>>(dlogits, dscores, scores,
                                                                          N, E);
  return cudaGetLastError();
}

cudaError_t RouterTopk(int32_t* idx, const float* scores, const float* bias, int N, int E, int K,
                       cudaStream_t stream) {
  RouterTopkKernel<<<Blocks(N, kThreads), kThreads, 0, stream>>>(idx, scores, bias, N, E, K);
  return cudaGetLastError();
}

cudaError_t TopkWeightsForward(float* weights, const float* scores, const int32_t* idx, int N,
                               int E, int K, bool norm, float scale, cudaStream_t stream) {
  TopkWeightsForwardKernel<<<Blocks(N, kThreads), kThreads, 0, stream>>>(weights, scores, idx, N, E,
                                                                         K, norm, scale);
  return cudaGetLastError();
}

cudaError_t TopkWeightsBackward(float* dscores, const float* dweights, const float* scores,
                                const int32_t* idx, int N, int E, int K, bool norm, float scale,
                                cudaStream_t stream) {
  TopkWeightsBackwardKernel<<<Blocks(N, kThreads), kThreads, 0, stream>>>(
      dscores, dweights, scores, idx, N, E, K, norm, scale);
  return cudaGetLastError();
}

cudaError_t DispatchForward(float* xe, const float* x, const int32_t* token, int64_t n, int C,
                            cudaStream_t stream) {
  DispatchForwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(xe, x, token, n, C);
  return cudaGetLastError();
}

cudaError_t DispatchBackward(float* dx, const float* dxe, const int32_t* pos, int64_t n, int K,
                             int C, cudaStream_t stream) {
  DispatchBackwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(dx, dxe, pos, n, K, C);
  return cudaGetLastError();
}

cudaError_t CombineForward(float* out, const float* ye, const float* weights, const int32_t* pos,
                           int64_t n, int K, int C, cudaStream_t stream) {
  CombineForwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(out, ye, weights, pos, n, K,
                                                                     C);
  return cudaGetLastError();
}

cudaError_t CombineDye(float* dye, const float* dout, const float* weights, const int32_t* pos,
                       int64_t n, int K, int C, cudaStream_t stream) {
  CombineDyeKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(dye, dout, weights, pos, n, K, C);
  return cudaGetLastError();
}

cudaError_t CombineDweights(float* dweights, const float* dout, const float* ye, const int32_t* pos,
                            int64_t P, int K, int C, cudaStream_t stream) {
  CombineDweightsKernel<<<Blocks(P, kThreads), kThreads, 0, stream>>>(dweights, dout, ye, pos, P, K,
                                                                      C);
  return cudaGetLastError();
}

cudaError_t LoadFraction(float* f, const int32_t* idx, int64_t P, double norm, int E,
                         cudaStream_t stream) {
  LoadFractionKernel<<<E, kRowThreads, 0, stream>>>(f, idx, P, norm);
  return cudaGetLastError();
}

cudaError_t AuxLossBackward(float* dscores, float daux, const float* scores, const float* f, int N,
                            int E, cudaStream_t stream) {
  AuxLossBackwardKernel<<<Blocks(N, kThreads), kThreads, 0, stream>>>(dscores, daux, scores, f, N,
                                                                      E);
  return cudaGetLastError();
}

}  // namespace muonps::cuda::kernels
