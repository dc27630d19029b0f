#include "services/coordinator/placement.h"

#include <algorithm>
#include <numeric>

#include "absl/strings/str_format.h"

namespace muonps {

double NewtonSchulzFlops(int64_t rows, int64_t cols, int ns_steps) {
  const double m = static_cast<double>(std::min(rows, cols));
  const double n = static_cast<double>(std::max(rows, cols));
  return ns_steps * (4.0 * m * m * n + 2.0 * m * m * m);
}

Placement PlaceTensors(const ModelLayout& layout, const v1::OptimizerConfig& optimizer, int shards,
                       int copies) {
  Placement placement;
  placement.shards.resize(static_cast<size_t>(std::max(1, shards)));
  const int n = static_cast<int>(placement.shards.size());
  std::vector<double> ns(n, 0.0);
  std::vector<int64_t> adam(n, 0), params(n, 0);
  std::vector<int> owner(layout.tensors().size(), -1);

  std::vector<int> muon, other;
  for (int i = 0; i < static_cast<int>(layout.tensors().size()); ++i) {
    const TensorInfo& t = layout.tensors()[i];
    (t.trainable() && UsesMuon(t, optimizer.name()) ? muon : other).push_back(i);
  }
  auto flops = [&](int i) {
    const TensorInfo& t = layout.tensors()[i];
    return NewtonSchulzFlops(t.rows(), t.cols(), optimizer.ns_steps());
  };
  auto bytes = [&](int i) {
    return layout.tensors()[i].numel * static_cast<int64_t>(sizeof(float));
  };
  // Largest first (stable: layout order among equals).
  std::stable_sort(muon.begin(), muon.end(), [&](int a, int b) { return flops(a) > flops(b); });
  std::stable_sort(other.begin(), other.end(), [&](int a, int b) { return bytes(a) > bytes(b); });
  for (int i : muon) {
    int best = 0;
    for (int s = 1; s < n; ++s) {
      if (ns[s] < ns[best] || (ns[s] == ns[best] && params[s] < params[best])) best = s;
    }
    owner[i] = best;
    ns[best] += flops(i);
    params[best] += bytes(i);
  }
  for (int i : other) {
    const bool has_state = layout.tensors()[i].trainable();
    int best = 0;
    for (int s = 1; s < n; ++s) {
      const int64_t a = has_state ? adam[s] : params[s], b = has_state ? adam[best] : params[best];
      if (a < b || (a == b && ns[s] < ns[best])) best = s;
    }
    owner[i] = best;
    if (has_state) adam[best] += 2 * bytes(i);
    params[best] += bytes(i);
  }
  copies = std::max(1, std::min(copies, n));
  for (int i = 0; i < static_cast<int>(layout.tensors().size()); ++i) {
    const std::string& name = layout.tensors()[i].name;
    placement.shards[owner[i]].add_tensors(name);
    placement.owner[name] = owner[i];
    std::vector<int>& holders = placement.holders[name];
    for (int k = 0; k < copies; ++k) {
      const int s = (owner[i] + k) % n;
      holders.push_back(s);
      if (k > 0) placement.shards[s].add_replicas(name);
    }
  }
  for (int s = 0; s < n; ++s) {
    placement.shards[s].set_ns_gflop(ns[s] * 1e-9);
    placement.shards[s].set_adamw_state_bytes(adam[s]);
    placement.shards[s].set_parameter_bytes(params[s]);
  }
  return placement;
}

std::string FormatPlacement(const std::vector<v1::ShardPlacement>& shards) {
  bool replicas = false;
  for (const v1::ShardPlacement& s : shards) replicas = replicas || s.replicas_size() > 0;
  std::string out = absl::StrFormat("%-10s %-21s %8s %14s %12s %10s", "shard", "address", "tensors",
                                    "NS GFLOP/step", "AdamW MiB", "param MiB");
  out += replicas ? absl::StrFormat(" %9s\n", "replicas") : "\n";
  for (const v1::ShardPlacement& s : shards) {
    absl::StrAppendFormat(&out, "%-10s %-21s %8d %14.3f %12.2f %10.2f", s.shard_id(), s.address(),
                          s.tensors_size(), s.ns_gflop(), s.adamw_state_bytes() / 1048576.0,
                          s.parameter_bytes() / 1048576.0);
    out += replicas ? absl::StrFormat(" %9d\n", s.replicas_size()) : "\n";
  }
  return out;
}

}  // namespace muonps
