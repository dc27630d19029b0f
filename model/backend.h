// The compute backend under the model: every op of model/ops.h, plus the
// buffer operations MoeModel needs, behind one interface, so that the same
// model code runs on the CPU (CpuBackend: the functions of ops.h) or on a
// GPU (workers/cuda/cuda_backend.h: kernels and cuBLAS on device memory).
//
// Contract, for every backend:
// - Pointers passed to the ops point into memory from Allocate (or, for the
//   CPU backend, any host memory). Shapes, accumulation (backward ops ADD)
//   and the reduction orders of each op are those documented in ops.h.
// - Ops may run asynchronously, in the order they were issued. The host
//   reads or writes model buffers only after Synchronize; Allocate's memory
//   is readable and writable by the host then.
// - A backend is used by one thread at a time (MoeModel: one per lane).
#ifndef MUONPS_MODEL_BACKEND_H_
#define MUONPS_MODEL_BACKEND_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "model/ops.h"

namespace muonps {

class ComputeBackend {
 public:
  virtual ~ComputeBackend() = default;
  // "cpu", "cuda:0", ...
  virtual std::string name() const = 0;

  // Memory the ops compute on and the host may touch after Synchronize
  // (zero-filled). Free takes what Allocate returned (nullptr: nothing).
  virtual void* Allocate(size_t bytes) = 0;
  virtual void Free(void* p) = 0;
  // Waits for every op issued so far.
  virtual void Synchronize() {}
  // dst[0, bytes) = src[0, bytes), either side host or Allocate memory.
  virtual void Copy(void* dst, const void* src, size_t bytes) = 0;

  // x[0, n) = 0;  a[0, n) += b[0, n).
  virtual void Zero(float* x, int64_t n) = 0;
  virtual void AddInPlace(float* a, const float* b, int64_t n) = 0;

  // ---- the ops of model/ops.h, same arguments ----
  virtual void embedding_forward(float* out, const int32_t* inp, const float* wte, int N,
                                 int C) = 0;
  virtual void embedding_backward(float* dwte, const float* dout, const int32_t* inp, int N,
                                  int C) = 0;
  virtual void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight,
                               int N, int C, float eps) = 0;
  virtual void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                                const float* weight, const float* rstd, int N, int C) = 0;
  virtual void matmul_forward(float* out, const float* inp, const float* weight, int N, int IC,
                              int OC) = 0;
  virtual void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                               const float* weight, int N, int IC, int OC) = 0;
  virtual void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int B,
                            int T, int H, int D) = 0;
  virtual void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin,
                             int B, int T, int H, int D) = 0;
  virtual void attention_forward(float* out, float* att, const float* q, const float* k,
                                 const float* v, int B, int T, int H, int Dk, int Dv,
                                 float* logit_max) = 0;
  virtual void attention_backward(float* dq, float* dk, float* dv, const float* dout,
                                  const float* q, const float* k, const float* v, const float* att,
                                  int B, int T, int H, int Dk, int Dv) = 0;
  virtual void slice_forward(float* out, const float* inp, int64_t N, int ld, int off, int w) = 0;
  virtual void slice_backward(float* dinp, const float* dout, int64_t N, int ld, int off,
                              int w) = 0;
  virtual void mla_heads_forward(float* q, float* k, float* v, const float* qp, const float* kv,
                                 const float* kva, const float* cos, const float* sin, int B, int T,
                                 int H, int dn, int dr, int dv, int r) = 0;
  virtual void mla_heads_backward(float* dqp, float* dkv, float* dkva, const float* dq,
                                  const float* dk, const float* dv, const float* cos,
                                  const float* sin, int B, int T, int H, int dn, int dr, int dv_dim,
                                  int r) = 0;
  virtual void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int F) = 0;
  virtual void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                               const float* up, int64_t N, int F) = 0;
  virtual void router_score_forward(float* scores, const float* logits, int N, int E,
                                    ScoringFunc func) = 0;
  virtual void router_score_backward(float* dlogits, const float* dscores, const float* scores,
                                     int N, int E, ScoringFunc func) = 0;
  virtual void router_topk(int32_t* idx, const float* scores, const float* bias, int N, int E,
                           int K) = 0;
  virtual void topk_weights_forward(float* weights, const float* scores, const int32_t* idx, int N,
                                    int E, int K, bool norm, float scale) = 0;
  virtual void topk_weights_backward(float* dscores, const float* dweights, const float* scores,
                                     const int32_t* idx, int N, int E, int K, bool norm,
                                     float scale) = 0;
  virtual void build_routing(int32_t* offsets, int32_t* token, int32_t* pos, const int32_t* idx,
                             int N, int E, int K) = 0;
  virtual void dispatch_forward(float* xe, const float* x, const int32_t* token, int P, int C) = 0;
  virtual void dispatch_backward(float* dx, const float* dxe, const int32_t* pos, int N, int K,
                                 int C) = 0;
  virtual void combine_forward(float* out, const float* ye, const float* weights,
                               const int32_t* pos, int N, int K, int C) = 0;
  virtual void combine_backward(float* dye, float* dweights, const float* dout, const float* ye,
                                const float* weights, const int32_t* pos, int N, int K, int C) = 0;
  virtual void crossentropy_forward(float* losses, float* probs, const float* logits,
                                    const int32_t* targets, int N, int V) = 0;
  virtual void crossentropy_backward(float* dlogits, const float* dlosses, const float* probs,
                                     const int32_t* targets, int N, int V) = 0;
  // The aux loss's value is returned to the host: a synchronising op.
  virtual float aux_loss_forward(const float* scores, const int32_t* idx, int N, int E, int K) = 0;
  virtual void aux_loss_backward(float* dscores, float daux, const float* scores,
                                 const int32_t* idx, int N, int E, int K) = 0;
};

// The CPU backend: host memory and the functions of ops.h. One instance
// serves every thread (it holds no state).
ComputeBackend* CpuBackend();

}  // namespace muonps

#endif  // MUONPS_MODEL_BACKEND_H_
