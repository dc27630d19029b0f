// Reading and writing the safetensors format (Hugging Face), F32 tensors.
//
// Layout: an 8-byte little-endian u64 header length N; N bytes of JSON,
//   {"__metadata__": {str: str}, "<name>": {"dtype": "F32", "shape": [..],
//    "data_offsets": [begin, end]}, ...}
// padded with spaces; then the raw little-endian data buffer, with offsets
// relative to its start. Reading applies the same checks as the Python
// `safetensors` package (tensors tile the data buffer exactly), and writing
// uses its layout (metadata first, header padded to a multiple of 8 bytes).
#ifndef MUONPS_COMMON_SAFETENSORS_H_
#define MUONPS_COMMON_SAFETENSORS_H_

#include <cstdint>
#include <map>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace muonps {

// A float32 tensor to write. `data` holds product(shape) values (1 for an
// empty shape, a scalar) and is borrowed: it must outlive the write.
struct TensorRef {
  std::string name;
  std::vector<int64_t> shape;
  const float* data;
};

// Writes `tensors` to `path` in the given order, contiguous, with the
// metadata (omitted from the header when empty), atomically (see
// common/atomic_file.h). The tensor data is written straight from the
// callers' buffers: the only extra memory is the header.
// InvalidArgument for a duplicate or reserved name ("__metadata__"), an empty
// name, a negative dimension or a null `data` with a nonzero size.
absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorRef>& tensors,
                              const std::map<std::string, std::string>& metadata);

// A safetensors file held in memory, validated when opened. Immutable after
// Open, so const methods may be called from several threads at once.
class SafetensorsFile {
 public:
  // Reads the whole file and validates it: the header length against the
  // file size, the JSON, every entry's dtype, shape and data offsets (in
  // range, matching shape x dtype size, contiguous without overlap, covering
  // the data buffer exactly). NotFound when the file does not exist,
  // InvalidArgument (naming the file and, where relevant, the tensor) for a
  // malformed file.
  static absl::StatusOr<SafetensorsFile> Open(const std::string& path);

  // The same validation over `bytes`, the whole content of a safetensors
  // file already in memory (Open reads the file and calls this). `path` only
  // names the file in error messages and in the errors of later calls.
  static absl::StatusOr<SafetensorsFile> Parse(std::string bytes, std::string path);

  // Tensor names in file order (by data offset).
  std::vector<std::string> names() const { return order_; }
  // The `__metadata__` map (empty when the header has none).
  const std::map<std::string, std::string>& metadata() const { return metadata_; }
  bool contains(const std::string& name) const { return entries_.count(name) != 0; }
  // The shape of tensor `name`; NotFound when absent.
  absl::StatusOr<std::vector<int64_t>> shape(const std::string& name) const;
  // The dtype string of tensor `name` ("F32", "BF16", ...); NotFound when absent.
  absl::StatusOr<std::string> dtype(const std::string& name) const;

  // Copies tensor `name` into out[0..product(expected_shape)). NotFound for a
  // missing tensor; InvalidArgument for a dtype other than F32 or a shape
  // other than `expected_shape`. Messages name the tensor and the file.
  absl::Status ReadInto(const std::string& name, const std::vector<int64_t>& expected_shape,
                        float* out) const;

 private:
  struct Entry {
    std::string dtype;
    std::vector<int64_t> shape;
    uint64_t begin = 0;  // byte offsets into the data buffer
    uint64_t end = 0;
  };

  SafetensorsFile() = default;

  std::string path_;
  std::string bytes_;        // the whole file
  uint64_t data_start_ = 0;  // offset of the data buffer in bytes_
  std::map<std::string, Entry> entries_;
  std::vector<std::string> order_;
  std::map<std::string, std::string> metadata_;
};

}  // namespace muonps

#endif  // MUONPS_COMMON_SAFETENSORS_H_
