// The GPU path of the muonps binary, loaded on demand: libmuonps_cuda.so
// (workers/cuda/plugin.cc), found through $MUONPS_CUDA_PLUGIN or next to
// the executable. A build without CUDA has no plugin; a process asked for
// --device cuda then says so.
#ifndef MUONPS_CLI_CUDA_PLUGIN_H_
#define MUONPS_CLI_CUDA_PLUGIN_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "model/backend.h"
#include "optim/orthogonalizer.h"

namespace muonps {

class CudaPlugin {
 public:
  // Loads the plugin once per process; later calls return the same result.
  static absl::StatusOr<const CudaPlugin*> Load();

  // Usable devices (0 with `why` set when none).
  int VisibleDevices(std::string* why) const;
  // NumericsProfile.device for `count` devices.
  std::string DeviceDescription(int count) const;
  absl::StatusOr<std::unique_ptr<ComputeBackend>> CreateBackend(int device) const;
  absl::StatusOr<std::unique_ptr<Orthogonalizer>> CreateOrthogonalizer(int device) const;

 private:
  int (*visible_devices_)(char*, size_t) = nullptr;
  void (*device_description_)(int, char*, size_t) = nullptr;
  ComputeBackend* (*create_backend_)(int, char*, size_t) = nullptr;
  Orthogonalizer* (*create_orthogonalizer_)(int, char*, size_t) = nullptr;
};

}  // namespace muonps

#endif  // MUONPS_CLI_CUDA_PLUGIN_H_
