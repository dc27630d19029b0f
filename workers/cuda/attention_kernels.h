// The CUDA kernels of the attention layer, each the twin of a CPU op of
// model/ops.h (or one pass of it): causal attention forward and backward,
// the column slices of a row-major matrix and MLA's per-head split of its
// projections. The CUDA backend (cuda_backend.cu) calls them; the order of
// every reduction is fixed (block_reduce.h), so a launch repeated on the
// same device gives the same bits.
//
// Pointers are device pointers; layouts are those of the CPU op; backward
// passes ADD into their outputs. Each function launches one kernel on
// `stream` and returns the launch status. n (or rows, pairs) counts the
// work items and must be positive: the backend returns early on empty ops.
//
// Sizes: B batch, T time, H heads, Dk/Dv key/value head width, dn/dr the
// non-rotated and rotated parts of an MLA query/key head, dv its value
// head, r the rank of the compressed KV.
#ifndef MUONPS_WORKERS_CUDA_ATTENTION_KERNELS_H_
#define MUONPS_WORKERS_CUDA_ATTENTION_KERNELS_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace muonps::cuda::kernels {

// ---- causal attention: q, k (B, T, H*Dk), v, out (B, T, H*Dv), att and ds
// (B, H, T, T); rows = B*H*T query rows, scale = 1/sqrt(Dk).

// out and att (the softmax probabilities, 0 above the diagonal); row_max
// (B*H*T), when not null, gets each row's maximum logit.
cudaError_t AttentionForward(float* out, float* att, float* row_max, const float* q, const float* k,
                             const float* v, int64_t rows, int T, int H, int Dk, int Dv,
                             float scale, cudaStream_t stream);
// logit_max (BH) = the maximum of row_max over each head's T rows.
cudaError_t HeadMax(float* logit_max, const float* row_max, int64_t BH, int T, cudaStream_t stream);
// ds = the gradient of the scaled logits (written, not added).
cudaError_t AttentionSoftmaxGrad(float* ds, const float* att, const float* dout, const float* v,
                                 int64_t rows, int T, int H, int Dv, cudaStream_t stream);
// dq (n = B*T*H*Dk elements) += scale * ds k.
cudaError_t AttentionDq(float* dq, const float* ds, const float* k, int64_t n, int T, int H, int Dk,
                        float scale, cudaStream_t stream);
// dst (n = B*T*H*D elements) += scale * m^T src, per (b, h): dk from ds and
// q, dv from att and dout (scale 1).
cudaError_t AttentionColumn(float* dst, const float* m, const float* src, int64_t n, int T, int H,
                            int D, float scale, cudaStream_t stream);

// ---- column slices: out (N, w) = inp[:, off:off + w] of inp (N, ld); n = N*w.

cudaError_t SliceForward(float* out, const float* inp, int64_t n, int ld, int off, int w,
                         cudaStream_t stream);
cudaError_t SliceBackward(float* dinp, const float* dout, int64_t n, int ld, int off, int w,
                          cudaStream_t stream);

// ---- MLA heads: qp (B*T, H, dn + dr), kv (B*T, H, dn + dv), kva (B*T, r + dr)
// to q, k (B*T, H, dn + dr) and v (B*T, H, dv); cos/sin (T, dr/2);
// n = B*T*H*(dn + dr/2 + dv).

cudaError_t MlaHeadsForward(float* q, float* k, float* v, const float* qp, const float* kv,
                            const float* kva, const float* cos, const float* sin, int64_t n, int T,
                            int H, int dn, int dr, int dv, int r, cudaStream_t stream);
// dqp and dkv may each be null (not wanted); dv_dim is the value head width.
cudaError_t MlaHeadsBackward(float* dqp, float* dkv, const float* dq, const float* dk,
                             const float* dv, const float* cos, const float* sin, int64_t n, int T,
                             int H, int dn, int dr, int dv_dim, cudaStream_t stream);
// The shared rotated key's gradient into dkva's last dr columns, the heads
// summed; pairs = B*T*(dr/2).
cudaError_t MlaSharedKeyBackward(float* dkva, const float* dk, const float* cos, const float* sin,
                                 int64_t pairs, int T, int H, int dn, int dr, int r,
                                 cudaStream_t stream);

}  // namespace muonps::cuda::kernels

#endif  // MUONPS_WORKERS_CUDA_ATTENTION_KERNELS_H_
