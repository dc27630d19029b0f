// The decoder-only MoE transformer (DeepSeek-V3 / Moonlight family, standard
// multi-head attention or Multi-head Latent Attention): forward and backward
// of one slot, on the CPU or another compute backend.
//
// Size legend: B sequences, T positions, N = B*T tokens, C hidden, H heads,
// D = C/H, V vocab, E routed experts, K chosen per token, F expert width,
// SF = shared experts * F, I dense FFN width, P = N*K routed assignments.
// MLA: R kv_lora_rank, QR q_lora_rank, dn/dr/dv the per-head nope, rope and
// value widths; Dqk = dn + dr. Under MHA Dqk = Dv = D.
//
// Every op runs on a ComputeBackend (model/backend.h): the CPU by default,
// or a GPU, whose memory then holds the activations; the parameters, the
// gradients and nothing else the caller passes must then be the backend's
// memory too (ComputeBackend::Allocate), except the token ids, which are
// copied in.
//
// Thread safety: a MoeModel owns its activation buffers; use one per thread.
#ifndef MUONPS_MODEL_MOE_MODEL_H_
#define MUONPS_MODEL_MOE_MODEL_H_

#include <cstdint>
#include <functional>
#include <utility>
#include <vector>

#include "common/model_layout.h"
#include "model/backend.h"
#include "model/ops.h"
#include "muonps/v1/job.pb.h"

namespace muonps {

// What one slot reports besides its gradient.
struct SlotStats {
  double loss_sum = 0.0;  // sum of per-token cross-entropy (nats), aux excluded
  int64_t tokens = 0;     // tokens scored
  double aux_sum = 0.0;   // sum over MoE layers of the aux balance loss (0 unless aux_loss)
  // Per MoE layer (in layer order), tokens routed to each expert (E entries).
  std::vector<std::vector<int64_t>> expert_load;
  double forward_seconds = 0.0;   // wall time of the forward pass
  double backward_seconds = 0.0;  // wall time of the backward pass (0 for Forward)
  // Per layer, per head: the largest pre-softmax attention logit q.k/sqrt(Dqk)
  // over the slot's sequences (what QK-Clip bounds).
  std::vector<std::vector<float>> logit_max;
};

// A zero-filled array in a backend's memory, freed with the array.
template <typename T>
class BackendArray {
 public:
  BackendArray() = default;
  BackendArray(const BackendArray&) = delete;
  BackendArray& operator=(const BackendArray&) = delete;
  BackendArray(BackendArray&& other) noexcept { *this = std::move(other); }
  BackendArray& operator=(BackendArray&& other) noexcept {
    std::swap(backend_, other.backend_);
    std::swap(data_, other.data_);
    std::swap(size_, other.size_);
    return *this;
  }
  ~BackendArray() { Release(); }

  // n zero-filled elements (what was held is freed).
  void Assign(ComputeBackend* backend, int64_t n) {
    Release();
    backend_ = backend;
    size_ = n > 0 ? static_cast<size_t>(n) : 0;
    data_ = static_cast<T*>(backend->Allocate(size_ * sizeof(T)));
  }
  T* data() { return data_; }
  const T* data() const { return data_; }
  size_t size() const { return size_; }
  // Host access: only after the backend's Synchronize.
  T& operator[](size_t i) { return data_[i]; }
  const T& operator[](size_t i) const { return data_[i]; }

 private:
  void Release() {
    if (backend_ != nullptr && data_ != nullptr) backend_->Free(data_);
    data_ = nullptr;
    size_ = 0;
  }
  ComputeBackend* backend_ = nullptr;
  T* data_ = nullptr;
  size_t size_ = 0;
};

class MoeModel {
 public:
  // `config` must have its defaults filled and be valid (see common/job_spec.h).
  // `backend` must outlive the model.
  explicit MoeModel(const v1::ModelConfig& config, ComputeBackend* backend = CpuBackend());
  ComputeBackend* backend() const { return backend_; }

  const ModelLayout& layout() const { return layout_; }
  const v1::ModelConfig& config() const { return config_; }
  int seq_len() const { return T_; }

  // Called before the forward pass first reads the parameters of stage s:
  // 0 the embedding, 1 + l layer l, num_hidden_layers + 1 the final norm
  // and the head. A caller whose parameters are still streaming in blocks
  // there until that stage's tensors are in place.
  using StageWait = std::function<void(int stage)>;
  // Called by the backward pass once the gradients of stage s (numbered as
  // for StageWait) are final in `grads`, in backward order: the final norm
  // and head first, then each layer from the last, the embedding last. A
  // caller may then read (and send) that stage's gradients while the
  // backward pass goes on; it must not write them.
  using StageDone = std::function<void(int stage)>;

  // Loss only. params: the flat buffer of layout(); inputs/targets (B, T).
  SlotStats Forward(const float* params, const int32_t* inputs, const int32_t* targets, int B,
                    const StageWait* wait = nullptr);

  // Forward and backward; `grads` is final (host-readable) on return. ADDS
  // into `grads` (flat, same layout as params) the
  // gradient of  loss_scale * sum_tokens CE + aux_scale * sum_layers aux.
  // (aux only under balancing = "aux_loss".) Buffers get no gradient.
  SlotStats ForwardBackward(const float* params, const int32_t* inputs, const int32_t* targets,
                            int B, float loss_scale, float aux_scale, float* grads,
                            const StageWait* wait = nullptr, const StageDone* done = nullptr);

