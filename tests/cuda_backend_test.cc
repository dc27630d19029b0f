// The CUDA ComputeBackend (workers/cuda/cuda_backend.h) against the CPU
// backend, op by op on the same inputs with per-op tolerances, and every op
// of it repeated bit for bit on one device. The element-wise kernels and
// Newton-Schulz are also tested on their own (cuda_ops_test.cc).
//
// Without a GPU every test is skipped with the reason (built without CUDA,
// or what cudaGetDeviceCount said); scripts/device_check.sh runs them on a
// machine with one.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "common/philox.h"
#include "model/ops.h"

#if MUONPS_HAVE_CUDA
#include "model/backend.h"
#include "tests/cuda_test_util.h"
#include "workers/cuda/cuda_backend.h"
#endif

namespace muonps {
namespace {

#if MUONPS_HAVE_CUDA

using CudaBackendTest = CudaDeviceTest;

// ---- the CUDA backend against the CPU backend ----------------------------------------
//
// Each case runs a group of ComputeBackend ops on one backend, on inputs that
// depend only on their names, and returns what they wrote. Outputs that the
// ops accumulate into start from random values, so the tests also check
// that backward ops ADD.

// Integers in [0, range), a pure function of (tag, i).
std::vector<int32_t> RandomInts(int64_t n, int range, uint32_t tag) {
  std::vector<int32_t> x(static_cast<size_t>(n));
  for (int64_t i = 0; i < n; ++i) {
    x[i] = static_cast<int32_t>(RandomU64(3, tag, static_cast<uint32_t>(i), 0, 0) %
                                static_cast<uint64_t>(range));
  }
  return x;
}

// What one case wrote on one backend: float outputs with their tolerance
// against the CPU, and integer outputs, compared exactly.
struct CaseOutputs {
  struct Floats {
    std::string name;
    std::vector<float> values;
    double tol;
  };
  struct Ints {
    std::string name;
    std::vector<int32_t> values;
  };
  std::vector<Floats> floats;
  std::vector<Ints> ints;
};

// One backend's memory for a case: inputs copied in, outputs read back
// after Synchronize, everything freed with the arena.
class Arena {
 public:
  explicit Arena(ComputeBackend* backend) : backend_(backend) {}
  Arena(const Arena&) = delete;
  Arena& operator=(const Arena&) = delete;
  ~Arena() {
    for (void* p : owned_) backend_->Free(p);
  }

  template <typename T>
  T* In(const std::vector<T>& host) {
    const size_t bytes = host.size() * sizeof(T);
    T* p = static_cast<T*>(backend_->Allocate(bytes));
    EXPECT_NE(p, nullptr);
    owned_.push_back(p);
    backend_->Copy(p, host.data(), bytes);
    return p;
  }
  float* Out(int64_t n) { return In(Zeros(n)); }
  int32_t* OutInts(int64_t n) { return In(std::vector<int32_t>(static_cast<size_t>(n), 0)); }

  void Keep(CaseOutputs* out, const std::string& name, const float* p, int64_t n, double tol) {
    out->floats.push_back({name, Read(p, n), tol});
  }
  void KeepInts(CaseOutputs* out, const std::string& name, const int32_t* p, int64_t n) {
    out->ints.push_back({name, Read(p, n)});
  }

 private:
  template <typename T>
  std::vector<T> Read(const T* p, int64_t n) {
    backend_->Synchronize();
    std::vector<T> host(static_cast<size_t>(n));
    backend_->Copy(host.data(), p, host.size() * sizeof(T));
    return host;
  }

