// Splitting tensors into TensorChunk messages and putting them back together,
// with every check a server needs before it lets received bytes near its
// state: known name, expected shape and dtype, chunks in order and within
// bounds, the tensor exactly covered, and (for gradients) finite values.
#ifndef MUONPS_RPC_TENSOR_STREAM_H_
#define MUONPS_RPC_TENSOR_STREAM_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/bf16.h"
#include "muonps/v1/tensor.pb.h"

namespace muonps {

// Default chunk payload: 1 MiB.
inline constexpr int64_t kDefaultChunkBytes = 1 << 20;

// Calls `emit` with consecutive chunks of the float32 tensor (name, shape,
// data), each carrying at most `max_chunk_bytes` (rounded down to whole
// floats, at least one) of data; the first chunk carries the shape. A tensor
// with no elements is one empty chunk. Stops and returns false as soon as
// `emit` returns false (e.g. a closed stream).
bool SplitTensor(const std::string& name, const std::vector<int64_t>& shape, const float* data,
                 int64_t max_chunk_bytes, const std::function<bool(const v1::TensorChunk&)>& emit);
// Payload bytes per chunk for a limit of `max_chunk_bytes`: rounded down to
// whole floats, at least one. Every sender chunks tensors this way.
int64_t ChunkPayloadBytes(int64_t max_chunk_bytes);
// The same for elements of `dtype` (whole elements, at least one).
int64_t ChunkPayloadBytes(int64_t max_chunk_bytes, TransferDtype dtype);

// Index of the first NaN or Inf among `count` floats at `bytes` (any
// alignment), or -1. Branch-free over blocks, so it runs at memory speed.
int64_t FirstNonFinite(const char* bytes, int64_t count);

// Receives the chunks of one tensor into a caller-provided float32 buffer.
// The chunks carry `dtype` (offsets and sizes count its bytes); BF16 values
// are widened to float32 as they are committed.
class TensorAssembler {
 public:
  // `out` holds numel(expected_shape) floats and must outlive the assembler.
  // With require_finite, NaN or Inf values are refused.
  TensorAssembler(std::string name, std::vector<int64_t> expected_shape, float* out,
                  bool require_finite, TransferDtype dtype = TransferDtype::kF32);

  // Takes the next chunk. INVALID_ARGUMENT naming the tensor and the field
  // for a wrong name, shape or dtype, an out-of-order or out-of-bounds offset,
  // a ragged payload, or a non-finite value; nothing is written into `out`
  // for a refused chunk.
  absl::Status Add(const v1::TensorChunk& chunk);

  // The same in two halves, for a caller that copies the payload itself:
  // Reserve checks a chunk's header (`header.data` is ignored) for `bytes`
  // of payload and returns where they go (for BF16, a staging buffer of the
  // assembler's); Commit then checks the copied values (finiteness), widens
  // them into `out` and counts them. After a refused Commit the region may
  // hold the refused values.
  absl::StatusOr<char*> Reserve(const v1::TensorChunk& header, int64_t bytes);
  absl::Status Commit(int64_t bytes);

  const std::string& name() const { return name_; }
  // Elements received so far: the next chunk's values land at out + this.
  int64_t received_elements() const { return received_ / ElementBytes(dtype_); }
  // True once every byte has arrived.
  bool complete() const { return received_ == total_bytes_; }
  // INVALID_ARGUMENT unless complete (for a stream that ended early).
  absl::Status Finish() const;

 private:
  std::string name_;
  std::vector<int64_t> shape_;
  float* out_;
  bool require_finite_;
  TransferDtype dtype_;
  std::vector<uint16_t> staging_;  // BF16 payload before it is widened
  int64_t total_bytes_ = 0;
  int64_t received_ = 0;
};

}  // namespace muonps

#endif  // MUONPS_RPC_TENSOR_STREAM_H_
