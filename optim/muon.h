// Muon: momentum SGD whose update for a weight matrix is orthogonalised by
// Newton-Schulz iterations (Jordan et al., 2024), with decoupled weight decay.
//
// Used for the 2-D hidden weight matrices (attention projections, expert and
// dense FFN weights); everything else goes to AdamW.
#ifndef MUONPS_OPTIM_MUON_H_
#define MUONPS_OPTIM_MUON_H_

#include <string_view>

#include "absl/status/statusor.h"
#include "optim/orthogonalizer.h"

namespace muonps {

// How the orthogonalised update is scaled for a (rows, cols) matrix.
enum class MuonScaleRule {
  // 0.2 * sqrt(max(rows, cols)): the update's RMS matches a typical AdamW
  // update, so AdamW learning rates and weight decay carry over (Moonlight).
  kMatchRmsAdamW,
  // sqrt(max(1, rows / cols)): the scale of the original Muon implementation.
  kOriginal,
};

// "match_rms_adamw" -> kMatchRmsAdamW, "original" -> kOriginal;
// anything else is InvalidArgument.
absl::StatusOr<MuonScaleRule> ParseMuonScaleRule(std::string_view name);
// The inverse of ParseMuonScaleRule.
std::string_view MuonScaleRuleName(MuonScaleRule rule);

struct MuonHyper {
  double lr;
  double weight_decay;
  double momentum;
  bool nesterov;
  int ns_steps;  // Newton-Schulz iterations, usually 5
  MuonScaleRule scale_rule;
  // Where Newton-Schulz runs; null: NewtonSchulz on the calling thread.
  Orthogonalizer* orthogonalizer = nullptr;
};

// The update scale for a (rows, cols) matrix (rows / cols as a real division).
double MuonScale(int rows, int cols, MuonScaleRule rule);

// One Muon update of a (rows, cols) matrix, in place on w and momentum_buffer:
//   buf = momentum * buf + g
//   u   = nesterov ? g + momentum * buf : buf
//   O   = NewtonSchulz(u, ns_steps)
//   w   = w * (1 - lr * weight_decay) - lr * MuonScale(rows, cols) * O
// w, momentum_buffer, grad: (rows, cols) row-major float32; none may alias
// another. The momentum buffer starts at zero. Scratch is kept per calling
// thread and reused. Bit-identical for any thread count.
void MuonStep(float* w, float* momentum_buffer, const float* grad, int rows, int cols,
              const MuonHyper& h);

}  // namespace muonps

#endif  // MUONPS_OPTIM_MUON_H_