  ComputeBackend* backend_;
  std::vector<void*> owned_;
};

using OpCase = CaseOutputs (*)(ComputeBackend*);

CaseOutputs BufferOpsCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int64_t n = 1000;
  float* a = m.In(Random(n, "a"));
  const float* b = m.In(Random(n, "b"));
  float* z = m.In(Random(n, "z"));
  float* copy = m.Out(n);
  be->AddInPlace(a, b, n);
  be->Zero(z + 100, n / 2);
  be->Copy(copy, a, sizeof(float) * n);
  m.Keep(&r, "a", a, n, kElementwiseTol);
  m.Keep(&r, "z", z, n, kElementwiseTol);
  m.Keep(&r, "copy", copy, n, kElementwiseTol);
  return r;
}

CaseOutputs EmbeddingCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int N = 128, C = 64, V = 40;
  const int32_t* inp = m.In(RandomInts(N, V, 1));
  const float* wte = m.In(Random(V * C, "wte"));
  const float* dout = m.In(Random(N * C, "dout"));
  float* out = m.Out(N * C);
  float* dwte = m.In(Random(V * C, "dwte"));
  be->embedding_forward(out, inp, wte, N, C);
  be->embedding_backward(dwte, dout, inp, N, C);
  m.Keep(&r, "out", out, N * C, kElementwiseTol);
  m.Keep(&r, "dwte", dwte, V * C, kReductionTol);
  return r;
}

CaseOutputs RmsnormCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int N = 96, C = 128;
  const float* x = m.In(Random(N * C, "x"));
  const float* w = m.In(Random(C, "w"));
  const float* dy = m.In(Random(N * C, "dy"));
  float* out = m.Out(N * C);
  float* rstd = m.Out(N);
  float* dx = m.In(Random(N * C, "dx"));
  float* dw = m.In(Random(C, "dw"));
  be->rmsnorm_forward(out, rstd, x, w, N, C, 1e-6f);
  be->rmsnorm_backward(dx, dw, dy, x, w, rstd, N, C);
  m.Keep(&r, "out", out, N * C, kReductionTol);
  m.Keep(&r, "rstd", rstd, N, kReductionTol);
  m.Keep(&r, "dx", dx, N * C, kReductionTol);
  m.Keep(&r, "dw", dw, C, kReductionTol);
  return r;
}

CaseOutputs MatmulCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int N = 128, IC = 96, OC = 80;
  const float* x = m.In(Random(N * IC, "x"));
  const float* w = m.In(Random(OC * IC, "w"));
  const float* dy = m.In(Random(N * OC, "dy"));
  float* out = m.Out(N * OC);
  float* dx = m.In(Random(N * IC, "dx"));
  float* dw = m.In(Random(OC * IC, "dw"));
  float* dw_only = m.In(Random(OC * IC, "dw_only"));
  float* empty = m.In(Random(N * OC, "empty"));  // IC = 0: zero-filled
  be->matmul_forward(out, x, w, N, IC, OC);
  be->matmul_backward(dx, dw, dy, x, w, N, IC, OC);
  be->matmul_backward(nullptr, dw_only, dy, x, w, N, IC, OC);
  be->matmul_forward(empty, x, w, N, 0, OC);
  m.Keep(&r, "out", out, N * OC, kReductionTol);
  m.Keep(&r, "dx", dx, N * IC, kReductionTol);
  m.Keep(&r, "dw", dw, OC * IC, kReductionTol);
  m.Keep(&r, "dw_only", dw_only, OC * IC, kReductionTol);
  m.Keep(&r, "empty", empty, N * OC, kElementwiseTol);
  return r;
}

CaseOutputs RopeCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int B = 2, T = 16, H = 3, D = 16, n = B * T * H * D;
  std::vector<float> cos_host(T * D / 2), sin_host(T * D / 2);
  rope_tables(cos_host.data(), sin_host.data(), T, D, 10000.0);
  const float* cos = m.In(cos_host);
  const float* sin = m.In(sin_host);
  float* in_place = m.In(Random(n, "x"));
  const float* x = m.In(Random(n, "x"));
  const float* dy = m.In(Random(n, "dy"));
  float* out = m.Out(n);
  float* dx = m.In(Random(n, "dx"));
  be->rope_forward(in_place, in_place, cos, sin, B, T, H, D);
  be->rope_forward(out, x, cos, sin, B, T, H, D);
  be->rope_backward(dx, dy, cos, sin, B, T, H, D);
  m.Keep(&r, "in_place", in_place, n, kElementwiseTol);
  m.Keep(&r, "out", out, n, kElementwiseTol);
  m.Keep(&r, "dx", dx, n, kElementwiseTol);
  return r;
}

