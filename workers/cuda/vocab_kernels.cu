// The kernels of vocab_kernels.h: one thread per element for the
// embedding's lookup and the loss gradient, one thread per channel for the
// embedding's gradient, one block per row for the softmax of the loss
// (block_reduce.h).
#include <cmath>

#include "common/elementwise.h"
#include "workers/cuda/block_reduce.h"
#include "workers/cuda/vocab_kernels.h"

namespace muonps::cuda::kernels {
namespace {

namespace ew = ::muonps::elementwise;

using ew::Max;

// ---- embedding ------------------------------------------------------------

__global__ void EmbeddingForwardKernel(float* out, const int32_t* inp, const float* wte, int64_t n,
                                       int C) {
  const int64_t i = GlobalThread();
  if (i >= n) return;
  const int64_t row = i / C, c = i % C;
  out[i] = wte[static_cast<int64_t>(inp[row]) * C + c];
}

// One thread per channel: it owns column c of dwte and adds the tokens in
// increasing order, as the CPU does.
__global__ void EmbeddingBackwardKernel(float* dwte, const float* dout, const int32_t* inp, int N,
                                        int C) {
  const int64_t c = GlobalThread();
  if (c >= C) return;
  for (int64_t n = 0; n < N; ++n) {
    dwte[static_cast<int64_t>(inp[n]) * C + c] += dout[n * C + c];
  }
}

// ---- loss ---------------------------------------------------------------------

// One block per row: the maximum (a tree), exp(l - max) with a float64 tree
// sum, probabilities times float(1/sum), and the loss as on the CPU.
__global__ void CrossentropyForwardKernel(float* losses, float* probs, const float* logits,
                                          const int32_t* targets, int V) {
  __shared__ float fshared[kRowThreads];
  __shared__ double dshared[kRowThreads];
  const int64_t n = blockIdx.x;
  const float* l = logits + n * V;
  float* p = probs + n * V;
  float mx = -INFINITY;
  for (int v = threadIdx.x; v < V; v += kRowThreads) mx = Max(mx, l[v]);
  mx = BlockReduce(mx, fshared, MaxOp());
  double sum = 0.0;
  for (int v = threadIdx.x; v < V; v += kRowThreads) {
    const float e = ew::Exp(l[v] - mx);
    p[v] = e;
    sum += e;
  }
  sum = BlockReduce(sum, dshared, SumOp());
  const float inv = static_cast<float>(1.0 / sum);
  for (int v = threadIdx.x; v < V; v += kRowThreads) p[v] *= inv;
  if (threadIdx.x == 0) {
    losses[n] = static_cast<float>(log(sum) - (static_cast<double>(l[targets[n]]) - mx));
  }
}

__global__ void CrossentropyBackwardKernel(float* dlogits, const float* dlosses, const float* probs,
                                           const int32_t* targets, int64_t n, int V) {
  const int64_t i = GlobalThread();
  if (i >= n) return;
  const int64_t row = i / V;
  const float g = dlosses[row];
  float acc = dlogits[i] + g * probs[i];
  if (i % V == targets[row]) acc -= g;
  dlogits[i] = acc;
}

}  // namespace

cudaError_t EmbeddingForward(float* out, const int32_t* inp, const float* wte, int64_t n, int C,
                             cudaStream_t stream) {
  EmbeddingForwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(out, inp, wte, n, C);
  return cudaGetLastError();
}

cudaError_t EmbeddingBackward(float* dwte, const float* dout, const int32_t* inp, int N, int C,
                              cudaStream_t stream) {
  EmbeddingBackwardKernel<<<Blocks(C, kThreads), kThreads, 0, stream>>>(dwte, dout, inp, N, C);
  return cudaGetLastError();
}

cudaError_t CrossentropyForward(float* losses, float* probs, const float* logits,
                                const int32_t* targets, int N, int V, cudaStream_t stream) {
  CrossentropyForwardKernel<<<static_cast<unsigned>(N), kRowThreads, 0, stream>>>(
      losses, probs, logits, targets, V);
  return cudaGetLastError();
}

cudaError_t CrossentropyBackward(float* dlogits, const float* dlosses, const float* probs,
                                 const int32_t* targets, int64_t n, int V, cudaStream_t stream) {
  CrossentropyBackwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(dlogits, dlosses, probs,
                                                                           targets, n, V);
  return cudaGetLastError();
}

}  // namespace muonps::cuda::kernels
