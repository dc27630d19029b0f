#include <algorithm>
#include <utility>

#include "absl/strings/str_cat.h"
#include "workers/cuda/cuda_status.h"
#include "workers/cuda/newton_schulz.h"

namespace muonps::cuda {
namespace {

// The coefficients and the normalisation of optim/newton_schulz.cc.
constexpr float kA = 3.4445f, kB = -4.7750f, kC = 2.0315f;
constexpr double kNormEps = 1e-7;
constexpr int kNormThreads = 256;

// One block per matrix: per-thread strided sums, then a tree in shared
// memory; the order depends only on the size and the block shape.
__global__ void SumOfSquaresKernel(double* norms, const float* x, int64_t size) {
  __shared__ double partial[kNormThreads];
  const float* m = x + static_cast<int64_t>(blockIdx.x) * size;
  double s = 0.0;
  for (int64_t i = threadIdx.x; i < size; i += blockDim.x) s += static_cast<double>(m[i]) * m[i];
  partial[threadIdx.x] = s;
  __syncthreads();
  for (int stride = blockDim.x / 2; stride > 0; stride /= 2) {
    if (threadIdx.x < stride) partial[threadIdx.x] += partial[threadIdx.x + stride];
    __syncthreads();
  }
  if (threadIdx.x == 0) norms[blockIdx.x] = partial[0];
}

// out = in / (||in||_F + eps), matrix by matrix.
__global__ void NormaliseKernel(float* out, const float* in, const double* sums, int64_t size,
                                int batch) {
  const int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= size * batch) return;
  const double inv = 1.0 / (sqrt(sums[i / size]) + kNormEps);
  out[i] = static_cast<float>(in[i] * inv);
}

cublasComputeType_t ComputeType(NsPrecision p) {
  return p == NsPrecision::kBF16 ? CUBLAS_COMPUTE_32F_FAST_16BF : CUBLAS_COMPUTE_32F;
}

// Column-major C (m, n) = alpha op(A) op(B) + beta C, `batch` times.
cublasStatus_t Batched(cublasHandle_t h, NsPrecision p, cublasOperation_t ta, cublasOperation_t tb,
                       int m, int n, int k, float alpha, const float* a, int lda, int64_t stride_a,
                       const float* b, int ldb, int64_t stride_b, float beta, float* c, int ldc,
                       int64_t stride_c, int batch) {
  return cublasGemmStridedBatchedEx(h, ta, tb, m, n, k, &alpha, a, CUDA_R_32F, lda, stride_a, b,
                                    CUDA_R_32F, ldb, stride_b, &beta, c, CUDA_R_32F, ldc, stride_c,
                                    batch, ComputeType(p), CUBLAS_GEMM_DEFAULT);
}

}  // namespace

absl::StatusOr<NewtonSchulzRunner> NewtonSchulzRunner::Create(cudaStream_t stream) {
  cublasHandle_t handle = nullptr;
  if (absl::Status st = CublasStatus(cublasCreate(&handle), "cublasCreate"); !st.ok()) return st;
  NewtonSchulzRunner runner(handle, stream);
  if (absl::Status st = CublasStatus(cublasSetStream(handle, stream), "cublasSetStream");
      !st.ok()) {
    return st;
  }
  // No TF32 unless a call asks for reduced precision by its compute type.
  if (absl::Status st =
          CublasStatus(cublasSetMathMode(handle, CUBLAS_PEDANTIC_MATH), "cublasSetMathMode");
      !st.ok()) {
    return st;
  }
  return runner;
}

NewtonSchulzRunner::NewtonSchulzRunner(NewtonSchulzRunner&& other) noexcept
    : handle_(std::exchange(other.handle_, nullptr)),
      stream_(other.stream_),
      scratch_(std::exchange(other.scratch_, nullptr)),
      scratch_floats_(std::exchange(other.scratch_floats_, 0)),
      norms_(std::exchange(other.norms_, nullptr)),
      norms_capacity_(std::exchange(other.norms_capacity_, 0)) {}

NewtonSchulzRunner::~NewtonSchulzRunner() {
  if (scratch_ != nullptr) cudaFree(scratch_);
  if (norms_ != nullptr) cudaFree(norms_);
  if (handle_ != nullptr) cublasDestroy(handle_);
}

absl::Status NewtonSchulzRunner::Reserve(int64_t floats) {
  if (floats <= scratch_floats_) return absl::OkStatus();
  if (scratch_ != nullptr) cudaFree(scratch_);
  scratch_ = nullptr;
  scratch_floats_ = 0;
  void* p = nullptr;
  if (absl::Status st = CudaStatus(cudaMalloc(&p, floats * sizeof(float)), "cudaMalloc (NS)");
      !st.ok()) {
    return st;
  }
  scratch_ = static_cast<float*>(p);
  scratch_floats_ = floats;
  return absl::OkStatus();
}