CaseOutputs AttentionCase(ComputeBackend* be, int B, int T, int H, int Dk, int Dv) {
  Arena m(be);
  CaseOutputs r;
  const int64_t nk = static_cast<int64_t>(B) * T * H * Dk,
                nv = static_cast<int64_t>(B) * T * H * Dv;
  const int64_t na = static_cast<int64_t>(B) * H * T * T;
  const float* q = m.In(Random(nk, "q"));
  const float* k = m.In(Random(nk, "k"));
  const float* v = m.In(Random(nv, "v"));
  const float* dout = m.In(Random(nv, "dout"));
  float* out = m.Out(nv);
  float* att = m.Out(na);
  float* logit_max = m.Out(B * H);
  float* out2 = m.Out(nv);
  float* att2 = m.Out(na);
  float* dq = m.In(Random(nk, "dq"));
  float* dk = m.In(Random(nk, "dk"));
  float* dv = m.In(Random(nv, "dv"));
  float* dv_only = m.In(Random(nv, "dv_only"));
  be->attention_forward(out, att, q, k, v, B, T, H, Dk, Dv, logit_max);
  be->attention_forward(out2, att2, q, k, v, B, T, H, Dk, Dv, nullptr);
  be->attention_backward(dq, dk, dv, dout, q, k, v, att, B, T, H, Dk, Dv);
  be->attention_backward(nullptr, nullptr, dv_only, dout, q, k, v, att, B, T, H, Dk, Dv);
  m.Keep(&r, "out", out, nv, kReductionTol);
  m.Keep(&r, "att", att, na, kReductionTol);
  m.Keep(&r, "logit_max", logit_max, B * H, kReductionTol);
  m.Keep(&r, "out2", out2, nv, kReductionTol);
  m.Keep(&r, "att2", att2, na, kReductionTol);
  m.Keep(&r, "dq", dq, nk, kReductionTol);
  m.Keep(&r, "dk", dk, nk, kReductionTol);
  m.Keep(&r, "dv", dv, nv, kReductionTol);
  m.Keep(&r, "dv_only", dv_only, nv, kReductionTol);
  return r;
}

CaseOutputs AttentionShortCase(ComputeBackend* be) { return AttentionCase(be, 2, 16, 2, 24, 16); }
// More keys than threads per query row, and more than one CPU block of 64.
CaseOutputs AttentionLongCase(ComputeBackend* be) { return AttentionCase(be, 1, 160, 2, 8, 8); }

CaseOutputs SliceCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int64_t N = 64;
  const int ld = 48, off = 8, w = 24;
  const float* x = m.In(Random(N * ld, "x"));
  const float* dy = m.In(Random(N * w, "dy"));
  float* out = m.Out(N * w);
  float* dx = m.In(Random(N * ld, "dx"));
  be->slice_forward(out, x, N, ld, off, w);
  be->slice_backward(dx, dy, N, ld, off, w);
  m.Keep(&r, "out", out, N * w, kElementwiseTol);
  m.Keep(&r, "dx", dx, N * ld, kElementwiseTol);
  return r;
}

