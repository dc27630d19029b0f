#include "services/coordinator/admission.h"

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/memory_limit.h"

namespace muonps {

MemoryEstimate EstimateMemory(const v1::JobSpec& spec, int shards) {
  const v1::ModelConfig& m = spec.model();
  const double C = m.hidden_size(), L = m.num_hidden_layers(), V = m.vocab_size(),
               H = m.num_attention_heads(), T = m.max_position_embeddings(),
               dense = std::min(m.first_k_dense_replace(), m.num_hidden_layers()),
               I = m.intermediate_size(), E = m.n_routed_experts(), K = m.num_experts_per_tok(),
               S = m.n_shared_experts(), Im = m.moe_intermediate_size();
  const double moe = L - dense;
  MemoryEstimate e;
  // Tensors: embeddings, final norm, head; per layer attention (4), norms
  // (2), and a dense MLP (3) or a router (gate, bias), experts (3 each) and
  // the shared experts (3).
  e.tensors = 3 + L * 6 + dense * 3 + moe * (2 + 3 * E + (S > 0 ? 3 : 0));
  e.parameters = 2 * V * C + C + L * (4 * C * C + 2 * C) + dense * 3 * C * I +
                 moe * (E * C + E + 3 * E * C * Im + 3 * C * Im * S);
  e.largest_tensor = std::max({V * C, C * C, C * I, C * Im * std::max(S, 1.0)});
  // Per tensor: the layout entry, its placement and its task routes.
  e.coordinator = e.tensors * 2048;
  // A shard's part: parameters, two optimizer buffers at most (AdamW), the
  // summed gradient and one push being assembled.
  const double part = std::max(e.parameters / std::max(shards, 1), e.largest_tensor);
  e.shard = part * 4 * 5;
  // A worker: parameters and gradients, and one slot's activations kept for
  // backward (per layer about 24 values per token and hidden unit, the
  // attention probabilities, the experts' inputs and hidden units; then the
  // logits and their gradient).
  const double mb = spec.batch().micro_batch(), tokens = mb * T;
  const double activations = L * (tokens * C * 24 + mb * H * T * T * 2) +
                             moe * tokens * K * (3 * Im + 2 * C) + tokens * V * 2;
  e.worker = e.parameters * 4 * 2 + activations * 4;
  return e;
}

absl::Status AdmitBySize(const v1::JobSpec& spec, int shards, const MemoryLimits& limits) {
  const MemoryEstimate e = EstimateMemory(spec, shards);
  if (e.tensors > kMaxTensors) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "spec.model: %.0f tensors, over the limit of %.0f (fewer layers or experts)", e.tensors,
        kMaxTensors));
  }
  struct Check {
    const char* who;
    double need;
    int64_t limit;
  };
  for (const Check& c : {Check{"the coordinator", e.coordinator, limits.coordinator},
                         Check{"each shard", e.shard, limits.shard},
                         Check{"each worker", e.worker, limits.worker}}) {
    if (c.limit > 0 && c.need > static_cast<double>(c.limit)) {
      return absl::ResourceExhaustedError(
          absl::StrCat("spec: the job needs about ", FormatBytes(c.need), " on ", c.who, " (",
                       absl::StrFormat("%.3g", e.parameters), " parameters on ",
                       std::max(shards, 1), " shard(s)), more than the ",
                       FormatBytes(static_cast<double>(c.limit)), " it may use (--memory_limit)"));
    }
  }
  return absl::OkStatus();
}

}  // namespace muonps
