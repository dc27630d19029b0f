// The CUDA backend (cuda_backend.h). Every kernel gives each output element
// (or row) to one thread, warp or block, which reduces in a fixed order:
// either the CPU op's loop order (a thread looping over the reduced index in
// increasing order) or a fixed-shape tree over a block. No floating-point
// atomics: a launch repeated on the same device gives the same bits. Where
// the CPU op scatters (dscores[n, idx[n, j]] +=, dye[pos[n, j], :] +=), one
// thread owns the row or the element written, so there is no race.
#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/elementwise.h"
#include "model/ops.h"
#include "workers/cuda/cuda_backend.h"
#include "workers/cuda/cuda_status.h"
#include "workers/cuda/elementwise_kernels.h"

namespace muonps::cuda {
namespace {

namespace ew = ::muonps::elementwise;

constexpr int kThreads = 256;     // element-wise and per-row-thread kernels
constexpr int kRowThreads = 128;  // one block per row (attention, cross-entropy, loads)

int Blocks(int64_t n, int per_block) { return static_cast<int>((n + per_block - 1) / per_block); }

// std::max's choice, so maxima agree with the CPU's on every input.
using ew::Max;

struct MaxOp {
  __device__ float operator()(float a, float b) const { return Max(a, b); }
};
struct SumOp {
  template <typename T>
  __device__ T operator()(T a, T b) const {
    return a + b;
  }
};

// A reduction over the kRowThreads threads of a block in a fixed tree;
// every thread gets the result. `shared` holds kRowThreads values.
template <typename T, typename Op>
__device__ T BlockReduce(T v, T* shared, Op op) {
  shared[threadIdx.x] = v;
  __syncthreads();
  for (int stride = kRowThreads / 2; stride > 0; stride /= 2) {
    if (static_cast<int>(threadIdx.x) < stride) {
      shared[threadIdx.x] = op(shared[threadIdx.x], shared[threadIdx.x + stride]);
    }
    __syncthreads();
  }
  const T result = shared[0];
  __syncthreads();  // `shared` may be reused by the caller
  return result;
}

__device__ __forceinline__ int64_t GlobalThread() {
  return static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
}

// ---- buffers ------------------------------------------------------------------

__global__ void AddKernel(float* a, const float* b, int64_t n) {
  const int64_t i = GlobalThread();
  if (i < n) a[i] += b[i];
}

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

// ---- RoPE -----------------------------------------------------------------------

// ---- causal attention ---------------------------------------------------------------
//
// Layouts as in ops.h: q, k (B, T, H*Dk), v, out (B, T, H*Dv), att and the
// softmax gradient (B, H, T, T). A query row is (b, h, t), row index
// (b*H + h)*T + t.

struct RowIndex {
  int64_t b, bh;
  int h, t;
};

__device__ __forceinline__ RowIndex SplitRow(int64_t row, int T, int H) {
  RowIndex r;
  r.t = static_cast<int>(row % T);
  r.bh = row / T;
  r.h = static_cast<int>(r.bh % H);
  r.b = r.bh / H;
  return r;
}

// One block per query row: the scaled logits of the visible keys (each
// thread a key, summing over d in order), their maximum (a tree), the
// softmax as on the CPU (exp(l - max), a tree sum, times 1/sum), then
// out[t, d] = sum_{j <= t} P[t, j] v[j, d] (a thread per d, j in order).
// row_max (B*H*T), when not null, gets each row's maximum logit.
__global__ void AttentionForwardKernel(float* out, float* att, float* row_max, const float* q,
                                       const float* k, const float* v, int T, int H, int Dk, int Dv,
                                       float scale) {
  __shared__ float shared[kRowThreads];
  const int64_t row = blockIdx.x;
  const RowIndex r = SplitRow(row, T, H);
  const int64_t Ck = static_cast<int64_t>(H) * Dk, Cv = static_cast<int64_t>(H) * Dv;
  const float* qt = q + (r.b * T + r.t) * Ck + r.h * Dk;
  const float* kb = k + r.b * T * Ck + r.h * Dk;
  const float* vb = v + r.b * T * Cv + r.h * Dv;
  float* a = att + row * T;
  float mx = -INFINITY;
  for (int j = threadIdx.x; j <= r.t; j += kRowThreads) {
    const float* kj = kb + j * Ck;
    float dot = 0.0f;
    for (int d = 0; d < Dk; ++d) dot += qt[d] * kj[d];
    const float s = scale * dot;
    a[j] = s;
    mx = Max(mx, s);
  }
  for (int j = r.t + 1 + threadIdx.x; j < T; j += kRowThreads) a[j] = 0.0f;
  mx = BlockReduce(mx, shared, MaxOp());
  if (row_max != nullptr && threadIdx.x == 0) row_max[row] = mx;
  float sum = 0.0f;
  for (int j = threadIdx.x; j <= r.t; j += kRowThreads) {
    const float e = ew::Exp(a[j] - mx);
    a[j] = e;
    sum += e;
  }
  sum = BlockReduce(sum, shared, SumOp());
  const float inv = 1.0f / sum;
  for (int j = threadIdx.x; j <= r.t; j += kRowThreads) a[j] *= inv;
  __syncthreads();  // the row's probabilities, written by every thread
  float* o = out + (r.b * T + r.t) * Cv + r.h * Dv;
  for (int d = threadIdx.x; d < Dv; d += kRowThreads) {
    float acc = 0.0f;
    for (int j = 0; j <= r.t; ++j) acc += a[j] * vb[j * Cv + d];
    o[d] = acc;
  }
}

// logit_max[bh] = the maximum of its rows' maxima, t in increasing order.
__global__ void HeadMaxKernel(float* logit_max, const float* row_max, int64_t BH, int T) {
  const int64_t bh = GlobalThread();
  if (bh >= BH) return;
  float mx = -INFINITY;
  for (int t = 0; t < T; ++t) mx = Max(mx, row_max[bh * T + t]);
  logit_max[bh] = mx;
}

// One block per query row: dP[t, j] = <dout[t], v[j]> (a thread per key, d
// in order), then ds[t, j] = P[t, j] (dP[t, j] - sum_j' P[t, j'] dP[t, j'])
// on and below the diagonal (the sum a tree), 0 above.
__global__ void AttentionSoftmaxGradKernel(float* ds, const float* att, const float* dout,
                                           const float* v, int T, int H, int Dv) {
  __shared__ float shared[kRowThreads];
  const int64_t row = blockIdx.x;
  const RowIndex r = SplitRow(row, T, H);
  const int64_t Cv = static_cast<int64_t>(H) * Dv;
  const float* g = dout + (r.b * T + r.t) * Cv + r.h * Dv;
  const float* vb = v + r.b * T * Cv + r.h * Dv;
  const float* p = att + row * T;
  float* out = ds + row * T;
  float s = 0.0f;
  for (int j = threadIdx.x; j <= r.t; j += kRowThreads) {
    const float* vj = vb + j * Cv;
    float dot = 0.0f;
    for (int d = 0; d < Dv; ++d) dot += g[d] * vj[d];
    out[j] = dot;
    s += p[j] * dot;
  }
  for (int j = r.t + 1 + threadIdx.x; j < T; j += kRowThreads) out[j] = 0.0f;
  s = BlockReduce(s, shared, SumOp());
  // Each thread rewrites only the entries it wrote above.
  for (int j = threadIdx.x; j <= r.t; j += kRowThreads) out[j] = p[j] * (out[j] - s);
}

// dq[b, t, h, d] += scale * sum_{j <= t} ds[t, j] k[b, j, h, d], j in
// increasing order: one thread per element of dq (B, T, H*Dk).
__global__ void AttentionDqKernel(float* dq, const float* ds, const float* k, int64_t n, int T,
                                  int H, int Dk, float scale) {
  const int64_t i = GlobalThread();
  if (i >= n) return;
  const int d = static_cast<int>(i % Dk);
  const int h = static_cast<int>((i / Dk) % H);
  const int64_t bt = i / (static_cast<int64_t>(Dk) * H);
  const int t = static_cast<int>(bt % T);
  const int64_t b = bt / T;
  const int64_t Ck = static_cast<int64_t>(H) * Dk;
  const float* r = ds + ((b * H + h) * T + t) * T;
  const float* kb = k + b * T * Ck + h * Dk + d;
  float acc = 0.0f;
  for (int j = 0; j <= t; ++j) acc += r[j] * kb[j * Ck];
  dq[i] += scale * acc;
}

// dst[b, j, h, d] += scale * sum_{t >= j} m[b, h, t, j] src[b, t, h, d], t in
// increasing order: one thread per element of dst (B, T, H*D). dk (m the
// softmax gradient, src q) and dv (m the probabilities, src dout, scale 1).
__global__ void AttentionColumnKernel(float* dst, const float* m, const float* src, int64_t n,
                                      int T, int H, int D, float scale) {
  const int64_t i = GlobalThread();
  if (i >= n) return;
  const int d = static_cast<int>(i % D);
  const int h = static_cast<int>((i / D) % H);
  const int64_t bt = i / (static_cast<int64_t>(D) * H);
  const int j = static_cast<int>(bt % T);
  const int64_t b = bt / T;
  const int64_t C = static_cast<int64_t>(H) * D;
  const float* col = m + (b * H + h) * T * T + j;  // m[t, j] at col[t * T]
  const float* sb = src + b * T * C + h * D + d;
  float acc = 0.0f;
  for (int64_t t = j; t < T; ++t) acc += col[t * T] * sb[t * C];
  dst[i] += scale * acc;
}

// ---- column slices --------------------------------------------------------------

__global__ void SliceForwardKernel(float* out, const float* inp, int64_t n, int ld, int off,
                                   int w) {
  const int64_t i = GlobalThread();
  if (i >= n) return;
  out[i] = inp[(i / w) * ld + off + i % w];
}

__global__ void SliceBackwardKernel(float* dinp, const float* dout, int64_t n, int ld, int off,
                                    int w) {
  const int64_t i = GlobalThread();
  if (i >= n) return;
  dinp[(i / w) * ld + off + i % w] += dout[i];
}

// ---- MLA heads ------------------------------------------------------------------
//
// One thread per (n, h, column) of a head's work of width dn + dr/2 + dv:
// a nope column of q and k, a rotated pair of q and of the shared key
// (interleaved pairs in, rotate_half order out), or a value column.

__global__ void MlaHeadsForwardKernel(float* q, float* k, float* v, const float* qp,
                                      const float* kv, const float* kva, const float* cos,
                                      const float* sin, int64_t n, int T, int H, int dn, int dr,
                                      int dv, int r) {
  const int64_t i = GlobalThread();
  if (i >= n) return;
  const int half = dr / 2, dqk = dn + dr, dkv = dn + dv, width = dn + half + dv;
  const int col = static_cast<int>(i % width);
  const int64_t nh = i / width;  // n*H + h
  const int64_t token = nh / H;
  const float* qh = qp + nh * dqk;
  const float* kvh = kv + nh * dkv;
  float* qo = q + nh * dqk;
  float* ko = k + nh * dqk;
  if (col < dn) {
    qo[col] = qh[col];
    ko[col] = kvh[col];
  } else if (col < dn + half) {
    const int m = col - dn;
    const int64_t tab = (token % T) * half + m;
    const float c = cos[tab], s = sin[tab];
    ew::RopeRotate(qh[dn + 2 * m], qh[dn + 2 * m + 1], c, s, &qo[dn + m], &qo[dn + half + m]);
    const float* kr = kva + token * (r + dr) + r;
    ew::RopeRotate(kr[2 * m], kr[2 * m + 1], c, s, &ko[dn + m], &ko[dn + half + m]);
  } else {
    const int m = col - dn - half;
    v[nh * dv + m] = kvh[dn + m];
  }
}

__global__ void MlaHeadsBackwardKernel(float* dqp, float* dkv, const float* dq, const float* dk,
                                       const float* dv, const float* cos, const float* sin,
                                       int64_t n, int T, int H, int dn, int dr, int dv_dim) {
  const int64_t i = GlobalThread();
  if (i >= n) return;
  const int half = dr / 2, dqk = dn + dr, dkvw = dn + dv_dim, width = dn + half + dv_dim;
  const int col = static_cast<int>(i % width);
  const int64_t nh = i / width;
  const int64_t token = nh / H;
  if (col < dn) {
    if (dqp != nullptr) dqp[nh * dqk + col] += dq[nh * dqk + col];
    if (dkv != nullptr) dkv[nh * dkvw + col] += dk[nh * dqk + col];
  } else if (col < dn + half) {
    if (dqp == nullptr) return;
    const int m = col - dn;
    const int64_t tab = (token % T) * half + m;
    const float* g = dq + nh * dqk + dn;
    float d1, d2;
    ew::RopeRotateBack(g[m], g[m + half], cos[tab], sin[tab], &d1, &d2);
    float* d = dqp + nh * dqk + dn;
    d[2 * m] += d1;
    d[2 * m + 1] += d2;
  } else {
    if (dkv == nullptr) return;
    const int m = col - dn - half;
    dkv[nh * dkvw + dn + m] += dv[nh * dv_dim + m];
  }
}

// One thread per (token, pair) of the shared key: its gradient sums the
// heads in increasing order, then rotates back into dkva's rope columns.
__global__ void MlaSharedKeyBackwardKernel(float* dkva, const float* dk, const float* cos,
                                           const float* sin, int64_t n, int T, int H, int dn,
                                           int dr, int r) {
  const int64_t i = GlobalThread();
  if (i >= n) return;
  const int half = dr / 2, dqk = dn + dr;
  const int m = static_cast<int>(i % half);
  const int64_t token = i / half;
  float g1 = 0.0f, g2 = 0.0f;
  for (int h = 0; h < H; ++h) {
    const float* gk = dk + (token * H + h) * dqk + dn;
    g1 += gk[m];
    g2 += gk[m + half];
  }
  const int64_t tab = (token % T) * half + m;
  float d1, d2;
  ew::RopeRotateBack(g1, g2, cos[tab], sin[tab], &d1, &d2);
  float* d = dkva + token * (r + dr) + r;
  d[2 * m] += d1;
  d[2 * m + 1] += d2;
}

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

// ---- the backend ------------------------------------------------------------------

class CudaBackend final : public ComputeBackend {
 public:
  explicit CudaBackend(int device) : device_(device) {}
  CudaBackend(const CudaBackend&) = delete;
  CudaBackend& operator=(const CudaBackend&) = delete;

