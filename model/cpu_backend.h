// The CPU backend: host memory and the functions of model/ops.h, with
// nothing of its own (every method forwards). Derive from it to observe or
// change one part of the CPU path (tests do).
#ifndef MUONPS_MODEL_CPU_BACKEND_H_
#define MUONPS_MODEL_CPU_BACKEND_H_

#include <cstdlib>
#include <cstring>
#include <string>

#include "model/backend.h"
#include "model/ops.h"

namespace muonps {

class CpuComputeBackend : public ComputeBackend {
 public:
  std::string name() const override { return "cpu"; }
  void* Allocate(size_t bytes) override {
    if (bytes == 0) return nullptr;
    // 64-byte aligned, zero-filled.
    void* p = std::aligned_alloc(64, (bytes + 63) / 64 * 64);
    if (p != nullptr) std::memset(p, 0, bytes);
    return p;
  }
  void Free(void* p) override { std::free(p); }
  void Copy(void* dst, const void* src, size_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, bytes);
  }
  void Zero(float* x, int64_t n) override {
    if (n > 0) std::memset(x, 0, static_cast<size_t>(n) * sizeof(float));
  }
  void AddInPlace(float* a, const float* b, int64_t n) override {
    for (int64_t i = 0; i < n; ++i) a[i] += b[i];
  }

  void embedding_forward(float* out, const int32_t* inp, const float* wte, int N, int C) override {
    muonps::embedding_forward(out, inp, wte, N, C);
  }
  void embedding_backward(float* dwte, const float* dout, const int32_t* inp, int N,
                          int C) override {
    muonps::embedding_backward(dwte, dout, inp, N, C);
  }
  void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C,
                       float eps) override {
    muonps::rmsnorm_forward(out, rstd, inp, weight, N, C, eps);
  }
  void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                        const float* weight, const float* rstd, int N, int C) override {
    muonps::rmsnorm_backward(dinp, dweight, dout, inp, weight, rstd, N, C);
  }
  void matmul_forward(float* out, const float* inp, const float* weight, int N, int IC,
                      int OC) override {
    muonps::matmul_forward(out, inp, weight, N, IC, OC);
  }
  void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                       const float* weight, int N, int IC, int OC) override {
    muonps::matmul_backward(dinp, dweight, dout, inp, weight, N, IC, OC);
  }
  void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int B, int T,
                    int H, int D) override {
    muonps::rope_forward(out, inp, cos, sin, B, T, H, D);
  }
  void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int B,
                     int T, int H, int D) override {
    muonps::rope_backward(dinp, dout, cos, sin, B, T, H, D);
  }
  void attention_forward(float* out, float* att, const float* q, const float* k, const float* v,
                         int B, int T, int H, int Dk, int Dv, float* logit_max) override {
    muonps::attention_forward(out, att, q, k, v, B, T, H, Dk, Dv, logit_max);
  }
  void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                          const float* k, const float* v, const float* att, int B, int T, int H,
                          int Dk, int Dv) override {
    muonps::attention_backward(dq, dk, dv, dout, q, k, v, att, B, T, H, Dk, Dv);
  }
  void slice_forward(float* out, const float* inp, int64_t N, int ld, int off, int w) override {
    muonps::slice_forward(out, inp, N, ld, off, w);
  }
  void slice_backward(float* dinp, const float* dout, int64_t N, int ld, int off, int w) override {
    muonps::slice_backward(dinp, dout, N, ld, off, w);
  }
  void mla_heads_forward(float* q, float* k, float* v, const float* qp, const float* kv,
                         const float* kva, const float* cos, const float* sin, int B, int T, int H,
                         int dn, int dr, int dv, int r) override {
    muonps::mla_heads_forward(q, k, v, qp, kv, kva, cos, sin, B, T, H, dn, dr, dv, r);
  }
  void mla_heads_backward(float* dqp, float* dkv, float* dkva, const float* dq, const float* dk,
                          const float* dv, const float* cos, const float* sin, int B, int T, int H,
                          int dn, int dr, int dv_dim, int r) override {
    muonps::mla_heads_backward(dqp, dkv, dkva, dq, dk, dv, cos, sin, B, T, H, dn, dr, dv_dim, r);
  }
  void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int F) override {
    muonps::swiglu_forward(out, gate, up, N, F);
  }
  void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                       const float* up, int64_t N, int F) override {
    muonps::swiglu_backward(dgate, dup, dout, gate, up, N, F);
  }
  void router_score_forward(float* scores, const float* logits, int N, int E,
                            ScoringFunc func) override {
    muonps::router_score_forward(scores, logits, N, E, func);
  }
  void router_score_backward(float* dlogits, const float* dscores, const float* scores, int N,
                             int E, ScoringFunc func) override {
    muonps::router_score_backward(dlogits, dscores, scores, N, E, func);
  }
  void router_topk(int32_t* idx, const float* scores, const float* bias, int N, int E,
                   int K) override {
    muonps::router_topk(idx, scores, bias, N, E, K);
  }
  void topk_weights_forward(float* weights, const float* scores, const int32_t* idx, int N, int E,
                            int K, bool norm, float scale) override {
    muonps::topk_weights_forward(weights, scores, idx, N, E, K, norm, scale);
  }
  void topk_weights_backward(float* dscores, const float* dweights, const float* scores,
                             const int32_t* idx, int N, int E, int K, bool norm,
                             float scale) override {
    muonps::topk_weights_backward(dscores, dweights, scores, idx, N, E, K, norm, scale);
  }
  void build_routing(int32_t* offsets, int32_t* token, int32_t* pos, const int32_t* idx, int N,
                     int E, int K) override {
    muonps::build_routing(offsets, token, pos, idx, N, E, K);
  }
  void dispatch_forward(float* xe, const float* x, const int32_t* token, int P, int C) override {
    muonps::dispatch_forward(xe, x, token, P, C);
  }
  void dispatch_backward(float* dx, const float* dxe, const int32_t* pos, int N, int K,
                         int C) override {
    muonps::dispatch_backward(dx, dxe, pos, N, K, C);
  }
  void combine_forward(float* out, const float* ye, const float* weights, const int32_t* pos, int N,
                       int K, int C) override {
    muonps::combine_forward(out, ye, weights, pos, N, K, C);
  }
  void combine_backward(float* dye, float* dweights, const float* dout, const float* ye,
                        const float* weights, const int32_t* pos, int N, int K, int C) override {
    muonps::combine_backward(dye, dweights, dout, ye, weights, pos, N, K, C);
  }
  void crossentropy_forward(float* losses, float* probs, const float* logits,
                            const int32_t* targets, int N, int V) override {
    muonps::crossentropy_forward(losses, probs, logits, targets, N, V);
  }
  void crossentropy_backward(float* dlogits, const float* dlosses, const float* probs,
                             const int32_t* targets, int N, int V) override {
    muonps::crossentropy_backward(dlogits, dlosses, probs, targets, N, V);
  }
  float aux_loss_forward(const float* scores, const int32_t* idx, int N, int E, int K) override {
    return muonps::aux_loss_forward(scores, idx, N, E, K);
  }
  void aux_loss_backward(float* dscores, float daux, const float* scores, const int32_t* idx, int N,
                         int E, int K) override {
    muonps::aux_loss_backward(dscores, daux, scores, idx, N, E, K);
  }
};

}  // namespace muonps

#endif  // MUONPS_MODEL_CPU_BACKEND_H_