CaseOutputs MlaHeadsCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int B = 2, T = 16, H = 3, dn = 16, dr = 8, dv = 12, rank = 32, N = B * T;
  const int dqk = dn + dr;
  std::vector<float> cos_host(T * dr / 2), sin_host(T * dr / 2);
  rope_tables(cos_host.data(), sin_host.data(), T, dr, 10000.0);
  const float* cos = m.In(cos_host);
  const float* sin = m.In(sin_host);
  const float* qp = m.In(Random(N * H * dqk, "qp"));
  const float* kv = m.In(Random(N * H * (dn + dv), "kv"));
  const float* kva = m.In(Random(N * (rank + dr), "kva"));
  const float* gq = m.In(Random(N * H * dqk, "gq"));
  const float* gk = m.In(Random(N * H * dqk, "gk"));
  const float* gv = m.In(Random(N * H * dv, "gv"));
  float* q = m.Out(N * H * dqk);
  float* k = m.Out(N * H * dqk);
  float* v = m.Out(N * H * dv);
  float* dqp = m.In(Random(N * H * dqk, "dqp"));
  float* dkv = m.In(Random(N * H * (dn + dv), "dkv"));
  float* dkva = m.In(Random(N * (rank + dr), "dkva"));
  be->mla_heads_forward(q, k, v, qp, kv, kva, cos, sin, B, T, H, dn, dr, dv, rank);
  be->mla_heads_backward(dqp, dkv, dkva, gq, gk, gv, cos, sin, B, T, H, dn, dr, dv, rank);
  m.Keep(&r, "q", q, N * H * dqk, kElementwiseTol);
  m.Keep(&r, "k", k, N * H * dqk, kElementwiseTol);
  m.Keep(&r, "v", v, N * H * dv, kElementwiseTol);
  m.Keep(&r, "dqp", dqp, N * H * dqk, kElementwiseTol);
  m.Keep(&r, "dkv", dkv, N * H * (dn + dv), kElementwiseTol);
  m.Keep(&r, "dkva", dkva, N * (rank + dr), kElementwiseTol);
  return r;
}

CaseOutputs SwigluCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int64_t N = 77;
  const int F = 40;
  const float* g = m.In(Random(N * F, "g", 3.0));
  const float* u = m.In(Random(N * F, "u"));
  const float* dy = m.In(Random(N * F, "dy"));
  float* out = m.Out(N * F);
  float* dg = m.In(Random(N * F, "dg"));
  float* du = m.In(Random(N * F, "du"));
  be->swiglu_forward(out, g, u, N, F);
  be->swiglu_backward(dg, du, dy, g, u, N, F);
  m.Keep(&r, "out", out, N * F, kElementwiseTol);
  m.Keep(&r, "dg", dg, N * F, kElementwiseTol);
  m.Keep(&r, "du", du, N * F, kElementwiseTol);
  return r;
}

CaseOutputs RouterScoreCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int N = 128, E = 8;
  const float* logits = m.In(Random(N * E, "logits", 2.0));
  const float* g = m.In(Random(N * E, "g"));
  for (ScoringFunc func : {ScoringFunc::kSigmoid, ScoringFunc::kSoftmax}) {
    const std::string tag = func == ScoringFunc::kSigmoid ? "sigmoid " : "softmax ";
    float* scores = m.Out(N * E);
    float* dlogits = m.In(Random(N * E, "dlogits"));
    be->router_score_forward(scores, logits, N, E, func);
    be->router_score_backward(dlogits, g, scores, N, E, func);
    m.Keep(&r, tag + "scores", scores, N * E, kElementwiseTol);
    m.Keep(&r, tag + "dlogits", dlogits, N * E, kReductionTol);
  }
  return r;
}

// Sigmoid scores; even rows rounded to multiples of 1/4, so they hold ties.
std::vector<float> RouterScores(int N, int E) {
  const std::vector<float> logits = Random(static_cast<int64_t>(N) * E, "router logits", 2.0);
  std::vector<float> scores(logits.size());
  router_score_forward(scores.data(), logits.data(), N, E, ScoringFunc::kSigmoid);
  for (int n = 0; n < N; n += 2) {
    for (int e = 0; e < E; ++e) scores[n * E + e] = std::round(scores[n * E + e] * 4.0f) / 4.0f;
  }
  return scores;
}

std::vector<int32_t> HostTopk(const std::vector<float>& scores, int N, int E, int K) {
  std::vector<int32_t> idx(static_cast<size_t>(N) * K);
  router_topk(idx.data(), scores.data(), nullptr, N, E, K);
  return idx;
}

