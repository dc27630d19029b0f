// Muon's Newton-Schulz on a GPU for optimizer shards (`muonps shard
// --device cuda`): each call copies the matrix to the device, runs
// NewtonSchulzRunner (fp32, TF32 off) and copies the result back. Calls
// from the shard's update threads take turns on the one device.
#ifndef MUONPS_WORKERS_CUDA_CUDA_ORTHOGONALIZER_H_
#define MUONPS_WORKERS_CUDA_CUDA_ORTHOGONALIZER_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "optim/orthogonalizer.h"

namespace muonps::cuda {

// Fails when the device cannot be used.
absl::StatusOr<std::unique_ptr<Orthogonalizer>> CreateCudaOrthogonalizer(int device);

}  // namespace muonps::cuda

#endif  // MUONPS_WORKERS_CUDA_CUDA_ORTHOGONALIZER_H_
