#include "optim/muon.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "common/parallel.h"
#include "optim/newton_schulz.h"

namespace muonps {

absl::StatusOr<MuonScaleRule> ParseMuonScaleRule(std::string_view name) {
  if (name == "match_rms_adamw") return MuonScaleRule::kMatchRmsAdamW;
  if (name == "original") return MuonScaleRule::kOriginal;
  // std::string, not std::string_view: this abseil's string_view is its own type.
  return absl::InvalidArgumentError(
      absl::StrCat("unknown Muon scale rule \"", std::string(name),
                   "\" (expected \"match_rms_adamw\" or \"original\")"));
}

std::string_view MuonScaleRuleName(MuonScaleRule rule) {
  switch (rule) {
    case MuonScaleRule::kMatchRmsAdamW:
      return "match_rms_adamw";
    case MuonScaleRule::kOriginal:
      return "original";
  }
  return "unknown";
}

double MuonScale(int rows, int cols, MuonScaleRule rule) {
  switch (rule) {
    case MuonScaleRule::kMatchRmsAdamW:
      return 0.2 * std::sqrt(static_cast<double>(std::max(rows, cols)));
    case MuonScaleRule::kOriginal:
      return std::sqrt(std::max(1.0, static_cast<double>(rows) / static_cast<double>(cols)));
  }
  return 1.0;
}

void MuonStep(float* w, float* momentum_buffer, const float* grad, int rows, int cols,
              const MuonHyper& h) {
  if (rows <= 0 || cols <= 0) return;
  const int64_t size = static_cast<int64_t>(rows) * cols;
  // The update direction before and after orthogonalisation (in place).
  thread_local std::vector<float> update;
  if (static_cast<int64_t>(update.size()) < size) update.resize(size);
  float* u = update.data();

  const float momentum = static_cast<float>(h.momentum);
  const bool nesterov = h.nesterov;
  ParallelFor(size, [&](int64_t i) {
    const float buf = momentum * momentum_buffer[i] + grad[i];
    momentum_buffer[i] = buf;
    u[i] = nesterov ? grad[i] + momentum * buf : buf;
  });

  if (h.orthogonalizer != nullptr) {
    h.orthogonalizer->Orthogonalize(u, rows, cols, h.ns_steps);
  } else {
    NewtonSchulz(u, u, rows, cols, h.ns_steps);
  }

  const double decay = 1.0 - h.lr * h.weight_decay;
  const double step = h.lr * MuonScale(rows, cols, h.scale_rule);
  ParallelFor(size, [&](int64_t i) { w[i] = static_cast<float>(w[i] * decay - step * u[i]); });
}

}  // namespace muonps