CaseOutputs RouterTopkCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int N = 256, E = 8;
  const float* scores = m.In(RouterScores(N, E));
  std::vector<float> bias_host(E);
  for (int e = 0; e < E; ++e) bias_host[e] = 0.25f * static_cast<float>(e % 3 - 1);
  const float* bias = m.In(bias_host);
  for (int K : {1, 2, 3}) {
    int32_t* idx = m.OutInts(N * K);
    int32_t* idx_bias = m.OutInts(N * K);
    be->router_topk(idx, scores, nullptr, N, E, K);
    be->router_topk(idx_bias, scores, bias, N, E, K);
    m.KeepInts(&r, "K=" + std::to_string(K), idx, N * K);
    m.KeepInts(&r, "K=" + std::to_string(K) + " with bias", idx_bias, N * K);
  }
  return r;
}

CaseOutputs TopkWeightsCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int N = 128, E = 8, K = 2;
  const std::vector<float> scores_host = RouterScores(N, E);
  const float* scores = m.In(scores_host);
  const int32_t* idx = m.In(HostTopk(scores_host, N, E, K));
  const float* g = m.In(Random(N * K, "g"));
  for (bool norm : {false, true}) {
    const std::string tag = norm ? "norm " : "plain ";
    float* w = m.Out(N * K);
    float* ds = m.In(Random(N * E, "ds"));
    be->topk_weights_forward(w, scores, idx, N, E, K, norm, 2.5f);
    be->topk_weights_backward(ds, g, scores, idx, N, E, K, norm, 2.5f);
    m.Keep(&r, tag + "weights", w, N * K, kElementwiseTol);
    m.Keep(&r, tag + "dscores", ds, N * E, kReductionTol);
  }
  return r;
}

CaseOutputs BuildRoutingCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int N = 128, E = 8, K = 2, P = N * K;
  const std::vector<float> scores = RouterScores(N, E);
  const int32_t* idx = m.In(HostTopk(scores, N, E, K));
  const int32_t* repeated = m.In(RandomInts(P, E, 2));  // experts may repeat within a token
  for (const int32_t* choice : {idx, repeated}) {
    const std::string tag = choice == idx ? "topk " : "random ";
    int32_t* offsets = m.OutInts(E + 1);
    int32_t* token = m.OutInts(P);
    int32_t* pos = m.OutInts(P);
    be->build_routing(offsets, token, pos, choice, N, E, K);
    m.KeepInts(&r, tag + "offsets", offsets, E + 1);
    m.KeepInts(&r, tag + "token", token, P);
    m.KeepInts(&r, tag + "pos", pos, P);
  }
  return r;
}

CaseOutputs DispatchCombineCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int N = 128, E = 8, K = 2, C = 64, P = N * K;
  const std::vector<int32_t> idx = HostTopk(RouterScores(N, E), N, E, K);
  std::vector<int32_t> offsets_host(E + 1), token_host(P), pos_host(P);
  build_routing(offsets_host.data(), token_host.data(), pos_host.data(), idx.data(), N, E, K);
  const int32_t* token = m.In(token_host);
  const int32_t* pos = m.In(pos_host);
  const float* x = m.In(Random(N * C, "x"));
  const float* dxe = m.In(Random(P * C, "dxe"));
  const float* ye = m.In(Random(P * C, "ye"));
  const float* weights = m.In(Random(N * K, "weights"));
  const float* dout = m.In(Random(N * C, "dout"));
  float* xe = m.Out(P * C);
  float* dx = m.In(Random(N * C, "dx"));
  float* out = m.In(Random(N * C, "out"));
  float* dye = m.In(Random(P * C, "dye"));
  float* dweights = m.In(Random(N * K, "dweights"));
  be->dispatch_forward(xe, x, token, P, C);
  be->dispatch_backward(dx, dxe, pos, N, K, C);
  be->combine_forward(out, ye, weights, pos, N, K, C);
  be->combine_backward(dye, dweights, dout, ye, weights, pos, N, K, C);
  m.Keep(&r, "xe", xe, P * C, kElementwiseTol);
  m.Keep(&r, "dx", dx, N * C, kElementwiseTol);
  m.Keep(&r, "out", out, N * C, kElementwiseTol);
  m.Keep(&r, "dye", dye, P * C, kElementwiseTol);
  m.Keep(&r, "dweights", dweights, N * K, kReductionTol);
  return r;
}

