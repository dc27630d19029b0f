// Which shard owns which tensors. Every tensor lives whole on one shard (a
// Muon matrix needs all of itself for Newton-Schulz). Muon matrices are
// spread to balance Newton-Schulz work, AdamW tensors to balance the bytes of
// their two moments, each largest first onto the least loaded shard (ties by
// shard index), so the placement depends only on the model and the shard
// count. Results never depend on it: each tensor's update reads only its own
// gradient and state.
#ifndef MUONPS_SERVICES_COORDINATOR_PLACEMENT_H_
#define MUONPS_SERVICES_COORDINATOR_PLACEMENT_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "common/model_layout.h"
#include "muonps/v1/coordinator.pb.h"

namespace muonps {

struct Placement {
  // Per shard: owned tensor names in layout order and the work they bring,
  // and the tensors it holds a replica of.
  std::vector<v1::ShardPlacement> shards;
  // Tensor name -> shard index.
  std::map<std::string, int> owner;
  // Tensor name -> the shards holding a copy of its state: the owner first,
  // then its replicas.
  std::map<std::string, std::vector<int>> holders;
};

// Newton-Schulz work of one step on a rows x cols matrix, in FLOP: per
// iteration X Xᵀ (2m²n), the polynomial (2m³) and the product with X (2m²n),
// m = min(rows, cols), n = max(rows, cols).
double NewtonSchulzFlops(int64_t rows, int64_t cols, int ns_steps);

// `shards` >= 1. Fills ShardPlacement.tensors and the three cost figures
// (of the owned tensors); shard ids and addresses are left to the caller.
// With `copies` > 1, each tensor also has a replica on the next copies - 1
// shards after its owner, in a ring (shard i holds the replicas of shards
// i-1, i-2, ...): shards that are not within copies - 1 of each other in the
// ring never share a tensor, so losing them together loses no state. At
// most `shards` copies.
Placement PlaceTensors(const ModelLayout& layout, const v1::OptimizerConfig& optimizer, int shards,
                       int copies = 1);

// A table, one line per shard: tensors, NS GFLOP/step, AdamW state MiB,
// parameter MiB.
std::string FormatPlacement(const std::vector<v1::ShardPlacement>& shards);

}  // namespace muonps

#endif  // MUONPS_SERVICES_COORDINATOR_PLACEMENT_H_
