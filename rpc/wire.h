// Reading TensorChunk messages straight off gRPC's receive buffers, with the
// payload copied once into its final place instead of into a protobuf string
// first. Used where the payload is large: a worker's pulls and a shard's
// pushes. The bytes are the messages of tensor.proto / shard.proto.
#ifndef MUONPS_RPC_WIRE_H_
#define MUONPS_RPC_WIRE_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "google/protobuf/io/coded_stream.h"
#include "grpcpp/support/byte_buffer.h"
#include "muonps/v1/tensor.pb.h"

namespace muonps {

// Where `bytes` of payload of the chunk described by `header` (every field
// but data) go, or why they are refused.
using PlaceChunk =
    std::function<absl::StatusOr<char*>(const v1::TensorChunk& header, int64_t bytes)>;
// Called once the payload was copied to where PlaceChunk said.
using CommitChunk = std::function<absl::Status(int64_t bytes)>;

// Reads one TensorChunk of `length` bytes from `in`. The data field is
// expected last (protobuf writes fields in number order); a chunk without
// one is placed with 0 bytes. Errors from `place` or `commit` come back as
// they are; malformed bytes are DATA_LOSS naming `what`.
absl::Status ReadChunk(google::protobuf::io::CodedInputStream* in, uint32_t length,
                       const PlaceChunk& place, const CommitChunk& commit, const std::string& what);

// The encoded fields of a TensorChunk other than `data` (shape only when
// given: the first chunk of a tensor carries it).
std::string EncodeChunkHeader(const std::string& name, const std::vector<int64_t>* shape,
                              int64_t offset);

// One message whose own fields are `prefix` (already encoded) followed by
// field `chunk_field`: a TensorChunk of `chunk_header` and a payload of
// `bytes` at `data`. The payload is referenced, not copied: it must stay
// unchanged until the message has been sent.
grpc::ByteBuffer ChunkMessage(const std::string& prefix, int chunk_field,
                              const std::string& chunk_header, const char* data, int64_t bytes);

}  // namespace muonps

#endif  // MUONPS_RPC_WIRE_H_
