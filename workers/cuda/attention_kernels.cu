// The kernels of attention_kernels.h: one block per query row for the
// softmax passes of causal attention, one thread per output element
// elsewhere, reducing in the CPU op's order or a fixed tree
// (block_reduce.h).
#include <cmath>

#include "common/elementwise.h"
#include "workers/cuda/attention_kernels.h"
#include "workers/cuda/block_reduce.h"

namespace muonps::cuda::kernels {
namespace {

namespace ew = ::muonps::elementwise;

using ew::Max;

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

}  // namespace

cudaError_t AttentionForward(float* out, float* att, float* row_max, const float* q, const float* k,
                             const float* v, int64_t rows, int T, int H, int Dk, int Dv,
                             float scale, cudaStream_t stream) {
  AttentionForwardKernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(
      out, att, row_max, q, k, v, T, H, Dk, Dv, scale);
  return cudaGetLastError();
}

cudaError_t HeadMax(float* logit_max, const float* row_max, int64_t BH, int T,
                    cudaStream_t stream) {
  HeadMaxKernel<<<Blocks(BH, kThreads), kThreads, 0, stream>>>(logit_max, row_max, BH, T);
  return cudaGetLastError();
}

cudaError_t AttentionSoftmaxGrad(float* ds, const float* att, const float* dout, const float* v,
                                 int64_t rows, int T, int H, int Dv, cudaStream_t stream) {
  AttentionSoftmaxGradKernel<<<static_cast<unsigned>(rows), kRowThreads, 0, stream>>>(ds, att, dout,
                                                                                      v, T, H, Dv);
  return cudaGetLastError();
}

cudaError_t AttentionDq(float* dq, const float* ds, const float* k, int64_t n, int T, int H, int Dk,
                        float scale, cudaStream_t stream) {
  AttentionDqKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(dq, ds, k, n, T, H, Dk, scale);
  return cudaGetLastError();
}

cudaError_t AttentionColumn(float* dst, const float* m, const float* src, int64_t n, int T, int H,
                            int D, float scale, cudaStream_t stream) {
  AttentionColumnKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(dst, m, src, n, T, H, D,
                                                                      scale);
  return cudaGetLastError();
}

cudaError_t SliceForward(float* out, const float* inp, int64_t n, int ld, int off, int w,
                         cudaStream_t stream) {
  SliceForwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(out, inp, n, ld, off, w);
  return cudaGetLastError();
}

cudaError_t SliceBackward(float* dinp, const float* dout, int64_t n, int ld, int off, int w,
                          cudaStream_t stream) {
  SliceBackwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(dinp, dout, n, ld, off, w);
  return cudaGetLastError();
}

cudaError_t MlaHeadsForward(float* q, float* k, float* v, const float* qp, const float* kv,
                            const float* kva, const float* cos, const float* sin, int64_t n, int T,
                            int H, int dn, int dr, int dv, int r, cudaStream_t stream) {
  MlaHeadsForwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(q, k, v, qp, kv, kva, cos,
                                                                      sin, n, T, H, dn, dr, dv, r);
  return cudaGetLastError();
}

cudaError_t MlaHeadsBackward(float* dqp, float* dkv, const float* dq, const float* dk,
                             const float* dv, const float* cos, const float* sin, int64_t n, int T,
                             int H, int dn, int dr, int dv_dim, cudaStream_t stream) {
  MlaHeadsBackwardKernel<<<Blocks(n, kThreads), kThreads, 0, stream>>>(
      dqp, dkv, dq, dk, dv, cos, sin, n, T, H, dn, dr, dv_dim);
  return cudaGetLastError();
}

cudaError_t MlaSharedKeyBackward(float* dkva, const float* dk, const float* cos, const float* sin,
                                 int64_t pairs, int T, int H, int dn, int dr, int r,
                                 cudaStream_t stream) {
  MlaSharedKeyBackwardKernel<<<Blocks(pairs, kThreads), kThreads, 0, stream>>>(
      dkva, dk, cos, sin, pairs, T, H, dn, dr, r);
  return cudaGetLastError();
}

}  // namespace muonps::cuda::kernels
