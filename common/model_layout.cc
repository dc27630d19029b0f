#include "common/model_layout.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "common/philox.h"

namespace muonps {

ModelLayout::ModelLayout(const v1::ModelConfig& m) {
  const int64_t C = m.hidden_size(), V = m.vocab_size();
  const int64_t E = m.n_routed_experts(), F = m.moe_intermediate_size();
  const int64_t I = m.intermediate_size(), SF = m.n_shared_experts() * F;
  Add("model.embed_tokens.weight", {V, C}, TensorRole::kEmbedding, -1);
  for (int l = 0; l < m.num_hidden_layers(); ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    Add(p + "input_layernorm.weight", {C}, TensorRole::kNorm, l);
    if (m.attention() == "mla") {
      // DeepSeek-V3's MLA (modeling_deepseek.py's DeepseekV3Attention names).
      const int64_t H = m.num_attention_heads(), R = m.kv_lora_rank();
      const int64_t QK = m.qk_nope_head_dim() + m.qk_rope_head_dim();
      const int64_t QR = m.q_lora_rank();
      if (QR > 0) {
        Add(p + "self_attn.q_a_proj.weight", {QR, C}, TensorRole::kMatrix, l);
        Add(p + "self_attn.q_a_layernorm.weight", {QR}, TensorRole::kNorm, l);
        Add(p + "self_attn.q_b_proj.weight", {H * QK, QR}, TensorRole::kMatrix, l);
      } else {
        Add(p + "self_attn.q_proj.weight", {H * QK, C}, TensorRole::kMatrix, l);
      }
      Add(p + "self_attn.kv_a_proj_with_mqa.weight", {R + m.qk_rope_head_dim(), C},
          TensorRole::kMatrix, l);
      Add(p + "self_attn.kv_a_layernorm.weight", {R}, TensorRole::kNorm, l);
      Add(p + "self_attn.kv_b_proj.weight", {H * (m.qk_nope_head_dim() + m.v_head_dim()), R},
          TensorRole::kMatrix, l);
      Add(p + "self_attn.o_proj.weight", {C, H * m.v_head_dim()}, TensorRole::kMatrix, l);
    } else {
      for (const char* proj : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
        Add(absl::StrCat(p, "self_attn.", proj, ".weight"), {C, C}, TensorRole::kMatrix, l);
      }
    }
    Add(p + "post_attention_layernorm.weight", {C}, TensorRole::kNorm, l);
    if (l < m.first_k_dense_replace()) {
      Add(p + "mlp.gate_proj.weight", {I, C}, TensorRole::kMatrix, l);
      Add(p + "mlp.up_proj.weight", {I, C}, TensorRole::kMatrix, l);
      Add(p + "mlp.down_proj.weight", {C, I}, TensorRole::kMatrix, l);
    } else {
      Add(p + "mlp.gate.weight", {E, C}, TensorRole::kMatrix, l);
      Add(p + "mlp.gate.e_score_correction_bias", {E}, TensorRole::kBuffer, l);
      for (int e = 0; e < E; ++e) {
        const std::string ep = absl::StrCat(p, "mlp.experts.", e, ".");
        Add(ep + "gate_proj.weight", {F, C}, TensorRole::kMatrix, l);
        Add(ep + "up_proj.weight", {F, C}, TensorRole::kMatrix, l);
        Add(ep + "down_proj.weight", {C, F}, TensorRole::kMatrix, l);
      }
      if (SF > 0) {
        Add(p + "mlp.shared_experts.gate_proj.weight", {SF, C}, TensorRole::kMatrix, l);
        Add(p + "mlp.shared_experts.up_proj.weight", {SF, C}, TensorRole::kMatrix, l);
        Add(p + "mlp.shared_experts.down_proj.weight", {C, SF}, TensorRole::kMatrix, l);
      }
    }
  }
  Add("model.norm.weight", {C}, TensorRole::kNorm, -1);
  Add("lm_head.weight", {V, C}, TensorRole::kHead, -1);
}

void ModelLayout::Add(std::string name, std::vector<int64_t> shape, TensorRole role, int layer) {
  TensorInfo t;
  t.name = std::move(name);
  t.shape = std::move(shape);
  t.numel = 1;
  for (int64_t d : t.shape) t.numel *= d;
  t.offset = total_;
  t.role = role;
  t.layer = layer;
  // Keep every tensor 16-float (64-byte) aligned inside the flat buffer.
  total_ += (t.numel + 15) / 16 * 16;
  index_[t.name] = static_cast<int>(tensors_.size());
  tensors_.push_back(std::move(t));
}

const TensorInfo* ModelLayout::Find(const std::string& name) const {
  const int i = Index(name);
  return i < 0 ? nullptr : &tensors_[i];
}

int ModelLayout::Index(const std::string& name) const {
  auto it = index_.find(name);
  return it == index_.end() ? -1 : it->second;
}

void InitTensor(const TensorInfo& tensor, uint64_t seed, double initializer_range, float* out) {
  switch (tensor.role) {
    case TensorRole::kNorm:
      std::fill(out, out + tensor.numel, 1.0f);
      break;
    case TensorRole::kBuffer:
      std::fill(out, out + tensor.numel, 0.0f);
      break;
    default:
      FillNormal(out, tensor.numel, seed, tensor.name, initializer_range);
  }
}

void InitParameters(const ModelLayout& layout, uint64_t seed, double initializer_range,
                    float* params) {
  std::fill(params, params + layout.total_floats(), 0.0f);
  for (const TensorInfo& t : layout.tensors()) {
    InitTensor(t, seed, initializer_range, params + t.offset);
  }
}

bool UsesMuon(const TensorInfo& tensor, const std::string& optimizer_name) {
  return optimizer_name == "muon" && tensor.role == TensorRole::kMatrix;
}

}  // namespace muonps