  ~CudaBackend() override {
    if (cudaSetDevice(device_) != cudaSuccess) return;
    if (stream_ != nullptr) (void)cudaStreamSynchronize(stream_);
    if (scratch_ != nullptr) (void)cudaFree(scratch_);
    if (handle_ != nullptr) (void)cublasDestroy(handle_);
    if (stream_ != nullptr) (void)cudaStreamDestroy(stream_);
  }

  // The stream and the cuBLAS handle on it, float32 products without TF32.
  absl::Status Init() {
    if (absl::Status st = CudaStatus(cudaSetDevice(device_), "cudaSetDevice"); !st.ok()) return st;
    if (absl::Status st = CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking),
                                     "cudaStreamCreateWithFlags");
        !st.ok()) {
      return st;
    }
    if (absl::Status st = CublasStatus(cublasCreate(&handle_), "cublasCreate"); !st.ok()) {
      handle_ = nullptr;
      return st;
    }
    if (absl::Status st = CublasStatus(cublasSetStream(handle_, stream_), "cublasSetStream");
        !st.ok()) {
      return st;
    }
    return CublasStatus(cublasSetMathMode(handle_, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode");
  }

  std::string name() const override { return absl::StrCat("cuda:", device_); }

  void* Allocate(size_t bytes) override {
    if (bytes == 0) return nullptr;
    Use();
    void* p = nullptr;
    const cudaError_t e = cudaMallocManaged(&p, bytes, cudaMemAttachGlobal);
    Record(e, "cudaMallocManaged");
    if (e != cudaSuccess) {
      p = nullptr;
    } else {
      Record(cudaMemsetAsync(p, 0, bytes, stream_), "cudaMemsetAsync (Allocate)");
    }
    Synchronize();
    return p;
  }

  void Free(void* p) override {
    if (p == nullptr) return;
    Use();
    // Ops issued earlier may still read or write p.
    Record(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (Free)");
    Record(cudaFree(p), "cudaFree");
  }

  void Synchronize() override {
    Use();
    Record(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
    if (!first_error_.empty()) {
      std::fprintf(stderr, "muonps: CUDA backend %s failed: %s\n", name().c_str(),
                   first_error_.c_str());
      std::abort();
    }
  }

  // Synchronous: src may be host memory the caller reuses at once.
  void Copy(void* dst, const void* src, size_t bytes) override {
    if (bytes == 0) return;
    Use();
    Record(cudaMemcpyAsync(dst, src, bytes, cudaMemcpyDefault, stream_), "cudaMemcpyAsync");
    Synchronize();
  }

  void Zero(float* x, int64_t n) override {
    if (n <= 0) return;
    Use();
    Record(cudaMemsetAsync(x, 0, static_cast<size_t>(n) * sizeof(float), stream_),
           "cudaMemsetAsync (Zero)");
  }

  void AddInPlace(float* a, const float* b, int64_t n) override {
    if (n <= 0) return;
    Use();
    AddKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(a, b, n);
    Launched("AddInPlace");
  }

  void embedding_forward(float* out, const int32_t* inp, const float* wte, int N, int C) override {
    const int64_t n = static_cast<int64_t>(N) * C;
    if (n <= 0) return;
    Use();
    EmbeddingForwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(out, inp, wte, n, C);
    Launched("embedding_forward");
  }

  void embedding_backward(float* dwte, const float* dout, const int32_t* inp, int N,
                          int C) override {
    if (dwte == nullptr || N <= 0 || C <= 0) return;
    Use();
    EmbeddingBackwardKernel<<<Blocks(C, kThreads), kThreads, 0, stream_>>>(dwte, dout, inp, N, C);
    Launched("embedding_backward");
  }

  void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C,
                       float eps) override {
    Use();
    Record(RmsnormForward(out, rstd, inp, weight, N, C, eps, stream_), "rmsnorm_forward");
  }

  void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                        const float* weight, const float* rstd, int N, int C) override {
    if (C <= 0) return;
    Use();
    Record(RmsnormBackward(dinp, dweight, dout, inp, weight, rstd, N, C, stream_),
           "rmsnorm_backward");
  }

  // Row-major (r, c) is column-major (c, r): out^T (OC, N) = W (OC, IC) .
  // inp^T (IC, N), where the row-major W is the column-major W^T.
  void matmul_forward(float* out, const float* inp, const float* weight, int N, int IC,
                      int OC) override {
    if (N <= 0 || OC <= 0) return;
    Use();
    if (IC <= 0) {
      Record(cudaMemsetAsync(out, 0, static_cast<size_t>(N) * OC * sizeof(float), stream_),
             "cudaMemsetAsync (matmul_forward)");
      return;
    }
    const float one = 1.0f, zero = 0.0f;
    Record(cublasSgemm(handle_, CUBLAS_OP_T, CUBLAS_OP_N, OC, N, IC, &one, weight, IC, inp, IC,
                       &zero, out, OC),
           "cublasSgemm (matmul_forward)");
  }

  // dinp^T (IC, N) += W^T (IC, OC) . dout^T (OC, N);
  // dweight^T (IC, OC) += inp^T (IC, N) . dout (N, OC).
  void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                       const float* weight, int N, int IC, int OC) override {
    if (N <= 0 || IC <= 0 || OC <= 0) return;
    Use();
    const float one = 1.0f;
    if (dinp != nullptr) {
      Record(cublasSgemm(handle_, CUBLAS_OP_N, CUBLAS_OP_N, IC, N, OC, &one, weight, IC, dout, OC,
                         &one, dinp, IC),
             "cublasSgemm (matmul_backward dinp)");
    }
    if (dweight != nullptr) {
      Record(cublasSgemm(handle_, CUBLAS_OP_N, CUBLAS_OP_T, IC, OC, N, &one, inp, IC, dout, OC,
                         &one, dweight, IC),
             "cublasSgemm (matmul_backward dweight)");
    }
  }

