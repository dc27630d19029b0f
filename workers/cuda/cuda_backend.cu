// The CUDA backend (cuda_backend.h): the ComputeBackend class, which checks
// each op's sizes, finds scratch, launches the op's kernels on its stream
// and records the first failure. The kernels are in attention_kernels,
// moe_kernels, vocab_kernels and elementwise_kernels; block_reduce.h states
// the reduction order they all keep. Products are
// cuBLAS; build_routing and aux_loss_forward run the CPU op on managed
// memory.
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
#include "model/ops.h"
#include "workers/cuda/attention_kernels.h"
#include "workers/cuda/cuda_backend.h"
#include "workers/cuda/cuda_status.h"
#include "workers/cuda/elementwise_kernels.h"
#include "workers/cuda/moe_kernels.h"
#include "workers/cuda/vocab_kernels.h"

namespace muonps::cuda {
namespace {

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
    Record(Add(a, b, n, stream_), "AddInPlace");
  }

  void embedding_forward(float* out, const int32_t* inp, const float* wte, int N, int C) override {
    const int64_t n = static_cast<int64_t>(N) * C;
    if (n <= 0) return;
    Use();
    Record(kernels::EmbeddingForward(out, inp, wte, n, C, stream_), "embedding_forward");
  }

  void embedding_backward(float* dwte, const float* dout, const int32_t* inp, int N,
                          int C) override {
    if (dwte == nullptr || N <= 0 || C <= 0) return;
    Use();
    Record(kernels::EmbeddingBackward(dwte, dout, inp, N, C, stream_), "embedding_backward");
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
    Record(
        kernels::AttentionForward(out, att, row_max, q, k, v, rows, T, H, Dk, Dv, scale, stream_),
        "attention_forward");
    if (logit_max != nullptr) {
      Record(kernels::HeadMax(logit_max, row_max, BH, T, stream_), "attention_forward (logit_max)");
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
      Record(kernels::AttentionColumn(dv, att, dout, nv, T, H, Dv, 1.0f, stream_),
             "attention_backward (dv)");
    }
    if ((dq == nullptr && dk == nullptr) || nk <= 0) return;
    float* ds = Scratch(rows * T);
    if (ds == nullptr) return;
    Record(kernels::AttentionSoftmaxGrad(ds, att, dout, v, rows, T, H, Dv, stream_),
           "attention_backward (softmax)");
    const float scale = 1.0f / std::sqrt(static_cast<float>(Dk));
    if (dq != nullptr) {
      Record(kernels::AttentionDq(dq, ds, k, nk, T, H, Dk, scale, stream_),
             "attention_backward (dq)");
    }
    if (dk != nullptr) {
      Record(kernels::AttentionColumn(dk, ds, q, nk, T, H, Dk, scale, stream_),
             "attention_backward (dk)");
    }
  }

  void slice_forward(float* out, const float* inp, int64_t N, int ld, int off, int w) override {
    const int64_t n = N * w;
    if (n <= 0) return;
    Use();
    Record(kernels::SliceForward(out, inp, n, ld, off, w, stream_), "slice_forward");
  }

  void slice_backward(float* dinp, const float* dout, int64_t N, int ld, int off, int w) override {
    const int64_t n = N * w;
    if (dinp == nullptr || n <= 0) return;
    Use();
    Record(kernels::SliceBackward(dinp, dout, n, ld, off, w, stream_), "slice_backward");
  }

  void mla_heads_forward(float* q, float* k, float* v, const float* qp, const float* kv,
                         const float* kva, const float* cos, const float* sin, int B, int T, int H,
                         int dn, int dr, int dv, int r) override {
    const int64_t n = static_cast<int64_t>(B) * T * H * (dn + dr / 2 + dv);
    if (n <= 0) return;
    Use();
    Record(
        kernels::MlaHeadsForward(q, k, v, qp, kv, kva, cos, sin, n, T, H, dn, dr, dv, r, stream_),
        "mla_heads_forward");
  }

