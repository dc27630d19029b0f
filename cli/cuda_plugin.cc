#include "cli/cuda_plugin.h"

#include <dlfcn.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>

#include "absl/strings/str_cat.h"

namespace muonps {
namespace {

constexpr char kPluginName[] = "libmuonps_cuda.so";
constexpr size_t kMessage = 512;

std::string PluginPath() {
  if (const char* env = std::getenv("MUONPS_CUDA_PLUGIN"); env != nullptr && *env != '\0') {
    return env;
  }
  std::error_code ec;
  const std::filesystem::path exe = std::filesystem::read_symlink("/proc/self/exe", ec);
  return ec ? std::string(kPluginName) : (exe.parent_path() / kPluginName).string();
}

}  // namespace

absl::StatusOr<const CudaPlugin*> CudaPlugin::Load() {
  static const absl::StatusOr<const CudaPlugin*>* loaded = [] {
    const std::string path = PluginPath();
    std::error_code ec;
    if (!std::filesystem::exists(path, ec)) {
      return new absl::StatusOr<const CudaPlugin*>(absl::FailedPreconditionError(absl::StrCat(
          "no CUDA plugin at ", path,
          " (this build has no CUDA target: nvcc was not found when it was configured)")));
    }
    void* handle = dlopen(path.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (handle == nullptr) {
      return new absl::StatusOr<const CudaPlugin*>(
          absl::FailedPreconditionError(absl::StrCat("cannot load ", path, ": ", dlerror())));
    }
    auto* plugin = new CudaPlugin();
    plugin->visible_devices_ =
        reinterpret_cast<int (*)(char*, size_t)>(dlsym(handle, "muonps_cuda_visible_devices"));
    plugin->device_description_ = reinterpret_cast<void (*)(int, char*, size_t)>(
        dlsym(handle, "muonps_cuda_device_description"));
    plugin->create_backend_ = reinterpret_cast<ComputeBackend* (*)(int, char*, size_t)>(
        dlsym(handle, "muonps_cuda_create_backend"));
    plugin->create_orthogonalizer_ = reinterpret_cast<Orthogonalizer* (*)(int, char*, size_t)>(
        dlsym(handle, "muonps_cuda_create_orthogonalizer"));
    if (plugin->visible_devices_ == nullptr || plugin->device_description_ == nullptr ||
        plugin->create_backend_ == nullptr || plugin->create_orthogonalizer_ == nullptr) {
      delete plugin;
      return new absl::StatusOr<const CudaPlugin*>(absl::FailedPreconditionError(
          absl::StrCat(path, " lacks the muonps_cuda_* entry points")));
    }
    return new absl::StatusOr<const CudaPlugin*>(plugin);
  }();
  return *loaded;
}

int CudaPlugin::VisibleDevices(std::string* why) const {
  char message[kMessage] = {0};
  const int count = visible_devices_(message, sizeof(message));
  if (why != nullptr) *why = message;
  return count;
}

std::string CudaPlugin::DeviceDescription(int count) const {
  char out[kMessage] = {0};
  device_description_(count, out, sizeof(out));
  return out;
}

absl::StatusOr<std::unique_ptr<ComputeBackend>> CudaPlugin::CreateBackend(int device) const {
  char error[kMessage] = {0};
  ComputeBackend* made = create_backend_(device, error, sizeof(error));
  if (made == nullptr) return absl::UnavailableError(error);
  return std::unique_ptr<ComputeBackend>(made);
}

absl::StatusOr<std::unique_ptr<Orthogonalizer>> CudaPlugin::CreateOrthogonalizer(int device) const {
  char error[kMessage] = {0};
  Orthogonalizer* made = create_orthogonalizer_(device, error, sizeof(error));
  if (made == nullptr) return absl::UnavailableError(error);
  return std::unique_ptr<Orthogonalizer>(made);
}

}  // namespace muonps
