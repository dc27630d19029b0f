// The CUDA kernels at the vocabulary ends of the model, each the twin of a
// CPU op of model/ops.h: the token embedding (a row of wte per token) and
// the cross-entropy loss over the logits. The CUDA backend (cuda_backend.cu)
// calls them; the order of every reduction is fixed (block_reduce.h), so a
// launch repeated on the same device gives the same bits.
//
// Pointers are device pointers; layouts are those of the CPU op; backward
// passes ADD into their outputs. Each function launches one kernel on
// `stream` and returns the launch status. Counts must be positive: the
// backend returns early on empty ops.
//
// Sizes: N tokens, C channels, V vocabulary; n the elements of the output.
#ifndef MUONPS_WORKERS_CUDA_VOCAB_KERNELS_H_
#define MUONPS_WORKERS_CUDA_VOCAB_KERNELS_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace muonps::cuda::kernels {

// out (N, C) = wte (V, C) rows of the tokens inp (N); n = N*C.
cudaError_t EmbeddingForward(float* out, const int32_t* inp, const float* wte, int64_t n, int C,
                             cudaStream_t stream);
// dwte[inp[n], :] += dout[n, :], n in increasing order.
cudaError_t EmbeddingBackward(float* dwte, const float* dout, const int32_t* inp, int N, int C,
                              cudaStream_t stream);

// probs (N, V) = softmax(logits) per row; losses (N) = -log probs at targets (N).
cudaError_t CrossentropyForward(float* losses, float* probs, const float* logits,
                                const int32_t* targets, int N, int V, cudaStream_t stream);
// dlogits += dlosses * (probs - onehot(targets)); n = N*V.
cudaError_t CrossentropyBackward(float* dlogits, const float* dlosses, const float* probs,
                                 const int32_t* targets, int64_t n, int V, cudaStream_t stream);

}  // namespace muonps::cuda::kernels

#endif  // MUONPS_WORKERS_CUDA_VOCAB_KERNELS_H_
