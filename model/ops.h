// The MoE transformer's ops on CPU, float32, one function per op with a
// mirrored backward (llm.c style).
//
// Size legend
//   N  rows (tokens in the slot, B*T)     B  sequences     T  time (positions)
//   C  channels (hidden size)             H  heads         D  head dim (C / H)
//   V  vocabulary                         E  routed experts
//   K  experts chosen per token           F  FFN / expert width
//   P  routed assignments (N*K)
//
// Conventions
// - Argument order: outputs, buffers saved for backward, inputs, sizes.
// - All matrices are row-major. Linear weights use the HF (out, in) layout.
// - Every *_backward ADDS into its d-prefixed outputs (callers zero them).
//   A d-output passed as nullptr is skipped.
// - Results are bit-identical for any number of threads: each output element
//   is computed by one loop iteration with a fixed reduction order.
#ifndef MUONPS_MODEL_OPS_H_
#define MUONPS_MODEL_OPS_H_

#include <cstdint>

namespace muonps {

enum class ScoringFunc { kSigmoid, kSoftmax };

// ---- embedding ------------------------------------------------------------
// out[n, :] = wte[inp[n], :].            out (N, C), inp (N), wte (V, C)
void embedding_forward(float* out, const int32_t* inp, const float* wte, int N, int C);
// dwte[inp[n], :] += dout[n, :], summed over n in increasing order.
void embedding_backward(float* dwte, const float* dout, const int32_t* inp, int N, int C);

// ---- RMSNorm ----------------------------------------------------------------
// rstd[n] = 1 / sqrt(mean_c(inp[n,c]^2) + eps); out = inp * rstd * weight.
//   out (N, C), rstd (N), inp (N, C), weight (C)
void rmsnorm_forward(float* out, float* rstd, const float* inp, const float* weight, int N, int C,
                     float eps);
void rmsnorm_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                      const float* weight, const float* rstd, int N, int C);

// ---- linear -----------------------------------------------------------------
// out = inp · weight^T (overwrites out).   out (N, OC), inp (N, IC), weight (OC, IC)
void matmul_forward(float* out, const float* inp, const float* weight, int N, int IC, int OC);
// dinp += dout · weight;  dweight += dout^T · inp.
void matmul_backward(float* dinp, float* dweight, const float* dout, const float* inp,
                     const float* weight, int N, int IC, int OC);

// ---- RoPE (HF "rotate_half") -------------------------------------------------
// Tables for positions 0..T-1 and pairs i < D/2:
//   angle = p * theta^(-2i/D) (computed in double), cos/sin stored as float.
//   cos, sin (T, D/2)
void rope_tables(float* cos, float* sin, int T, int D, double theta);
// For each (b, t, h) and i < D/2, with x1 = inp[.., i], x2 = inp[.., i + D/2]:
//   out[i] = x1 cos - x2 sin;  out[i + D/2] = x2 cos + x1 sin.
// inp/out (B, T, H, D) = (B*T, C); out may alias inp.
void rope_forward(float* out, const float* inp, const float* cos, const float* sin, int B, int T,
                  int H, int D);
// dinp += R^T dout (the inverse rotation). dinp must not alias dout.
void rope_backward(float* dinp, const float* dout, const float* cos, const float* sin, int B, int T,
                   int H, int D);

// ---- causal multi-head attention -----------------------------------------------
// q, k (B, T, H*Dk); v, out (B, T, H*Dv); att (B, H, T, T) the softmax
// probabilities (entries with key index > query index are 0). Scale
// 1/sqrt(Dk). logit_max (B*H), when not nullptr, receives each (b, h)'s
// largest pre-softmax logit q.k/sqrt(Dk) over the keys its queries see.
void attention_forward(float* out, float* att, const float* q, const float* k, const float* v,
                       int B, int T, int H, int Dk, int Dv, float* logit_max = nullptr);
void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                        const float* k, const float* v, const float* att, int B, int T, int H,
                        int Dk, int Dv);
// Multi-head attention with one head width D for q, k and v.
inline void attention_forward(float* out, float* att, const float* q, const float* k,
                              const float* v, int B, int T, int H, int D) {
  attention_forward(out, att, q, k, v, B, T, H, D, D);
}
inline void attention_backward(float* dq, float* dk, float* dv, const float* dout, const float* q,
                               const float* k, const float* v, const float* att, int B, int T,
                               int H, int D) {
  attention_backward(dq, dk, dv, dout, q, k, v, att, B, T, H, D, D);
}

// ---- column slices ------------------------------------------------------------
// out[n, :] = inp[n, off : off + w] for rows of width ld.   out (N, w)
void slice_forward(float* out, const float* inp, int64_t N, int ld, int off, int w);
// dinp[n, off : off + w] += dout[n, :].
void slice_backward(float* dinp, const float* dout, int64_t N, int ld, int off, int w);

