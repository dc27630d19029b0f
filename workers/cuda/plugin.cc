// The CUDA target as a plugin of the muonps binary (libmuonps_cuda.so,
// loaded by cli/cuda_plugin.cc only when a process is asked to compute on a
// GPU): the binary itself never links the CUDA libraries, so CPU processes
// start without them (cuBLAS's libraries, once loaded, keep the metrics
// server's CivetServer from starting). The plugin's own muonps symbols come
// from the binary, which exports them.
#include <cstddef>
#include <cstdio>
#include <memory>
#include <string>

#include "model/backend.h"
#include "optim/orthogonalizer.h"
#include "workers/cuda/cuda_backend.h"
#include "workers/cuda/cuda_orthogonalizer.h"
#include "workers/cuda/cuda_status.h"

namespace {

void Put(const std::string& s, char* out, size_t n) {
  if (out != nullptr && n > 0) std::snprintf(out, n, "%s", s.c_str());
}

}  // namespace

extern "C" {

__attribute__((visibility("default"))) int muonps_cuda_visible_devices(char* why, size_t n) {
  std::string reason;
  const int count = muonps::cuda::VisibleDevices(&reason);
  Put(reason, why, n);
  return count;
}

__attribute__((visibility("default"))) void muonps_cuda_device_description(int count, char* out,
                                                                           size_t n) {
  Put(muonps::cuda::DeviceDescription(count), out, n);
}

// A new backend the caller owns, or null with `error` set.
__attribute__((visibility("default"))) muonps::ComputeBackend* muonps_cuda_create_backend(
    int device, char* error, size_t n) {
  absl::StatusOr<std::unique_ptr<muonps::ComputeBackend>> made =
      muonps::cuda::CreateCudaBackend(device);
  if (!made.ok()) {
    Put(made.status().ToString(), error, n);
    return nullptr;
  }
  return made->release();
}

__attribute__((visibility("default"))) muonps::Orthogonalizer* muonps_cuda_create_orthogonalizer(
    int device, char* error, size_t n) {
  absl::StatusOr<std::unique_ptr<muonps::Orthogonalizer>> made =
      muonps::cuda::CreateCudaOrthogonalizer(device);
  if (!made.ok()) {
    Put(made.status().ToString(), error, n);
    return nullptr;
  }
  return made->release();
}

}  // extern "C"
