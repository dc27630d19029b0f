// The CUDA kernels of the MoE layer, each the twin of a CPU op of
// model/ops.h (or one pass of it): the router's scores, top-k choice and
// weights, the dispatch of tokens to their experts' rows and the weighted
// combine back, and the aux loss's gradient. build_routing and
// aux_loss_forward have none: the backend runs the CPU op on managed
// memory. The per-row arithmetic is common/elementwise.h's, as on the CPU;
// the order of every reduction is fixed (block_reduce.h), so a launch
// repeated on the same device gives the same bits.
//
// Pointers are device pointers; layouts are those of the CPU op; backward
// passes ADD into their outputs. Each function launches one kernel on
// `stream` and returns the launch status. Counts (N, n, P) must be
// positive: the backend returns early on empty ops.
//
// Sizes: N tokens, E routed experts, K experts per token, P = N*K
// assignments, C channels; n the elements of the output.
#ifndef MUONPS_WORKERS_CUDA_MOE_KERNELS_H_
#define MUONPS_WORKERS_CUDA_MOE_KERNELS_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace muonps::cuda::kernels {

// ---- router: logits, scores (N, E); idx, weights (N, K); bias (E) or null.

// scores = sigmoid(logits), n = N*E elements.
cudaError_t RouterSigmoid(float* scores, const float* logits, int64_t n, cudaStream_t stream);
// scores = softmax over each row of logits.
cudaError_t RouterSoftmax(float* scores, const float* logits, int N, int E, cudaStream_t stream);
cudaError_t RouterSigmoidBackward(float* dlogits, const float* dscores, const float* scores,
                                  int64_t n, cudaStream_t stream);
cudaError_t RouterSoftmaxBackward(float* dlogits, const float* dscores, const float* scores, int N,
                                  int E, cudaStream_t stream);
cudaError_t RouterTopk(int32_t* idx, const float* scores, const float* bias, int N, int E, int K,
                       cudaStream_t stream);
cudaError_t TopkWeightsForward(float* weights, const float* scores, const int32_t* idx, int N,
                               int E, int K, bool norm, float scale, cudaStream_t stream);
cudaError_t TopkWeightsBackward(float* dscores, const float* dweights, const float* scores,
                                const int32_t* idx, int N, int E, int K, bool norm, float scale,
                                cudaStream_t stream);

// ---- dispatch / combine: x, out (N, C); xe, ye (P, C) in build_routing's
// sorted order; token (P) and pos (N, K) its plan.

// xe = x[token], n = P*C.
cudaError_t DispatchForward(float* xe, const float* x, const int32_t* token, int64_t n, int C,
                            cudaStream_t stream);
// n = N*C.
cudaError_t DispatchBackward(float* dx, const float* dxe, const int32_t* pos, int64_t n, int K,
                             int C, cudaStream_t stream);
// out += the K weighted rows of ye, n = N*C.
cudaError_t CombineForward(float* out, const float* ye, const float* weights, const int32_t* pos,
                           int64_t n, int K, int C, cudaStream_t stream);
// combine_backward's dye, n = P*C.
cudaError_t CombineDye(float* dye, const float* dout, const float* weights, const int32_t* pos,
                       int64_t n, int K, int C, cudaStream_t stream);
// combine_backward's dweights (P).
cudaError_t CombineDweights(float* dweights, const float* dout, const float* ye, const int32_t* pos,
                            int64_t P, int K, int C, cudaStream_t stream);

// ---- aux loss

// f (E) = norm * the number of assignments of each expert in idx (P);
// E is the launch's block count.
cudaError_t LoadFraction(float* f, const int32_t* idx, int64_t P, double norm, int E,
                         cudaStream_t stream);
// dscores (N, E) += daux * d aux / d scores, f from LoadFraction.
cudaError_t AuxLossBackward(float* dscores, float daux, const float* scores, const float* f, int N,
                            int E, cudaStream_t stream);

}  // namespace muonps::cuda::kernels

#endif  // MUONPS_WORKERS_CUDA_MOE_KERNELS_H_
