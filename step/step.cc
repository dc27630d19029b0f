#include "step/step.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"
#include "optim/lr_schedule.h"

namespace muonps {

StepScales StepScalesOf(const v1::JobSpec& job) {
  StepScales s;
  const int slots = job.batch().slots();
  s.global_tokens = static_cast<int64_t>(slots) * job.batch().micro_batch() *
                    job.model().max_position_embeddings();
  s.loss_scale = static_cast<float>(1.0 / static_cast<double>(s.global_tokens));
  s.aux_scale = job.model().balancing() == "aux_loss"
                    ? static_cast<float>(job.model().aux_loss_alpha() / slots)
                    : 0.0f;
  return s;
}

double StepLearningRate(const v1::JobSpec& job, int64_t step_index) {
  return ScheduledLr(job.optimizer().lr(), step_index, job.schedule().total_steps(),
                     job.schedule().warmup_steps(), job.schedule().min_lr_ratio());
}

SlotRange PlanSlots(int slots, int tasks, int k) {
  const int64_t s = slots, t = tasks > 0 ? tasks : 1;
  return {static_cast<int>(k * s / t), static_cast<int>((k + 1) * s / t)};
}

double ClipCoefficient(double max_grad_norm, double norm) {
  return max_grad_norm > 0.0 ? max_grad_norm / (norm + 1e-6) : 1.0;
}

ExpertLoads::ExpertLoads(const v1::ModelConfig& model) {
  const int moe_layers = std::max(0, model.num_hidden_layers() - model.first_k_dense_replace());
  layers_.assign(
      static_cast<size_t>(moe_layers),
      std::vector<int64_t>(static_cast<size_t>(std::max(0, model.n_routed_experts())), 0));
}

namespace {

// Checks the shape of loads given as `layers` sequences of counts.
template <typename Layers, typename CountsOf>
absl::Status CheckShape(const std::vector<std::vector<int64_t>>& want, const Layers& layers,
                        CountsOf counts_of) {
  if (static_cast<size_t>(layers.size()) != want.size()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "expert_load: ", layers.size(), " layers, the model has ", want.size(), " MoE layers"));
  }
  for (size_t l = 0; l < want.size(); ++l) {
    const auto& counts = counts_of(layers[static_cast<int>(l)]);
    if (static_cast<size_t>(counts.size()) != want[l].size()) {
      return absl::InvalidArgumentError(absl::StrCat("expert_load[", l, "]: ", counts.size(),
                                                     " experts, the model has ", want[l].size()));
    }
    for (int64_t x : counts) {
      if (x < 0) {
        return absl::InvalidArgumentError(absl::StrCat("expert_load[", l, "]: negative count ", x));
      }
    }
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status ExpertLoads::Add(const std::vector<std::vector<int64_t>>& loads) {
  if (absl::Status st = CheckShape(
          layers_, loads, [](const std::vector<int64_t>& v) -> const auto& { return v; });
      !st.ok()) {
    return st;
  }
  for (size_t l = 0; l < layers_.size(); ++l) {
    for (size_t e = 0; e < layers_[l].size(); ++e) layers_[l][e] += loads[l][e];
  }
  return absl::OkStatus();
}

absl::Status ExpertLoads::Add(const google::protobuf::RepeatedPtrField<v1::ExpertLoad>& loads) {
  if (absl::Status st = CheckShape(
          layers_, loads, [](const v1::ExpertLoad& v) -> const auto& { return v.tokens(); });
      !st.ok()) {
    return st;
  }
  for (size_t l = 0; l < layers_.size(); ++l) {
    const auto& counts = loads[static_cast<int>(l)].tokens();
    for (size_t e = 0; e < layers_[l].size(); ++e) layers_[l][e] += counts[static_cast<int>(e)];
  }
  return absl::OkStatus();
}

void ExpertLoads::ToProto(google::protobuf::RepeatedPtrField<v1::ExpertLoad>* out) const {
  out->Clear();
  for (const auto& layer : layers_) {
    v1::ExpertLoad* l = out->Add();
    for (int64_t x : layer) l->add_tokens(x);
  }
}

double ExpertLoads::MaxLoadRatio() const {
  double ratio = 0.0;
  for (const auto& layer : layers_) {
    int64_t total = 0, peak = 0;
    for (int64_t x : layer) {
      total += x;
      peak = std::max(peak, x);
    }
    if (total > 0) {
      ratio = std::max(ratio, static_cast<double>(peak) * static_cast<double>(layer.size()) /
                                  static_cast<double>(total));
    }
  }
  return ratio;
}

AttentionLogits::AttentionLogits(const v1::ModelConfig& model)
    : layers_(std::max(0, model.num_hidden_layers())),
      heads_(std::max(0, model.num_attention_heads())),
      max_(static_cast<size_t>(layers_) * heads_, -std::numeric_limits<float>::infinity()) {}

absl::Status AttentionLogits::Add(const std::vector<std::vector<float>>& per_layer) {
  if (static_cast<int>(per_layer.size()) != layers_) {
    return absl::InvalidArgumentError(absl::StrCat("attention_logit_max: ", per_layer.size(),
                                                   " layers, the model has ", layers_));
  }
  google::protobuf::RepeatedField<float> flat;
  for (size_t l = 0; l < per_layer.size(); ++l) {
    if (static_cast<int>(per_layer[l].size()) != heads_) {
      return absl::InvalidArgumentError(absl::StrCat(
          "attention_logit_max[", l, "]: ", per_layer[l].size(), " heads, the model has ", heads_));
    }
    flat.Add(per_layer[l].begin(), per_layer[l].end());
  }
  return Add(flat);
}

absl::Status AttentionLogits::Add(const google::protobuf::RepeatedField<float>& flat) {
  if (static_cast<size_t>(flat.size()) != max_.size()) {
    return absl::InvalidArgumentError(absl::StrCat("attention_logit_max: ", flat.size(),
                                                   " values, the model has ", layers_,
                                                   " layers of ", heads_, " heads"));
  }
  for (int i = 0; i < flat.size(); ++i) {
    if (!std::isfinite(flat[i])) {
      return absl::InvalidArgumentError(absl::StrCat("attention_logit_max[", i,
                                                     "]: not finite (layer ", i / heads_, ", head ",
                                                     i % heads_, ")"));
    }
  }
  for (int i = 0; i < flat.size(); ++i) max_[i] = std::max(max_[i], flat[i]);
  empty_ = false;
  return absl::OkStatus();
}

float AttentionLogits::LayerMax(int l) const {
  float m = -std::numeric_limits<float>::infinity();
  for (int h = 0; h < heads_; ++h) m = std::max(m, max(l, h));
  return m;
}

int AttentionLogits::ClippedHeads(int l, double tau) const {
  int n = 0;
  for (int h = 0; h < heads_; ++h) n += QkClipGamma(tau, max(l, h)) < 1.0 ? 1 : 0;
  return n;
}

void AttentionLogits::ToProto(google::protobuf::RepeatedField<float>* flat) const {
  flat->Clear();
  if (!empty_) flat->Add(max_.begin(), max_.end());
}

double QkClipGamma(double tau, double s_max) {
  if (!(tau > 0.0) || !(s_max > tau)) return 1.0;
  return tau / s_max;
}

namespace {

enum class QkPart { kNone, kMhaQuery, kMhaKey, kMlaQuery, kMlaKeyValue };

QkPart PartOf(const TensorInfo& t, const v1::ModelConfig& m) {
  if (t.layer < 0 || t.shape.size() != 2) return QkPart::kNone;
  constexpr absl::string_view kAttention = ".self_attn.";
  const size_t at = absl::string_view(t.name).rfind(kAttention);
  if (at == absl::string_view::npos) return QkPart::kNone;
  const absl::string_view suffix = absl::string_view(t.name).substr(at + kAttention.size());
  if (m.attention() == "mla") {
    if (suffix == "q_proj.weight" || suffix == "q_b_proj.weight") return QkPart::kMlaQuery;
    if (suffix == "kv_b_proj.weight") return QkPart::kMlaKeyValue;
    return QkPart::kNone;
  }
  if (suffix == "q_proj.weight") return QkPart::kMhaQuery;
  if (suffix == "k_proj.weight") return QkPart::kMhaKey;
  return QkPart::kNone;
}

void ScaleRows(float* value, int64_t first_row, int64_t rows, int64_t cols, float factor) {
  float* p = value + first_row * cols;
  for (int64_t i = 0; i < rows * cols; ++i) p[i] *= factor;
}

}  // namespace

bool QkClipTouches(const TensorInfo& tensor, const v1::ModelConfig& model) {
  return PartOf(tensor, model) != QkPart::kNone;
}

int ApplyQkClip(const TensorInfo& tensor, const v1::ModelConfig& m, double tau,
                const AttentionLogits& logits, float* value) {
  const QkPart part = PartOf(tensor, m);
  if (part == QkPart::kNone || logits.empty() || !(tau > 0.0)) return 0;
  const int l = tensor.layer, H = m.num_attention_heads();
  if (l >= logits.layers() || H != logits.heads()) return 0;
  const int64_t cols = tensor.cols();
  int clipped = 0;
  for (int h = 0; h < H; ++h) {
    const double gamma = QkClipGamma(tau, logits.max(l, h));
    if (!(gamma < 1.0)) continue;
    ++clipped;
    const float root = static_cast<float>(std::sqrt(gamma));
    switch (part) {
      case QkPart::kMhaQuery:
      case QkPart::kMhaKey: {
        const int64_t D = m.hidden_size() / H;
        ScaleRows(value, h * D, D, cols, root);
        break;
      }
      case QkPart::kMlaQuery: {
        const int64_t dn = m.qk_nope_head_dim(), dr = m.qk_rope_head_dim();
        ScaleRows(value, h * (dn + dr), dn, cols, root);                            // q^C
        ScaleRows(value, h * (dn + dr) + dn, dr, cols, static_cast<float>(gamma));  // q^R
        break;
      }
      case QkPart::kMlaKeyValue: {
        const int64_t dn = m.qk_nope_head_dim(), dv = m.v_head_dim();
        ScaleRows(value, h * (dn + dv), dn, cols, root);  // k^C; the values stay
        break;
      }
      case QkPart::kNone:
        break;
    }
  }
  return clipped;
}

}  // namespace muonps
