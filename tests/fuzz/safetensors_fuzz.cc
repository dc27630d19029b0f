// Fuzz target: a safetensors file (common/safetensors.h), as a checkpoint
// reader opens it. The input is the whole file. Any input must give a
// status, never a crash; in a file that is accepted every listed tensor has
// a shape and a dtype, and reading it with its own shape succeeds exactly
// when it is F32.
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/safetensors.h"

namespace {

void Fail(const char* what, const std::string& name) {
  std::fprintf(stderr, "tensor '%s': %s\n", name.c_str(), what);
  std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  absl::StatusOr<muonps::SafetensorsFile> file = muonps::SafetensorsFile::Parse(
      std::string(reinterpret_cast<const char*>(data), size), "fuzz.safetensors");
  if (!file.ok()) return 0;

  for (const std::string& name : file->names()) {
    if (!file->contains(name)) Fail("listed but not contained", name);
    const absl::StatusOr<std::vector<int64_t>> shape = file->shape(name);
    const absl::StatusOr<std::string> dtype = file->dtype(name);
    if (!shape.ok() || !dtype.ok()) Fail("listed but has no shape or dtype", name);
    // The data buffer holds every tensor, so the count fits in memory.
    size_t count = 1;
    for (int64_t d : *shape) count *= static_cast<size_t>(d);
    std::vector<float> out(count);
    const absl::Status read = file->ReadInto(name, *shape, out.data());
    if (read.ok() != (*dtype == "F32")) Fail("ReadInto disagrees with the dtype", name);
    if (!read.ok() && !absl::IsInvalidArgument(read)) Fail("ReadInto: unexpected error", name);
    // A wrong expected shape is refused, never read.
    std::vector<int64_t> other = *shape;
    other.push_back(1);
    if (file->ReadInto(name, other, out.data()).ok()) Fail("read under a wrong shape", name);
  }
  if (file->contains("__metadata__")) Fail("metadata listed as a tensor", "__metadata__");
  return 0;
}
