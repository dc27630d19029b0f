// Device code shared by the CUDA backend's kernel files (attention_kernels,
// moe_kernels, vocab_kernels): their launch shapes and the fixed-order
// reduction over a block. Included by .cu files only.
//
// Every kernel gives each output element (or row) to one thread, warp or
// block, which reduces in a fixed order: either the CPU op's loop order (a
// thread looping over the reduced index in increasing order) or a
// fixed-shape tree over a block (BlockReduce). No floating-point atomics: a
// launch repeated on the same device gives the same bits. Where the CPU op
// scatters (dscores[n, idx[n, j]] +=, dye[pos[n, j], :] +=), one thread
// owns the row or the element written, so there is no race.
#ifndef MUONPS_WORKERS_CUDA_BLOCK_REDUCE_H_
#define MUONPS_WORKERS_CUDA_BLOCK_REDUCE_H_

#include <cuda_runtime.h>

#include <cstdint>

#include "common/elementwise.h"

namespace muonps::cuda::kernels {

constexpr int kThreads = 256;     // element-wise and per-row-thread kernels
constexpr int kRowThreads = 128;  // one block per row (attention, cross-entropy, loads)

inline int Blocks(int64_t n, int per_block) {
  return static_cast<int>((n + per_block - 1) / per_block);
}

// std::max's choice, so maxima agree with the CPU's on every input.
struct MaxOp {
  __device__ float operator()(float a, float b) const { return ::muonps::elementwise::Max(a, b); }
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

}  // namespace muonps::cuda::kernels

#endif  // MUONPS_WORKERS_CUDA_BLOCK_REDUCE_H_