  // Indices (into layout().tensors()) of each MoE layer's e_score_correction_bias,
  // in layer order (the order of SlotStats::expert_load).
  const std::vector<int>& bias_tensors() const { return bias_tensors_; }

  // Bytes of the activations and backward scratch this model holds for the
  // batch size of its last Forward or ForwardBackward.
  int64_t ActivationBytes() const;

 private:
  struct LayerActs {
    BackendArray<float> res;        // (N, C) residual stream entering the layer
    BackendArray<float> a, rstd1;   // (N, C), (N)
    BackendArray<float> q, k, v;    // (N, H*Dqk) q, k after RoPE; (N, H*Dv) v
    BackendArray<float> att;        // (B, H, T, T)
    BackendArray<float> logit_max;  // (B*H)
    BackendArray<float> ao;         // (N, H*Dv) attention output before o_proj
    // MLA
    BackendArray<float> qa, qan, rstdq;       // (N, QR) q_a_proj out, normed; (N)
    BackendArray<float> qp;                   // (N, H*Dqk) query projection
    BackendArray<float> kva;                  // (N, R+dr) kv_a_proj_with_mqa out
    BackendArray<float> ckv_in, ckv, rstdkv;  // (N, R) latent, normed; (N)
    BackendArray<float> kvb;                  // (N, H*(dn+dv)) kv_b_proj out
    BackendArray<float> mid;                  // (N, C) residual after attention
    BackendArray<float> m, rstd2;             // (N, C), (N)
    // dense FFN
    BackendArray<float> g, u, act;  // (N, I)
    // MoE
    BackendArray<float> rlogits, scores;  // (N, E)
    BackendArray<int32_t> idx;            // (N, K)
    BackendArray<float> wts;              // (N, K)
    BackendArray<int32_t> offsets;        // (E+1)
    BackendArray<int32_t> token, pos;     // (P), (N*K)
    BackendArray<float> xe;               // (P, C)
    BackendArray<float> ge, ue, acte;     // (P, F)
    BackendArray<float> ye;               // (P, C)
    BackendArray<float> gs, us, acts;     // (N, SF)
  };
  // Offsets (floats) of one layer's tensors in the flat buffer; -1 = absent.
  struct LayerOffsets {
    int64_t in_norm, q, k, v, o, post_norm;    // q = q_proj (MHA, or MLA without QR)
    int64_t qa = -1, qa_norm = -1, qb = -1;    // MLA query compression
    int64_t kva = -1, kv_norm = -1, kvb = -1;  // MLA key/value compression
    int64_t gate = -1, up = -1, down = -1;     // dense FFN
    int64_t router = -1, bias = -1;            // MoE router (E, C), bias (E)
    std::vector<int64_t> eg, eu, ed;           // per expert gate/up (F, C), down (C, F)
    int64_t sg = -1, su = -1, sd = -1;         // shared experts
  };

  void Resize(int B);
  template <typename T>
  void Size(BackendArray<T>& v, int64_t n) {
    v.Assign(backend_, n);
  }
  SlotStats RunForward(const float* params, const int32_t* inputs, const int32_t* targets,
                       const StageWait* wait);
  void RunBackward(const float* params, const int32_t* inputs, const int32_t* targets,
                   float loss_scale, float aux_scale, float* grads, const StageDone* done);

  v1::ModelConfig config_;
  ModelLayout layout_;
  ComputeBackend* backend_;
  int C_, H_, D_, T_, V_, L_, E_, K_, F_, SF_, I_, dense_layers_;
  bool mla_;
  int QR_ = 0, R_ = 0, dn_ = 0, dr_ = 0, dv_dim_ = 0;  // MLA widths
  int Dqk_, Dv_;                                       // per-head q/k and v widths
  float eps_;
  ScoringFunc scoring_;
  bool aux_free_, aux_loss_;
  std::vector<int> bias_tensors_;
  std::vector<LayerOffsets> offsets_;
  int64_t embed_off_, norm_off_, head_off_;
  BackendArray<float> rope_cos_, rope_sin_;  // (T, D/2), or (T, dr/2) under MLA

  int B_ = 0, N_ = 0;
  BackendArray<int32_t> tokens_, targets_;  // (N): the slot's token ids, copied in
  std::vector<LayerActs> acts_;
  BackendArray<float> final_res_, final_x_, final_rstd_;  // (N, C), (N, C), (N)
  BackendArray<float> logits_, probs_, losses_;           // (N, V), (N, V), (N)
  // backward scratch
  BackendArray<float> dres_, dbuf_a_, dbuf_b_, dq_, dk_, dv_, dqk_, dlogits_, dx_;
  BackendArray<float> dI1_, dI2_, dI3_, drl_, dsc_, dwts_, dxe_, dge_, due_, dacte_, dye_;
  BackendArray<float> dqp_, dkvb_, dkva_, dckv_, dckv_in_, dqan_, dqa_;  // MLA
};

}  // namespace muonps

#endif  // MUONPS_MODEL_MOE_MODEL_H_