CaseOutputs CrossentropyCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int N = 64, V = 500;
  const float* logits = m.In(Random(N * V, "logits", 2.0));
  const int32_t* targets = m.In(RandomInts(N, V, 3));
  const float* dlosses = m.In(Random(N, "dlosses"));
  float* losses = m.Out(N);
  float* probs = m.Out(N * V);
  float* dlogits = m.In(Random(N * V, "dlogits"));
  be->crossentropy_forward(losses, probs, logits, targets, N, V);
  be->crossentropy_backward(dlogits, dlosses, probs, targets, N, V);
  m.Keep(&r, "losses", losses, N, kReductionTol);
  m.Keep(&r, "probs", probs, N * V, kReductionTol);
  m.Keep(&r, "dlogits", dlogits, N * V, kReductionTol);
  return r;
}

CaseOutputs AuxLossCase(ComputeBackend* be) {
  Arena m(be);
  CaseOutputs r;
  const int N = 128, E = 8, K = 2;
  const std::vector<float> scores_host = RouterScores(N, E);
  const float* scores = m.In(scores_host);
  const int32_t* idx = m.In(HostTopk(scores_host, N, E, K));
  float* ds = m.In(Random(N * E, "ds"));
  const float aux = be->aux_loss_forward(scores, idx, N, E, K);
  be->aux_loss_backward(ds, 0.7f, scores, idx, N, E, K);
  r.floats.push_back({"aux", {aux}, kReductionTol});
  m.Keep(&r, "dscores", ds, N * E, kReductionTol);
  return r;
}

struct NamedCase {
  const char* name;
  OpCase run;
};

const NamedCase kBackendCases[] = {
    {"buffers", BufferOpsCase},
    {"embedding", EmbeddingCase},
    {"rmsnorm", RmsnormCase},
    {"matmul", MatmulCase},
    {"rope", RopeCase},
    {"attention T=16", AttentionShortCase},
    {"attention T=160", AttentionLongCase},
    {"slice", SliceCase},
    {"mla_heads", MlaHeadsCase},
    {"swiglu", SwigluCase},
    {"router_score", RouterScoreCase},
    {"router_topk", RouterTopkCase},
    {"topk_weights", TopkWeightsCase},
    {"build_routing", BuildRoutingCase},
    {"dispatch/combine", DispatchCombineCase},
    {"crossentropy", CrossentropyCase},
    {"aux_loss", AuxLossCase},
};

std::unique_ptr<ComputeBackend> CudaDevice0() {
  absl::StatusOr<std::unique_ptr<ComputeBackend>> gpu = cuda::CreateCudaBackend(0);
  EXPECT_TRUE(gpu.ok()) << gpu.status();
  return gpu.ok() ? *std::move(gpu) : nullptr;
}

// The case on the CPU backend and on the CUDA backend: every float output
// within its tolerance, every integer output equal.
void ExpectBackendsAgree(OpCase run) {
  std::unique_ptr<ComputeBackend> gpu = CudaDevice0();
  ASSERT_NE(gpu, nullptr);
  EXPECT_EQ(gpu->name(), "cuda:0");
  const CaseOutputs want = run(CpuBackend()), got = run(gpu.get());
  ASSERT_EQ(got.floats.size(), want.floats.size());
  ASSERT_EQ(got.ints.size(), want.ints.size());
  for (size_t i = 0; i < want.floats.size(); ++i) {
    SCOPED_TRACE(want.floats[i].name);
    ASSERT_EQ(got.floats[i].values.size(), want.floats[i].values.size());
    EXPECT_LE(RelMaxError(got.floats[i].values, want.floats[i].values), want.floats[i].tol);
  }
  for (size_t i = 0; i < want.ints.size(); ++i) {
    EXPECT_EQ(got.ints[i].values, want.ints[i].values) << want.ints[i].name;
  }
}

