#include "model/moe_model.h"

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace muonps {
MoeModel::MoeModel(const v1::ModelConfig& config, ComputeBackend* backend)
    : config_(config), layout_(config), backend_(backend) {
  C_ = config.hidden_size();
  H_ = config.num_attention_heads();
  D_ = C_ / H_;
  T_ = config.max_position_embeddings();
  V_ = config.vocab_size();
  L_ = config.num_hidden_layers();
  E_ = config.n_routed_experts();
  K_ = config.num_experts_per_tok();
  F_ = config.moe_intermediate_size();
  SF_ = config.n_shared_experts() * F_;
  I_ = config.intermediate_size();
  dense_layers_ = config.first_k_dense_replace();
  eps_ = static_cast<float>(config.rms_norm_eps());
  scoring_ = config.scoring_func() == "softmax" ? ScoringFunc::kSoftmax : ScoringFunc::kSigmoid;
  aux_free_ = config.balancing() == "aux_free_bias";
  aux_loss_ = config.balancing() == "aux_loss";
  mla_ = config.attention() == "mla";
  Dqk_ = Dv_ = D_;
  if (mla_) {
    QR_ = config.q_lora_rank();
    R_ = config.kv_lora_rank();
    dn_ = config.qk_nope_head_dim();
    dr_ = config.qk_rope_head_dim();
    dv_dim_ = config.v_head_dim();
    Dqk_ = dn_ + dr_;
    Dv_ = dv_dim_;
  }

  auto off = [&](const std::string& name) -> int64_t {
    const TensorInfo* t = layout_.Find(name);
    return t ? t->offset : -1;
  };
  embed_off_ = off("model.embed_tokens.weight");
  norm_off_ = off("model.norm.weight");
  head_off_ = off("lm_head.weight");
  for (int l = 0; l < L_; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    LayerOffsets o;
    o.in_norm = off(p + "input_layernorm.weight");
    o.q = off(p + "self_attn.q_proj.weight");
    o.qa = off(p + "self_attn.q_a_proj.weight");
    o.qa_norm = off(p + "self_attn.q_a_layernorm.weight");
    o.qb = off(p + "self_attn.q_b_proj.weight");
    o.kva = off(p + "self_attn.kv_a_proj_with_mqa.weight");
    o.kv_norm = off(p + "self_attn.kv_a_layernorm.weight");
    o.kvb = off(p + "self_attn.kv_b_proj.weight");
    o.k = off(p + "self_attn.k_proj.weight");
    o.v = off(p + "self_attn.v_proj.weight");
    o.o = off(p + "self_attn.o_proj.weight");
    o.post_norm = off(p + "post_attention_layernorm.weight");
    if (l < dense_layers_) {
      o.gate = off(p + "mlp.gate_proj.weight");
      o.up = off(p + "mlp.up_proj.weight");
      o.down = off(p + "mlp.down_proj.weight");
    } else {
      o.router = off(p + "mlp.gate.weight");
      o.bias = off(p + "mlp.gate.e_score_correction_bias");
      bias_tensors_.push_back(layout_.Index(p + "mlp.gate.e_score_correction_bias"));
      for (int e = 0; e < E_; ++e) {
        const std::string ep = absl::StrCat(p, "mlp.experts.", e, ".");
        o.eg.push_back(off(ep + "gate_proj.weight"));
        o.eu.push_back(off(ep + "up_proj.weight"));
        o.ed.push_back(off(ep + "down_proj.weight"));
      }
      if (SF_ > 0) {
        o.sg = off(p + "mlp.shared_experts.gate_proj.weight");
        o.su = off(p + "mlp.shared_experts.up_proj.weight");
        o.sd = off(p + "mlp.shared_experts.down_proj.weight");
      }
    }
    offsets_.push_back(std::move(o));
  }
  const int rope_dim = mla_ ? dr_ : D_;
  Size(rope_cos_, static_cast<int64_t>(T_) * (rope_dim / 2));
  Size(rope_sin_, static_cast<int64_t>(T_) * (rope_dim / 2));
  rope_tables(rope_cos_.data(), rope_sin_.data(), T_, rope_dim, config.rope_theta());
}

void MoeModel::Resize(int B) {
  if (B == B_) return;
  B_ = B;
  N_ = B * T_;
  const int64_t N = N_, C = C_, P = N * K_;
  const int64_t AQ = static_cast<int64_t>(H_) * Dqk_, AV = static_cast<int64_t>(H_) * Dv_;
  const int64_t KVB = static_cast<int64_t>(H_) * (dn_ + dv_dim_), KVA = R_ + dr_;
  acts_.clear();
  acts_.resize(static_cast<size_t>(L_));
  Size(tokens_, N);
  Size(targets_, N);
  for (int l = 0; l < L_; ++l) {
    LayerActs& a = acts_[l];
    Size(a.res, N * C);
    Size(a.a, N * C);
    Size(a.rstd1, N);
    Size(a.q, N * AQ);
    Size(a.k, N * AQ);
    Size(a.v, N * AV);
    Size(a.att, static_cast<int64_t>(B) * H_ * T_ * T_);
    Size(a.logit_max, static_cast<int64_t>(B) * H_);
    Size(a.ao, N * AV);
    if (mla_) {
      if (QR_ > 0) {
        Size(a.qa, N * QR_);
        Size(a.qan, N * QR_);
        Size(a.rstdq, N);
      }
      Size(a.qp, N * AQ);
      Size(a.kva, N * KVA);
      Size(a.ckv_in, N * R_);
      Size(a.ckv, N * R_);
      Size(a.rstdkv, N);
      Size(a.kvb, N * KVB);
    }
    Size(a.mid, N * C);
    Size(a.m, N * C);
    Size(a.rstd2, N);
    if (l < dense_layers_) {
      Size(a.g, N * I_);
      Size(a.u, N * I_);
      Size(a.act, N * I_);
    } else {
      Size(a.rlogits, N * E_);
      Size(a.scores, N * E_);
      Size(a.idx, N * K_);
      Size(a.wts, N * K_);
      Size(a.offsets, E_ + 1);
      Size(a.token, P);
      Size(a.pos, P);
      Size(a.xe, P * C);
      Size(a.ge, P * F_);
      Size(a.ue, P * F_);
      Size(a.acte, P * F_);
      Size(a.ye, P * C);
      Size(a.gs, N * SF_);
      Size(a.us, N * SF_);
      Size(a.acts, N * SF_);
    }
  }
  Size(final_res_, N * C);
  Size(final_x_, N * C);
  Size(final_rstd_, N);
  Size(logits_, N * V_);
  Size(probs_, N * V_);
  Size(losses_, N);
  const int64_t wide = std::max<int64_t>({I_, SF_, 1});
  Size(dres_, N * C);
  Size(dbuf_a_, N * C);
  Size(dbuf_b_, N * std::max(C, AV));
  Size(dq_, N * AQ);
  Size(dk_, N * AQ);
  Size(dv_, N * AV);
  if (mla_) {
    Size(dqp_, N * AQ);
    Size(dkvb_, N * KVB);
    Size(dkva_, N * KVA);
    Size(dckv_, N * R_);
    Size(dckv_in_, N * R_);
    Size(dqan_, N * QR_);
    Size(dqa_, N * QR_);
  }
  Size(dqk_, N * C);
  Size(dlogits_, N * V_);
  Size(dx_, N * C);
  Size(dI1_, N * wide);
  Size(dI2_, N * wide);
  Size(dI3_, N * wide);
  Size(drl_, N * E_);
  Size(dsc_, N * E_);
  Size(dwts_, N * K_);
  Size(dxe_, P * C);
  Size(dge_, P * F_);
  Size(due_, P * F_);
  Size(dacte_, P * F_);
  Size(dye_, P * C);
}

int64_t MoeModel::ActivationBytes() const {
  int64_t bytes = 0;
  auto add = [&bytes](const auto&... vectors) {
    ((bytes += static_cast<int64_t>(vectors.size() * sizeof(vectors[0]))), ...);
  };
  for (const LayerActs& a : acts_) {
    add(a.res, a.a, a.rstd1, a.q, a.k, a.v, a.att, a.logit_max, a.ao, a.qa, a.qan, a.rstdq, a.qp,
        a.kva, a.ckv_in, a.ckv, a.rstdkv, a.kvb, a.mid, a.m, a.rstd2, a.g, a.u, a.act, a.rlogits,
        a.scores, a.idx, a.wts, a.offsets, a.token, a.pos, a.xe, a.ge, a.ue, a.acte, a.ye, a.gs,
        a.us, a.acts);
  }
  add(final_res_, final_x_, final_rstd_, logits_, probs_, losses_, dres_, dbuf_a_, dbuf_b_, dq_,
      dk_, dv_, dqk_, dlogits_, dx_, dI1_, dI2_, dI3_, drl_, dsc_, dwts_, dxe_, dge_, due_, dacte_,
      dye_, dqp_, dkvb_, dkva_, dckv_, dckv_in_, dqan_, dqa_);
  return bytes;
}

SlotStats MoeModel::Forward(const float* params, const int32_t* inputs, const int32_t* targets,
                            int B, const StageWait* wait) {
  Resize(B);
  return RunForward(params, inputs, targets, wait);
}

SlotStats MoeModel::ForwardBackward(const float* params, const int32_t* inputs,
                                    const int32_t* targets, int B, float loss_scale,
                                    float aux_scale, float* grads, const StageWait* wait,
                                    const StageDone* done) {
  using Clock = std::chrono::steady_clock;
  Resize(B);
  const auto t0 = Clock::now();
  SlotStats stats = RunForward(params, inputs, targets, wait);
  const auto t1 = Clock::now();
  RunBackward(params, inputs, targets, loss_scale, aux_scale, grads, done);
  stats.forward_seconds = std::chrono::duration<double>(t1 - t0).count();
  stats.backward_seconds = std::chrono::duration<double>(Clock::now() - t1).count();
  return stats;
}

SlotStats MoeModel::RunForward(const float* params, const int32_t* inputs, const int32_t* targets,
                               const StageWait* wait) {
  const int B = B_, N = N_, C = C_, T = T_, H = H_, D = D_, E = E_, K = K_, F = F_;
  const int P = N * K;
  ComputeBackend& ops = *backend_;
  SlotStats stats;
  stats.tokens = N;
  ops.Copy(tokens_.data(), inputs, sizeof(int32_t) * N);
  if (targets != nullptr) ops.Copy(targets_.data(), targets, sizeof(int32_t) * N);

  if (wait != nullptr) (*wait)(0);
  ops.embedding_forward(acts_[0].res.data(), tokens_.data(), params + embed_off_, N, C);
  for (int l = 0; l < L_; ++l) {
    if (wait != nullptr) (*wait)(l + 1);
    LayerActs& a = acts_[l];
    const LayerOffsets& o = offsets_[l];
    float* h_out = l + 1 < L_ ? acts_[l + 1].res.data() : final_res_.data();

    // Attention block.
    ops.rmsnorm_forward(a.a.data(), a.rstd1.data(), a.res.data(), params + o.in_norm, N, C, eps_);
    if (mla_) {
      const int AQ = H * Dqk_, KVA = R_ + dr_;
      if (QR_ > 0) {
        ops.matmul_forward(a.qa.data(), a.a.data(), params + o.qa, N, C, QR_);
        ops.rmsnorm_forward(a.qan.data(), a.rstdq.data(), a.qa.data(), params + o.qa_norm, N, QR_,
                            eps_);
        ops.matmul_forward(a.qp.data(), a.qan.data(), params + o.qb, N, QR_, AQ);
      } else {
        ops.matmul_forward(a.qp.data(), a.a.data(), params + o.q, N, C, AQ);
      }
      ops.matmul_forward(a.kva.data(), a.a.data(), params + o.kva, N, C, KVA);
      ops.slice_forward(a.ckv_in.data(), a.kva.data(), N, KVA, 0, R_);
      ops.rmsnorm_forward(a.ckv.data(), a.rstdkv.data(), a.ckv_in.data(), params + o.kv_norm, N, R_,
                          eps_);
      ops.matmul_forward(a.kvb.data(), a.ckv.data(), params + o.kvb, N, R_, H * (dn_ + dv_dim_));
      ops.mla_heads_forward(a.q.data(), a.k.data(), a.v.data(), a.qp.data(), a.kvb.data(),
                            a.kva.data(), rope_cos_.data(), rope_sin_.data(), B, T, H, dn_, dr_,
                            dv_dim_, R_);
    } else {
      ops.matmul_forward(a.q.data(), a.a.data(), params + o.q, N, C, C);
      ops.matmul_forward(a.k.data(), a.a.data(), params + o.k, N, C, C);
      ops.matmul_forward(a.v.data(), a.a.data(), params + o.v, N, C, C);
      ops.rope_forward(a.q.data(), a.q.data(), rope_cos_.data(), rope_sin_.data(), B, T, H, D);
      ops.rope_forward(a.k.data(), a.k.data(), rope_cos_.data(), rope_sin_.data(), B, T, H, D);
    }
    ops.attention_forward(a.ao.data(), a.att.data(), a.q.data(), a.k.data(), a.v.data(), B, T, H,
                          Dqk_, Dv_, a.logit_max.data());
    ops.matmul_forward(a.mid.data(), a.ao.data(), params + o.o, N, H * Dv_, C);
    ops.AddInPlace(a.mid.data(), a.res.data(), static_cast<int64_t>(N) * C);  // mid = h + attn

    // FFN block: h_out = mid + y.
    ops.rmsnorm_forward(a.m.data(), a.rstd2.data(), a.mid.data(), params + o.post_norm, N, C, eps_);
    float* y = h_out;
    if (l < dense_layers_) {
      ops.matmul_forward(a.g.data(), a.m.data(), params + o.gate, N, C, I_);
      ops.matmul_forward(a.u.data(), a.m.data(), params + o.up, N, C, I_);
      ops.swiglu_forward(a.act.data(), a.g.data(), a.u.data(), N, I_);
      ops.matmul_forward(y, a.act.data(), params + o.down, N, I_, C);
    } else {
      ops.matmul_forward(a.rlogits.data(), a.m.data(), params + o.router, N, C, E);
      ops.router_score_forward(a.scores.data(), a.rlogits.data(), N, E, scoring_);
      ops.router_topk(a.idx.data(), a.scores.data(), aux_free_ ? params + o.bias : nullptr, N, E,
                      K);
      ops.topk_weights_forward(a.wts.data(), a.scores.data(), a.idx.data(), N, E, K,
                               config_.norm_topk_prob(),
                               static_cast<float>(config_.routed_scaling_factor()));
      ops.build_routing(a.offsets.data(), a.token.data(), a.pos.data(), a.idx.data(), N, E, K);
      ops.Synchronize();  // the host reads the experts' row ranges
      ops.dispatch_forward(a.xe.data(), a.m.data(), a.token.data(), P, C);
      std::vector<int64_t> load(E);
      for (int e = 0; e < E; ++e) {
        const int begin = a.offsets[e], rows = a.offsets[e + 1] - begin;
        load[e] = rows;
        if (rows == 0) continue;
        const int64_t rc = static_cast<int64_t>(begin) * C, rf = static_cast<int64_t>(begin) * F;
        ops.matmul_forward(a.ge.data() + rf, a.xe.data() + rc, params + o.eg[e], rows, C, F);
        ops.matmul_forward(a.ue.data() + rf, a.xe.data() + rc, params + o.eu[e], rows, C, F);
        ops.swiglu_forward(a.acte.data() + rf, a.ge.data() + rf, a.ue.data() + rf, rows, F);
        ops.matmul_forward(a.ye.data() + rc, a.acte.data() + rf, params + o.ed[e], rows, F, C);
      }
      stats.expert_load.push_back(std::move(load));
      ops.Zero(y, static_cast<int64_t>(N) * C);
      ops.combine_forward(y, a.ye.data(), a.wts.data(), a.pos.data(), N, K, C);
      if (SF_ > 0) {
        ops.matmul_forward(a.gs.data(), a.m.data(), params + o.sg, N, C, SF_);
        ops.matmul_forward(a.us.data(), a.m.data(), params + o.su, N, C, SF_);
        ops.swiglu_forward(a.acts.data(), a.gs.data(), a.us.data(), N, SF_);
        ops.matmul_forward(dx_.data(), a.acts.data(), params + o.sd, N, SF_, C);
        ops.AddInPlace(y, dx_.data(), static_cast<int64_t>(N) * C);
      }
      if (aux_loss_) stats.aux_sum += ops.aux_loss_forward(a.scores.data(), a.idx.data(), N, E, K);
    }
    ops.AddInPlace(h_out, a.mid.data(), static_cast<int64_t>(N) * C);  // h_out = y + mid
  }

  if (wait != nullptr) (*wait)(L_ + 1);
  ops.rmsnorm_forward(final_x_.data(), final_rstd_.data(), final_res_.data(), params + norm_off_, N,
                      C, eps_);
  ops.matmul_forward(logits_.data(), final_x_.data(), params + head_off_, N, C, V_);
  ops.crossentropy_forward(losses_.data(), probs_.data(), logits_.data(), targets_.data(), N, V_);
  ops.Synchronize();
  for (int n = 0; n < N; ++n) stats.loss_sum += losses_[n];
  // Each head's largest logit over the slot's sequences.
  for (int l = 0; l < L_; ++l) {
    std::vector<float> head_max(static_cast<size_t>(H), -INFINITY);
    for (int b = 0; b < B; ++b) {
      for (int h = 0; h < H; ++h) {
        head_max[h] = std::max(head_max[h], acts_[l].logit_max[b * H + h]);
      }
    }
    stats.logit_max.push_back(std::move(head_max));
  }
  return stats;
}

void MoeModel::RunBackward(const float* params, const int32_t* inputs, const int32_t* targets,
                           float loss_scale, float aux_scale, float* grads, const StageDone* done) {
  ComputeBackend& ops = *backend_;
  // A stage's gradients are final once the ops writing them have run.
  const auto stage_done = [done, &ops](int stage) {
    if (done == nullptr) return;
    ops.Synchronize();
    (*done)(stage);
  };
  const auto zero = [&ops](BackendArray<float>& b) {
    ops.Zero(b.data(), static_cast<int64_t>(b.size()));
  };
  const int B = B_, N = N_, C = C_, T = T_, H = H_, D = D_, E = E_, K = K_, F = F_;
  const int64_t NC = static_cast<int64_t>(N) * C;

  // Loss and head.
  ops.Synchronize();
  std::fill(losses_.data(), losses_.data() + losses_.size(), loss_scale);  // reused as dlosses
  zero(dlogits_);
  ops.crossentropy_backward(dlogits_.data(), losses_.data(), probs_.data(), targets_.data(), N, V_);
  zero(dx_);
  ops.matmul_backward(dx_.data(), grads + head_off_, dlogits_.data(), final_x_.data(),
                      params + head_off_, N, C, V_);
  zero(dres_);
  ops.rmsnorm_backward(dres_.data(), grads + norm_off_, dx_.data(), final_res_.data(),
                       params + norm_off_, final_rstd_.data(), N, C);
  stage_done(L_ + 1);

  // dres_ holds dL/d(h_out) of the layer being processed.
  for (int l = L_ - 1; l >= 0; --l) {
    LayerActs& a = acts_[l];
    const LayerOffsets& o = offsets_[l];
    const float* dy = dres_.data();  // h_out = mid + y
    float* dm = dbuf_a_.data();
    ops.Zero(dm, NC);
    if (l < dense_layers_) {
      const int64_t NI = static_cast<int64_t>(N) * I_;
      ops.Zero(dI1_.data(), NI);
      ops.Zero(dI2_.data(), NI);
      ops.Zero(dI3_.data(), NI);
      ops.matmul_backward(dI1_.data(), grads + o.down, dy, a.act.data(), params + o.down, N, I_, C);
      ops.swiglu_backward(dI2_.data(), dI3_.data(), dI1_.data(), a.g.data(), a.u.data(), N, I_);
      ops.matmul_backward(dm, grads + o.gate, dI2_.data(), a.m.data(), params + o.gate, N, C, I_);
      ops.matmul_backward(dm, grads + o.up, dI3_.data(), a.m.data(), params + o.up, N, C, I_);
    } else {
      const int P = N * K;
      // Routed experts.
      ops.Zero(dye_.data(), static_cast<int64_t>(P) * C);
      zero(dwts_);
      ops.combine_backward(dye_.data(), dwts_.data(), dy, a.ye.data(), a.wts.data(), a.pos.data(),
                           N, K, C);
      ops.Zero(dxe_.data(), static_cast<int64_t>(P) * C);
      zero(dacte_);
      zero(dge_);
      zero(due_);
      for (int e = 0; e < E; ++e) {
        const int begin = a.offsets[e], rows = a.offsets[e + 1] - begin;
        if (rows == 0) continue;
        const int64_t rc = static_cast<int64_t>(begin) * C, rf = static_cast<int64_t>(begin) * F;
        ops.matmul_backward(dacte_.data() + rf, grads + o.ed[e], dye_.data() + rc,
                            a.acte.data() + rf, params + o.ed[e], rows, F, C);
        ops.swiglu_backward(dge_.data() + rf, due_.data() + rf, dacte_.data() + rf,
                            a.ge.data() + rf, a.ue.data() + rf, rows, F);
        ops.matmul_backward(dxe_.data() + rc, grads + o.eg[e], dge_.data() + rf, a.xe.data() + rc,
                            params + o.eg[e], rows, C, F);
        ops.matmul_backward(dxe_.data() + rc, grads + o.eu[e], due_.data() + rf, a.xe.data() + rc,
                            params + o.eu[e], rows, C, F);
      }
      ops.dispatch_backward(dm, dxe_.data(), a.pos.data(), N, K, C);
      // Shared experts.
      if (SF_ > 0) {
        const int64_t NS = static_cast<int64_t>(N) * SF_;
        ops.Zero(dI1_.data(), NS);
        ops.Zero(dI2_.data(), NS);
        ops.Zero(dI3_.data(), NS);
        ops.matmul_backward(dI1_.data(), grads + o.sd, dy, a.acts.data(), params + o.sd, N, SF_, C);
        ops.swiglu_backward(dI2_.data(), dI3_.data(), dI1_.data(), a.gs.data(), a.us.data(), N,
                            SF_);
        ops.matmul_backward(dm, grads + o.sg, dI2_.data(), a.m.data(), params + o.sg, N, C, SF_);
        ops.matmul_backward(dm, grads + o.su, dI3_.data(), a.m.data(), params + o.su, N, C, SF_);
      }
      // Router: the weights carry gradient into the scores, the choice does not.
      zero(dsc_);
      ops.topk_weights_backward(dsc_.data(), dwts_.data(), a.scores.data(), a.idx.data(), N, E, K,
                                config_.norm_topk_prob(),
                                static_cast<float>(config_.routed_scaling_factor()));
      if (aux_loss_) {
        ops.aux_loss_backward(dsc_.data(), aux_scale, a.scores.data(), a.idx.data(), N, E, K);
      }
      zero(drl_);
      ops.router_score_backward(drl_.data(), dsc_.data(), a.scores.data(), N, E, scoring_);
      ops.matmul_backward(dm, grads + o.router, drl_.data(), a.m.data(), params + o.router, N, C,
                          E);
    }
    // mid feeds both the residual (dres_ already holds that part) and the norm.
    ops.rmsnorm_backward(dres_.data(), grads + o.post_norm, dm, a.mid.data(), params + o.post_norm,
                         a.rstd2.data(), N, C);

    // Attention block: mid = res + ao·Wo^T.
    const int AV = H * Dv_;
    float* dao = dbuf_b_.data();
    ops.Zero(dao, static_cast<int64_t>(N) * AV);
    ops.matmul_backward(dao, grads + o.o, dres_.data(), a.ao.data(), params + o.o, N, AV, C);
    zero(dq_);
    zero(dk_);
    zero(dv_);
    ops.attention_backward(dq_.data(), dk_.data(), dv_.data(), dao, a.q.data(), a.k.data(),
                           a.v.data(), a.att.data(), B, T, H, Dqk_, Dv_);
    float* da = dbuf_a_.data();
    ops.Zero(da, NC);
    if (mla_) {
      const int AQ = H * Dqk_, KVA = R_ + dr_, KVB = H * (dn_ + dv_dim_);
      zero(dqp_);
      zero(dkvb_);
      zero(dkva_);
      ops.mla_heads_backward(dqp_.data(), dkvb_.data(), dkva_.data(), dq_.data(), dk_.data(),
                             dv_.data(), rope_cos_.data(), rope_sin_.data(), B, T, H, dn_, dr_,
                             dv_dim_, R_);
      zero(dckv_);
      ops.matmul_backward(dckv_.data(), grads + o.kvb, dkvb_.data(), a.ckv.data(), params + o.kvb,
                          N, R_, KVB);
      zero(dckv_in_);
      ops.rmsnorm_backward(dckv_in_.data(), grads + o.kv_norm, dckv_.data(), a.ckv_in.data(),
                           params + o.kv_norm, a.rstdkv.data(), N, R_);
      ops.slice_backward(dkva_.data(), dckv_in_.data(), N, KVA, 0, R_);
      ops.matmul_backward(da, grads + o.kva, dkva_.data(), a.a.data(), params + o.kva, N, C, KVA);
      if (QR_ > 0) {
        zero(dqan_);
        ops.matmul_backward(dqan_.data(), grads + o.qb, dqp_.data(), a.qan.data(), params + o.qb, N,
                            QR_, AQ);
        zero(dqa_);
        ops.rmsnorm_backward(dqa_.data(), grads + o.qa_norm, dqan_.data(), a.qa.data(),
                             params + o.qa_norm, a.rstdq.data(), N, QR_);
        ops.matmul_backward(da, grads + o.qa, dqa_.data(), a.a.data(), params + o.qa, N, C, QR_);
      } else {
        ops.matmul_backward(da, grads + o.q, dqp_.data(), a.a.data(), params + o.q, N, C, AQ);
      }
      ops.rmsnorm_backward(dres_.data(), grads + o.in_norm, da, a.res.data(), params + o.in_norm,
                           a.rstd1.data(), N, C);
      stage_done(l + 1);
      continue;
    }
    zero(dqk_);
    ops.rope_backward(dqk_.data(), dq_.data(), rope_cos_.data(), rope_sin_.data(), B, T, H, D);
    ops.matmul_backward(da, grads + o.q, dqk_.data(), a.a.data(), params + o.q, N, C, C);
    zero(dqk_);
    ops.rope_backward(dqk_.data(), dk_.data(), rope_cos_.data(), rope_sin_.data(), B, T, H, D);
    ops.matmul_backward(da, grads + o.k, dqk_.data(), a.a.data(), params + o.k, N, C, C);
    ops.matmul_backward(da, grads + o.v, dv_.data(), a.a.data(), params + o.v, N, C, C);
    ops.rmsnorm_backward(dres_.data(), grads + o.in_norm, da, a.res.data(), params + o.in_norm,
                         a.rstd1.data(), N, C);
    stage_done(l + 1);
  }
  ops.embedding_backward(grads + embed_off_, dres_.data(), tokens_.data(), N, C);
  ops.Synchronize();  // the caller reads `grads` next
  stage_done(0);
}

}  // namespace muonps
