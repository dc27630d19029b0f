// CUDA twins of the element-wise ops of model/ops.h: RMSNorm, RoPE and
// SwiGLU, forward and backward, and the backend's AddInPlace. Each kernel
// runs the per-element formula of common/elementwise.h that the CPU op
// runs, so they differ from the CPU only by the device's rounding (fused
// multiply-adds, expf) and, for the reductions over a row or a channel, by
// the order of the additions, which is fixed by the launch shape: repeated
// launches give the same bits.
//
// Pointers are device pointers; shapes and accumulation (backward ops ADD
// into their outputs) are those of the CPU op of the same name. Every
// function launches on `stream` and returns the launch status.
#ifndef MUONPS_WORKERS_CUDA_ELEMENTWISE_KERNELS_H_
#define MUONPS_WORKERS_CUDA_ELEMENTWISE_KERNELS_H_

#include <cuda_runtime.h>

#include <cstdint>

namespace muonps::cuda {

cudaError_t RmsnormForward(float* out, float* rstd, const float* inp, const float* weight, int N,
                           int C, float eps, cudaStream_t stream);
// dinp and dweight may each be null (not wanted).
cudaError_t RmsnormBackward(float* dinp, float* dweight, const float* dout, const float* inp,
                            const float* weight, const float* rstd, int N, int C,
                            cudaStream_t stream);

// inp/out (B, T, H, D); cos/sin (T, D/2). out may alias inp: each thread
// reads its pair before writing it.
cudaError_t RopeForward(float* out, const float* inp, const float* cos, const float* sin, int B,
                        int T, int H, int D, cudaStream_t stream);
cudaError_t RopeBackward(float* dinp, const float* dout, const float* cos, const float* sin, int B,
                         int T, int H, int D, cudaStream_t stream);

// gate/up/out (N, F).
cudaError_t SwigluForward(float* out, const float* gate, const float* up, int64_t N, int F,
                          cudaStream_t stream);
cudaError_t SwigluBackward(float* dgate, float* dup, const float* dout, const float* gate,
                           const float* up, int64_t N, int F, cudaStream_t stream);

// a[i] += b[i] for i < n: one rounding, the CPU's bits.
cudaError_t Add(float* a, const float* b, int64_t n, cudaStream_t stream);

}  // namespace muonps::cuda

#endif  // MUONPS_WORKERS_CUDA_ELEMENTWISE_KERNELS_H_