TEST_F(CudaBackendTest, BackendBufferOpsMatchTheCpu) { ExpectBackendsAgree(BufferOpsCase); }
TEST_F(CudaBackendTest, BackendEmbeddingMatchesTheCpu) { ExpectBackendsAgree(EmbeddingCase); }
TEST_F(CudaBackendTest, BackendRmsnormMatchesTheCpu) { ExpectBackendsAgree(RmsnormCase); }
TEST_F(CudaBackendTest, BackendMatmulMatchesTheCpu) { ExpectBackendsAgree(MatmulCase); }
TEST_F(CudaBackendTest, BackendRopeInPlaceAndOutOfPlaceMatchesTheCpu) {
  ExpectBackendsAgree(RopeCase);
}
TEST_F(CudaBackendTest, BackendAttentionMatchesTheCpu) {
  ExpectBackendsAgree(AttentionShortCase);
  ExpectBackendsAgree(AttentionLongCase);
}
TEST_F(CudaBackendTest, BackendSliceMatchesTheCpu) { ExpectBackendsAgree(SliceCase); }
TEST_F(CudaBackendTest, BackendMlaHeadsMatchTheCpu) { ExpectBackendsAgree(MlaHeadsCase); }
TEST_F(CudaBackendTest, BackendSwigluMatchesTheCpu) { ExpectBackendsAgree(SwigluCase); }
TEST_F(CudaBackendTest, BackendRouterScoresMatchTheCpu) { ExpectBackendsAgree(RouterScoreCase); }
TEST_F(CudaBackendTest, BackendRouterTopkEqualsTheCpuWithTies) {
  ExpectBackendsAgree(RouterTopkCase);
}
TEST_F(CudaBackendTest, BackendTopkWeightsMatchTheCpu) { ExpectBackendsAgree(TopkWeightsCase); }
TEST_F(CudaBackendTest, BackendBuildRoutingEqualsTheCpu) { ExpectBackendsAgree(BuildRoutingCase); }
TEST_F(CudaBackendTest, BackendDispatchAndCombineMatchTheCpu) {
  ExpectBackendsAgree(DispatchCombineCase);
}
TEST_F(CudaBackendTest, BackendCrossentropyMatchesTheCpu) { ExpectBackendsAgree(CrossentropyCase); }
TEST_F(CudaBackendTest, BackendAuxLossMatchesTheCpu) { ExpectBackendsAgree(AuxLossCase); }

TEST_F(CudaBackendTest, BackendOpsRepeatBitForBit) {
  std::unique_ptr<ComputeBackend> gpu = CudaDevice0();
  ASSERT_NE(gpu, nullptr);
  for (const NamedCase& c : kBackendCases) {
    SCOPED_TRACE(c.name);
    const CaseOutputs first = c.run(gpu.get()), second = c.run(gpu.get());
    ASSERT_EQ(first.floats.size(), second.floats.size());
    for (size_t i = 0; i < first.floats.size(); ++i) {
      const std::vector<float>& a = first.floats[i].values;
      const std::vector<float>& b = second.floats[i].values;
      ASSERT_EQ(a.size(), b.size());
      EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0)
          << first.floats[i].name << " changed bits";
    }
    ASSERT_EQ(first.ints.size(), second.ints.size());
    for (size_t i = 0; i < first.ints.size(); ++i) {
      EXPECT_EQ(first.ints[i].values, second.ints[i].values) << first.ints[i].name;
    }
  }
}

#else

TEST(CudaBackendTest, SkippedWithoutCuda) {
  GTEST_SKIP() << "built without CUDA (nvcc not found when configuring; MUONPS_CUDA=AUTO)";
}

#endif

}  // namespace
}  // namespace muonps