  void mla_heads_backward(float* dqp, float* dkv, float* dkva, const float* dq, const float* dk,
                          const float* dv, const float* cos, const float* sin, int B, int T, int H,
                          int dn, int dr, int dv_dim, int r) override {
    const int64_t tokens = static_cast<int64_t>(B) * T;
    if (tokens <= 0) return;
    Use();
    const int64_t n = tokens * H * (dn + dr / 2 + dv_dim);
    if ((dqp != nullptr || dkv != nullptr) && n > 0) {
      Record(kernels::MlaHeadsBackward(dqp, dkv, dq, dk, dv, cos, sin, n, T, H, dn, dr, dv_dim,
                                       stream_),
             "mla_heads_backward");
    }
    const int64_t pairs = tokens * (dr / 2);
    if (dkva != nullptr && pairs > 0) {
      Record(kernels::MlaSharedKeyBackward(dkva, dk, cos, sin, pairs, T, H, dn, dr, r, stream_),
             "mla_heads_backward (shared key)");
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
    Record(func == ScoringFunc::kSigmoid ? kernels::RouterSigmoid(scores, logits, n, stream_)
                                         : kernels::RouterSoftmax(scores, logits, N, E, stream_),
           "router_score_forward");
  }

  void router_score_backward(float* dlogits, const float* dscores, const float* scores, int N,
                             int E, ScoringFunc func) override {
    const int64_t n = static_cast<int64_t>(N) * E;
    if (dlogits == nullptr || n <= 0) return;
    Use();
    Record(func == ScoringFunc::kSigmoid
               ? kernels::RouterSigmoidBackward(dlogits, dscores, scores, n, stream_)
               : kernels::RouterSoftmaxBackward(dlogits, dscores, scores, N, E, stream_),
           "router_score_backward");
  }

  void router_topk(int32_t* idx, const float* scores, const float* bias, int N, int E,
                   int K) override {
    if (K <= 0 || N <= 0) return;
    Use();
    Record(kernels::RouterTopk(idx, scores, bias, N, E, K, stream_), "router_topk");
  }

  void topk_weights_forward(float* weights, const float* scores, const int32_t* idx, int N, int E,
                            int K, bool norm, float scale) override {
    if (N <= 0 || K <= 0) return;
    Use();
    Record(kernels::TopkWeightsForward(weights, scores, idx, N, E, K, norm, scale, stream_),
           "topk_weights_forward");
  }

  void topk_weights_backward(float* dscores, const float* dweights, const float* scores,
                             const int32_t* idx, int N, int E, int K, bool norm,
                             float scale) override {
    if (dscores == nullptr || N <= 0 || K <= 0) return;
    Use();
    Record(
        kernels::TopkWeightsBackward(dscores, dweights, scores, idx, N, E, K, norm, scale, stream_),
        "topk_weights_backward");
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
    Record(kernels::DispatchForward(xe, x, token, n, C, stream_), "dispatch_forward");
  }

  void dispatch_backward(float* dx, const float* dxe, const int32_t* pos, int N, int K,
                         int C) override {
    const int64_t n = static_cast<int64_t>(N) * C;
    if (dx == nullptr || n <= 0) return;
    Use();
    Record(kernels::DispatchBackward(dx, dxe, pos, n, K, C, stream_), "dispatch_backward");
  }

  void combine_forward(float* out, const float* ye, const float* weights, const int32_t* pos, int N,
                       int K, int C) override {
    const int64_t n = static_cast<int64_t>(N) * C;
    if (n <= 0) return;
    Use();
    Record(kernels::CombineForward(out, ye, weights, pos, n, K, C, stream_), "combine_forward");
  }

  void combine_backward(float* dye, float* dweights, const float* dout, const float* ye,
                        const float* weights, const int32_t* pos, int N, int K, int C) override {
    const int64_t P = static_cast<int64_t>(N) * K, n = P * C;
    if (P <= 0) return;
    Use();
    if (dye != nullptr && n > 0) {
      Record(kernels::CombineDye(dye, dout, weights, pos, n, K, C, stream_),
             "combine_backward (dye)");
    }
    if (dweights != nullptr) {
      Record(kernels::CombineDweights(dweights, dout, ye, pos, P, K, C, stream_),
             "combine_backward (dweights)");
    }
  }

  void crossentropy_forward(float* losses, float* probs, const float* logits,
                            const int32_t* targets, int N, int V) override {
    if (N <= 0 || V <= 0) return;
    Use();
    Record(kernels::CrossentropyForward(losses, probs, logits, targets, N, V, stream_),
           "crossentropy_forward");
  }

  void crossentropy_backward(float* dlogits, const float* dlosses, const float* probs,
                             const int32_t* targets, int N, int V) override {
    const int64_t n = static_cast<int64_t>(N) * V;
    if (dlogits == nullptr || n <= 0) return;
    Use();
    Record(kernels::CrossentropyBackward(dlogits, dlosses, probs, targets, n, V, stream_),
           "crossentropy_backward");
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
    Record(kernels::LoadFraction(f, idx, P, norm, E, stream_), "aux_loss_backward (load)");
    Record(kernels::AuxLossBackward(dscores, daux, scores, f, N, E, stream_), "aux_loss_backward");
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
