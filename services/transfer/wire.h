// Reading TensorChunk messages straight off gRPC's receive buffers, with the
// payload copied once into its final place instead of into a protobuf string
// first. Used where the payload is large: a worker's pulls and a shard's
// pushes. The bytes are the messages of tensor.proto / shard.proto.
#ifndef MUONPS_SERVICES_TRANSFER_WIRE_H_
#define MUONPS_SERVICES_TRANSFER_WIRE_H_

#include <cstdint>
#include <functional>
#include <string>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "google/protobuf/io/coded_stream.h"
#include "muonps/v1/tensor.pb.h"

namespace muonps {

// Where `bytes` of payload of the chunk described by `header` (every field
// but data) go, or why they are refused.
using PlaceChunk = std::function<absl::StatusOr<char*>(const v1::TensorChunk& header, int64_t bytes)>;
// Called once the payload was copied to where PlaceChunk said.
using CommitChunk = std::function<absl::Status(int64_t bytes)>;

// Reads one TensorChunk of `length` bytes from `in`. The data field is
// expected last (protobuf writes fields in number order); a chunk without
// one is placed with 0 bytes. Errors from `place` or `commit` come back as
// they are; malformed bytes are DATA_LOSS naming `what`.
absl::Status ReadChunk(google::protobuf::io::CodedInputStream* in, uint32_t length,
                       const PlaceChunk& place, const CommitChunk& commit,
                       const std::string& what);

}  // namespace muonps

#endif  // MUONPS_SERVICES_TRANSFER_WIRE_H_
