// The CUDA compute backend: every op of model/backend.h as a kernel (or a
// cuBLAS call) on one device, mirroring the CPU op of model/ops.h of the
// same name and its reduction order per output element, so repeated runs on
// one device give the same bits and agree with the CPU within the
// tolerances of tests/cuda_backend_test.cc.
//
// Ops are asynchronous on the backend's stream, except those that hand a
// result to the host or build it there (Allocate, Copy, build_routing,
// aux_loss_forward), which synchronise. A failed CUDA or cuBLAS call is
// recorded; the next Synchronize (explicit or inside a synchronising op)
// prints it and aborts the process.
#ifndef MUONPS_WORKERS_CUDA_CUDA_BACKEND_H_
#define MUONPS_WORKERS_CUDA_CUDA_BACKEND_H_

#include <memory>

#include "absl/status/statusor.h"
#include "model/backend.h"

namespace muonps::cuda {

// A ComputeBackend on one CUDA device: kernels and cuBLAS on one stream,
// memory from cudaMallocManaged (so the host may read it after Synchronize).
// Create fails (absl::Status) when the device cannot be used.
absl::StatusOr<std::unique_ptr<ComputeBackend>> CreateCudaBackend(int device);

}  // namespace muonps::cuda

#endif  // MUONPS_WORKERS_CUDA_CUDA_BACKEND_H_