  void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int B, int T,
                    int H, int D) override {
    Use();
    Record(RopeForward(out, inp, cos, sin, B, T, H, D, stream_), "rope_forward");
  }

  void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int B,
                     int T, int H, int D) override {
    Use();
    Record(RopeBackward(dinp, dout, cos, sin, B, T, H, D, stream_), "rope_backward");
  }

  void attention_forward(float* out, float* att, const float* q, const float* k, const float* v,
                         int B, int T, int H, int Dk, int Dv, float* logit_max) override {
    const int64_t BH = static_cast<int64_t>(B) * H, rows = BH * T;
    if (rows <= 0) return;
    Use();
    float* row_max = nullptr;
    if (logit_max != nullptr) {
      row_max = Scratch(rows);
      if (row_max == nullptr) return;
    }
    const float scale = 1.0f / std::sqrt(static_cast<float>(Dk));
    AttentionForwardKernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream_>>>(
        out, att, row_max, q, k, v, T, H, Dk, Dv, scale);
    Launched("attention_forward");
    if (logit_max != nullptr) {
      HeadMaxKernel<<<Blocks(BH, kThreads), kThreads, 0, stream_>>>(logit_max, row_max, BH, T);
      Launched("attention_forward (logit_max)");
    }
  }

  void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                          const float* k, const float* v, const float* att, int B, int T, int H,
                          int Dk, int Dv) override {
    if (dq == nullptr && dk == nullptr && dv == nullptr) return;
    const int64_t rows = static_cast<int64_t>(B) * H * T;
    if (rows <= 0) return;
    Use();
    const int64_t nk = rows * Dk, nv = rows * Dv;
    if (dv != nullptr && nv > 0) {
      AttentionColumnKernel<<<Blocks(nv, kThreads), kThreads, 0, stream_>>>(dv, att, dout, nv, T, H,
                                                                            Dv, 1.0f);
      Launched("attention_backward (dv)");
    }
    if ((dq == nullptr && dk == nullptr) || nk <= 0) return;
    float* ds = Scratch(rows * T);
    if (ds == nullptr) return;
    AttentionSoftmaxGradKernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream_>>>(
        ds, att, dout, v, T, H, Dv);
    Launched("attention_backward (softmax)");
    const float scale = 1.0f / std::sqrt(static_cast<float>(Dk));
    if (dq != nullptr) {
      AttentionDqKernel<<<Blocks(nk, kThreads), kThreads, 0, stream_>>>(dq, ds, k, nk, T, H, Dk,
                                                                        scale);
      Launched("attention_backward (dq)");
    }
    if (dk != nullptr) {
      AttentionColumnKernel<<<Blocks(nk, kThreads), kThreads, 0, stream_>>>(dk, ds, q, nk, T, H, Dk,
                                                                            scale);
      Launched("attention_backward (dk)");
    }
  }

  void slice_forward(float* out, const float* inp, int64_t N, int ld, int off, int w) override {
    const int64_t n = N * w;
    if (n <= 0) return;
    Use();
    SliceForwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(out, inp, n, ld, off, w);
    Launched("slice_forward");
  }

  void slice_backward(float* dinp, const float* dout, int64_t N, int ld, int off, int w) override {
    const int64_t n = N * w;
    if (dinp == nullptr || n <= 0) return;
    Use();
    SliceBackwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(dinp, dout, n, ld, off, w);
    Launched("slice_backward");
  }

  void mla_heads_forward(float* q, float* k, float* v, const float* qp, const float* kv,
                         const float* kva, const float* cos, const float* sin, int B, int T, int H,
                         int dn, int dr, int dv, int r) override {
    const int64_t n = static_cast<int64_t>(B) * T * H * (dn + dr / 2 + dv);
    if (n <= 0) return;
    Use();
    MlaHeadsForwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(
        q, k, v, qp, kv, kva, cos, sin, n, T, H, dn, dr, dv, r);
    Launched("mla_heads_forward");
  }

  void mla_heads_backward(float* dqp, float* dkv, float* dkva, const float* dq, const float* dk,
                          const float* dv, const float* cos, const float* sin, int B, int T, int H,
                          int dn, int dr, int dv_dim, int r) override {
    const int64_t tokens = static_cast<int64_t>(B) * T;
    if (tokens <= 0) return;
    Use();
    const int64_t n = tokens * H * (dn + dr / 2 + dv_dim);
    if ((dqp != nullptr || dkv != nullptr) && n > 0) {
      MlaHeadsBackwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(
          dqp, dkv, dq, dk, dv, cos, sin, n, T, H, dn, dr, dv_dim);
      Launched("mla_heads_backward");
    }
    const int64_t pairs = tokens * (dr / 2);
    if (dkva != nullptr && pairs > 0) {
      MlaSharedKeyBackwardKernel<<<Blocks(pairs, kThreads), kThreads, 0, stream_>>>(
          dkva, dk, cos, sin, pairs, T, H, dn, dr, r);
      Launched("mla_heads_backward (shared key)");
    }
  }

  void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int F) override {
    Use();
    Record(SwigluForward(out, gate, up, N, F, stream_), "swiglu_forward");
  }

  void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                       const float* up, int64_t N, int F) override {
    Use();
    Record(SwigluBackward(dgate, dup, dout, gate, up, N, F, stream_), "swiglu_backward");
  }

  void router_score_forward(float* scores, const float* logits, int N, int E,
                            ScoringFunc func) override {
    const int64_t n = static_cast<int64_t>(N) * E;
    if (n <= 0) return;
    Use();
    if (func == ScoringFunc::kSigmoid) {
      SigmoidKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(scores, logits, n);
    } else {
      SoftmaxRowsKernel<<<Blocks(N, kThreads), kThreads, 0, stream_>>>(scores, logits, N, E);
    }
    Launched("router_score_forward");
  }

  void router_score_backward(float* dlogits, const float* dscores, const float* scores, int N,
                             int E, ScoringFunc func) override {
    const int64_t n = static_cast<int64_t>(N) * E;
    if (dlogits == nullptr || n <= 0) return;
    Use();
    if (func == ScoringFunc::kSigmoid) {
      SigmoidBackwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(dlogits, dscores, scores,
                                                                           n);
    } else {
      SoftmaxRowsBackwardKernel<<<Blocks(N, kThreads), kThreads, 0, stream_>>>(dlogits, dscores,
                                                                               scores, N, E);
    }
    Launched("router_score_backward");
  }

  void router_topk(int32_t* idx, const float* scores, const float* bias, int N, int E,
                   int K) override {
    if (K <= 0 || N <= 0) return;
    Use();
    RouterTopkKernel<<<Blocks(N, kThreads), kThreads, 0, stream_>>>(idx, scores, bias, N, E, K);
    Launched("router_topk");
  }

  void topk_weights_forward(float* weights, const float* scores, const int32_t* idx, int N, int E,
                            int K, bool norm, float scale) override {
    if (N <= 0 || K <= 0) return;
    Use();
    TopkWeightsForwardKernel<<<Blocks(N, kThreads), kThreads, 0, stream_>>>(weights, scores, idx, N,
                                                                            E, K, norm, scale);
    Launched("topk_weights_forward");
  }

  void topk_weights_backward(float* dscores, const float* dweights, const float* scores,
                             const int32_t* idx, int N, int E, int K, bool norm,
                             float scale) override {
    if (dscores == nullptr || N <= 0 || K <= 0) return;
    Use();
    TopkWeightsBackwardKernel<<<Blocks(N, kThreads), kThreads, 0, stream_>>>(
        dscores, dweights, scores, idx, N, E, K, norm, scale);
    Launched("topk_weights_backward");
  }

  // Synchronising: the CPU's counting sort on the managed memory, so the plan
  // (token order within each expert) is the CPU's exactly.
  void build_routing(int32_t* offsets, int32_t* token, int32_t* pos, const int32_t* idx, int N,
                     int E, int K) override {
    Synchronize();
    ::muonps::build_routing(offsets, token, pos, idx, N, E, K);
  }

  void dispatch_forward(float* xe, const float* x, const int32_t* token, int P, int C) override {
    const int64_t n = static_cast<int64_t>(P) * C;
    if (n <= 0) return;
    Use();
    DispatchForwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(xe, x, token, n, C);
    Launched("dispatch_forward");
  }

  void dispatch_backward(float* dx, const float* dxe, const int32_t* pos, int N, int K,
                         int C) override {
    const int64_t n = static_cast<int64_t>(N) * C;
    if (dx == nullptr || n <= 0) return;
    Use();
    DispatchBackwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(dx, dxe, pos, n, K, C);
    Launched("dispatch_backward");
  }

  void combine_forward(float* out, const float* ye, const float* weights, const int32_t* pos, int N,
                       int K, int C) override {
    const int64_t n = static_cast<int64_t>(N) * C;
    if (n <= 0) return;
    Use();
    CombineForwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(out, ye, weights, pos, n, K,
                                                                        C);
    Launched("combine_forward");
  }

  void combine_backward(float* dye, float* dweights, const float* dout, const float* ye,
                        const float* weights, const int32_t* pos, int N, int K, int C) override {
    const int64_t P = static_cast<int64_t>(N) * K, n = P * C;
    if (P <= 0) return;
    Use();
    if (dye != nullptr && n > 0) {
      CombineDyeKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(dye, dout, weights, pos, n, K,
                                                                      C);
      Launched("combine_backward (dye)");
    }
    if (dweights != nullptr) {
      CombineDweightsKernel<<<Blocks(P, kThreads), kThreads, 0, stream_>>>(dweights, dout, ye, pos,
                                                                           P, K, C);
      Launched("combine_backward (dweights)");
    }
  }

  void crossentropy_forward(float* losses, float* probs, const float* logits,
                            const int32_t* targets, int N, int V) override {
    if (N <= 0 || V <= 0) return;
    Use();
    CrossentropyForwardKernel<<<static_cast<unsigned>(N), kRowThreads, 0, stream_>>>(
        losses, probs, logits, targets, V);
    Launched("crossentropy_forward");
  }

  void crossentropy_backward(float* dlogits, const float* dlosses, const float* probs,
                             const int32_t* targets, int N, int V) override {
    const int64_t n = static_cast<int64_t>(N) * V;
    if (dlogits == nullptr || n <= 0) return;
    Use();
    CrossentropyBackwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream_>>>(dlogits, dlosses,
                                                                              probs, targets, n, V);
    Launched("crossentropy_backward");
  }

  // Synchronising: the CPU's reduction on the managed memory.
  float aux_loss_forward(const float* scores, const int32_t* idx, int N, int E, int K) override {
    Synchronize();
    return ::muonps::aux_loss_forward(scores, idx, N, E, K);
  }

  void aux_loss_backward(float* dscores, float daux, const float* scores, const int32_t* idx, int N,
                         int E, int K) override {
    if (dscores == nullptr || N <= 0 || E <= 0) return;
    Use();
    float* f = Scratch(E);
    if (f == nullptr) return;
    const int64_t P = static_cast<int64_t>(N) * K;
    const double norm = static_cast<double>(E) / (static_cast<double>(K) * N);
    LoadFractionKernel<<<E, kRowThreads, 0, stream_>>>(f, idx, P, norm);
    Launched("aux_loss_backward (load)");
    AuxLossBackwardKernel<<<Blocks(N, kThreads), kThreads, 0, stream_>>>(dscores, daux, scores, f,
                                                                         N, E);
    Launched("aux_loss_backward");
  }

 private:
  // The calling thread's current device is this backend's (lanes may run on
  // different threads).
  void Use() { Record(cudaSetDevice(device_), "cudaSetDevice"); }

  // Keeps the first failure for Synchronize to report.
  void Record(cudaError_t e, const char* what) {
    if (e != cudaSuccess && first_error_.empty()) first_error_ = CudaStatus(e, what).ToString();
  }
  void Record(cublasStatus_t s, const char* what) {
    if (s != CUBLAS_STATUS_SUCCESS && first_error_.empty()) {
      first_error_ = CublasStatus(s, what).ToString();
    }
  }
  void Launched(const char* what) { Record(cudaGetLastError(), what); }

  // Device scratch of at least `floats` floats, kept for later ops; nullptr
  // (the failure recorded) when it cannot be allocated. Ops on the stream run
  // in order, so one buffer serves every op.
  float* Scratch(int64_t floats) {
    if (floats <= scratch_floats_) return scratch_;
    // Ops issued earlier may still use the old buffer.
    Record(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (scratch)");
    if (scratch_ != nullptr) Record(cudaFree(scratch_), "cudaFree (scratch)");
    scratch_ = nullptr;
    scratch_floats_ = 0;
    void* p = nullptr;
    const cudaError_t e = cudaMalloc(&p, static_cast<size_t>(floats) * sizeof(float));
    Record(e, "cudaMalloc (scratch)");
    if (e != cudaSuccess) return nullptr;
    scratch_ = static_cast<float*>(p);
    scratch_floats_ = floats;
    return scratch_;
  }

  const int device_;
  cudaStream_t stream_ = nullptr;
  cublasHandle_t handle_ = nullptr;
  std::string first_error_;  // the first failed call, empty while none
  float* scratch_ = nullptr;
  int64_t scratch_floats_ = 0;
};

}  // namespace

absl::StatusOr<std::unique_ptr<ComputeBackend>> CreateCudaBackend(int device) {
  std::string why;
  const int count = VisibleDevices(&why);
  if (count == 0) return absl::UnavailableError(why);
  if (device < 0 || device >= count) {
    return absl::InvalidArgumentError(
        absl::StrCat("CUDA device ", device, " does not exist (", count, " visible)"));
  }
  int managed = 0;
  if (absl::Status st =
          CudaStatus(cudaDeviceGetAttribute(&managed, cudaDevAttrManagedMemory, device),
                     "cudaDeviceGetAttribute (managed memory)");
      !st.ok()) {
    return st;
  }
  if (managed == 0) {
    return absl::FailedPreconditionError(
        absl::StrCat("CUDA device ", device, " does not support managed memory"));
  }
  auto backend = std::make_unique<CudaBackend>(device);
  if (absl::Status st = backend->Init(); !st.ok()) return st;
  return std::unique_ptr<ComputeBackend>(std::move(backend));
}

}  // namespace muonps::cuda