absl::Status NewtonSchulzRunner::Run(float* out, const float* in, int rows, int cols, int batch,
                                     int steps, NsPrecision precision) {
  if (rows <= 0 || cols <= 0 || batch <= 0 || steps < 0) {
    return absl::InvalidArgumentError(absl::StrCat("NewtonSchulz: shape ", rows, "x", cols,
                                                   ", batch ", batch, ", steps ", steps));
  }
  const int m = std::min(rows, cols), n = std::max(rows, cols);
  const int64_t size = static_cast<int64_t>(m) * n, mm = static_cast<int64_t>(m) * m;
  // X, the next X, A and B for every matrix of the batch.
  if (absl::Status st = Reserve(batch * (2 * size + 2 * mm)); !st.ok()) return st;
  float* x = scratch_;
  float* next = x + batch * size;
  float* a = next + batch * size;
  float* b = a + batch * mm;
  if (batch > norms_capacity_) {
    if (norms_ != nullptr) cudaFree(norms_);
    norms_ = nullptr;
    norms_capacity_ = 0;
    void* p = nullptr;
    if (absl::Status st = CudaStatus(cudaMalloc(&p, batch * sizeof(double)), "cudaMalloc (norms)");
        !st.ok()) {
      return st;
    }
    norms_ = static_cast<double*>(p);
    norms_capacity_ = batch;
  }
  SumOfSquaresKernel<<<batch, kNormThreads, 0, stream_>>>(norms_, in, size);
  const int64_t total = size * batch;
  NormaliseKernel<<<static_cast<int>((total + 255) / 256), 256, 0, stream_>>>(x, in, norms_, size,
                                                                              batch);
  if (absl::Status st = CudaStatus(cudaGetLastError(), "NewtonSchulz normalise"); !st.ok()) {
    return st;
  }
  // The buffers keep the input's memory layout throughout. Wide (rows <=
  // cols): the row-major X (m, n) is the column-major Y = X^T (n, m), so
  // A = Y^T Y and X' = a X + B X is Y' = a Y + Y B (B symmetric). Tall: the
  // row-major G (n, m) is the column-major X = G^T (m, n) itself, so
  // A = X X^T and X' = a X + B X.
  const bool wide = rows <= cols;
  for (int it = 0; it < steps; ++it) {
    cublasStatus_t s;
    if (wide) {
      s = Batched(handle_, precision, CUBLAS_OP_T, CUBLAS_OP_N, m, m, n, 1.0f, x, n, size, x, n,
                  size, 0.0f, a, m, mm, batch);
    } else {
      s = Batched(handle_, precision, CUBLAS_OP_N, CUBLAS_OP_T, m, m, n, 1.0f, x, m, size, x, m,
                  size, 0.0f, a, m, mm, batch);
    }
    if (absl::Status st = CublasStatus(s, "NewtonSchulz X X^T"); !st.ok()) return st;
    // B = b A + c A A.
    if (absl::Status st = CudaStatus(
            cudaMemcpyAsync(b, a, batch * mm * sizeof(float), cudaMemcpyDeviceToDevice, stream_),
            "NewtonSchulz copy A");
        !st.ok()) {
      return st;
    }
    s = Batched(handle_, precision, CUBLAS_OP_N, CUBLAS_OP_N, m, m, m, kC, a, m, mm, a, m, mm, kB,
                b, m, mm, batch);
    if (absl::Status st = CublasStatus(s, "NewtonSchulz A A"); !st.ok()) return st;
    // next = a X + (B X), then swap.
    if (absl::Status st = CudaStatus(cudaMemcpyAsync(next, x, batch * size * sizeof(float),
                                                     cudaMemcpyDeviceToDevice, stream_),
                                     "NewtonSchulz copy X");
        !st.ok()) {
      return st;
    }
    if (wide) {
      s = Batched(handle_, precision, CUBLAS_OP_N, CUBLAS_OP_N, n, m, m, 1.0f, x, n, size, b, m, mm,
                  kA, next, n, size, batch);
    } else {
      s = Batched(handle_, precision, CUBLAS_OP_N, CUBLAS_OP_N, m, n, m, 1.0f, b, m, mm, x, m, size,
                  kA, next, m, size, batch);
    }
    if (absl::Status st = CublasStatus(s, "NewtonSchulz B X"); !st.ok()) return st;
    std::swap(x, next);
  }
  return CudaStatus(
      cudaMemcpyAsync(out, x, total * sizeof(float), cudaMemcpyDeviceToDevice, stream_),
      "NewtonSchulz result");
}

absl::Status NewtonSchulzRunner::Gemm(float* c, const float* a, const float* b, int m, int n, int k,
                                      int batch, NsPrecision precision) {
  // Row-major C = A B is column-major C^T = B^T A^T.
  return CublasStatus(Batched(handle_, precision, CUBLAS_OP_N, CUBLAS_OP_N, n, m, k, 1.0f, b, n,
                              static_cast<int64_t>(k) * n, a, k, static_cast<int64_t>(m) * k, 0.0f,
                              c, n, static_cast<int64_t>(m) * n, batch),
                      "cublasGemmStridedBatchedEx");
}

}  // namespace muonps::cuda