// ---- Multi-head Latent Attention heads (DeepSeek-V2/V3) --------------------------
// Sizes: dn = qk_nope_head_dim, dr = qk_rope_head_dim (even), dv = v_head_dim,
// r = kv_lora_rank. From
//   qp  (N, H*(dn+dr))  the query projection, per head [nope | rope]
//   kv  (N, H*(dn+dv))  kv_b_proj's output, per head [k nope | v]
//   kva (N, r+dr)       kv_a_proj_with_mqa's output, [latent | shared k rope]
// builds the attention's inputs
//   q (N, H*(dn+dr)) = [q nope | RoPE(q rope)],  k (N, H*(dn+dr)) =
//   [k nope | RoPE(k rope)] (the same rotated key in every head),  v (N, H*dv).
// RoPE rotates the pairs (x[2i], x[2i+1]) by the angles of rope_tables(T, dr)
// and writes them in rotate_half order (DeepSeek-V3's apply_rotary_pos_emb).
void mla_heads_forward(float* q, float* k, float* v, const float* qp, const float* kv,
                       const float* kva, const float* cos, const float* sin, int B, int T, int H,
                       int dn, int dr, int dv, int r);
// Adds into dqp, dkv and the rope columns of dkva (its latent columns are
// untouched); the shared key's gradient sums the heads in increasing order.
void mla_heads_backward(float* dqp, float* dkv, float* dkva, const float* dq, const float* dk,
                        const float* dv, const float* cos, const float* sin, int B, int T, int H,
                        int dn, int dr, int dv_dim, int r);

// ---- SwiGLU -----------------------------------------------------------------
// out = silu(gate) * up, silu(x) = x / (1 + exp(-x)).   all (N, F)
void swiglu_forward(float* out, const float* gate, const float* up, int64_t N, int F);
void swiglu_backward(float* dgate, float* dup, const float* dout, const float* gate,
                     const float* up, int64_t N, int F);

// ---- router -------------------------------------------------------------------
// scores = sigmoid(logits) elementwise, or softmax over each row.  (N, E)
void router_score_forward(float* scores, const float* logits, int N, int E, ScoringFunc func);
void router_score_backward(float* dlogits, const float* dscores, const float* scores, int N, int E,
                           ScoringFunc func);
// idx[n, 0..K) = the K experts with the largest scores[n,e] + bias[e] (bias may
// be nullptr = 0), in decreasing order; ties go to the lower expert index.
// Not differentiable.                       idx (N, K)
void router_topk(int32_t* idx, const float* scores, const float* bias, int N, int E, int K);
// weights[n, j] = scores[n, idx[n,j]], divided by sum_j scores[n, idx[n,j]]
// when norm, times scale.                   weights (N, K)
void topk_weights_forward(float* weights, const float* scores, const int32_t* idx, int N, int E,
                          int K, bool norm, float scale);
// dscores[n, idx[n,j]] += d weights / d scores (only chosen entries get gradient).
void topk_weights_backward(float* dscores, const float* dweights, const float* scores,
                           const int32_t* idx, int N, int E, int K, bool norm, float scale);

// ---- expert dispatch / combine -------------------------------------------------
// The routing plan groups the N*K assignments (n, j) by expert, in token order
// within an expert:
//   offsets (E+1): expert e owns sorted positions [offsets[e], offsets[e+1])
//   token (P):     token[p] = the token n of sorted position p
//   pos (N, K):    pos[n*K + j] = sorted position of assignment (n, j)
void build_routing(int32_t* offsets, int32_t* token, int32_t* pos, const int32_t* idx, int N, int E,
                   int K);
// xe[p, :] = x[token[p], :].               xe (P, C), x (N, C)
void dispatch_forward(float* xe, const float* x, const int32_t* token, int P, int C);
// dx[n, :] += sum_{j=0..K-1} dxe[pos[n*K+j], :] (j in increasing order).
void dispatch_backward(float* dx, const float* dxe, const int32_t* pos, int N, int K, int C);
// out[n, :] += sum_{j=0..K-1} weights[n,j] * ye[pos[n*K+j], :] (j increasing).
//   out (N, C), ye (P, C), weights (N, K)
void combine_forward(float* out, const float* ye, const float* weights, const int32_t* pos, int N,
                     int K, int C);
// dye[pos[n,j], :] += weights[n,j] * dout[n, :];  dweights[n,j] += <dout[n,:], ye[pos[n,j],:]>.
void combine_backward(float* dye, float* dweights, const float* dout, const float* ye,
                      const float* weights, const int32_t* pos, int N, int K, int C);

// ---- loss ---------------------------------------------------------------------
// probs = softmax(logits) per row; losses[n] = -log probs[n, targets[n]].
//   losses (N), probs (N, V), logits (N, V), targets (N)
void crossentropy_forward(float* losses, float* probs, const float* logits, const int32_t* targets,
                          int N, int V);
// dlogits[n, :] += dlosses[n] * (probs[n, :] - onehot(targets[n])).
void crossentropy_backward(float* dlogits, const float* dlosses, const float* probs,
                           const int32_t* targets, int N, int V);

// Auxiliary balance loss of one MoE layer over N tokens:
//   aux = sum_e f_e * P_e,  f_e = E / (K*N) * #{(n, j): idx[n,j] = e},
//   P_e = (1/N) sum_n scores[n,e] / sum_e' scores[n,e'].
// f is treated as a constant (the choice is not differentiable).
float aux_loss_forward(const float* scores, const int32_t* idx, int N, int E, int K);
// dscores += daux * d aux / d scores.
void aux_loss_backward(float* dscores, float daux, const float* scores, const int32_t* idx, int N,
                       int E, int K);

}  // namespace muonps

#endif  // MUONPS_MODEL_OPS_H_
