// CUDA and cuBLAS results as absl::Status, and what devices are visible.
#ifndef MUONPS_WORKERS_CUDA_CUDA_STATUS_H_
#define MUONPS_WORKERS_CUDA_CUDA_STATUS_H_

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include <string>

#include "absl/status/status.h"

namespace muonps::cuda {

// OK, or INTERNAL naming `what` and CUDA's error.
absl::Status CudaStatus(cudaError_t error, const std::string& what);
absl::Status CublasStatus(cublasStatus_t status, const std::string& what);

// The number of usable CUDA devices (0 with `why` set when there is none:
// no driver, no device, or a driver older than the runtime).
int VisibleDevices(std::string* why);

// "cuda <name of device 0> (sm_XY) x<count>": what a member reports as
// NumericsProfile.device when it computes on `count` devices.
std::string DeviceDescription(int count);

}  // namespace muonps::cuda

#endif  // MUONPS_WORKERS_CUDA_CUDA_STATUS_H_
