// The hand-written wire format of the large tensor messages: every encoding
// and decoding of PushGradientsRequest and PullParametersResponse that does
// not go through protobuf's generated classes lives here. Payloads are read
// straight off gRPC's receive buffers and copied once into their final place
// instead of into a protobuf string first; on the way out they are
// referenced, not copied. Field numbers come from the generated code. The
// bytes are the messages of tensor.proto / shard.proto, so a client that
// uses the generated classes interoperates.
//
// Every decoder treats its input as hostile: lengths are checked against
// the bytes that remain before anything is placed, and malformed input is a
// status, never a crash.
#ifndef MUONPS_RPC_WIRE_H_
#define MUONPS_RPC_WIRE_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "common/bf16.h"
#include "google/protobuf/io/coded_stream.h"
#include "google/protobuf/io/zero_copy_stream.h"
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
// they are; malformed bytes are `malformed` (DATA_LOSS for what a shard
// sent, INVALID_ARGUMENT for what a client sent) naming `what`.
absl::Status ReadChunk(google::protobuf::io::CodedInputStream* in, uint32_t length,
                       const PlaceChunk& place, const CommitChunk& commit, const std::string& what,
                       absl::StatusCode malformed = absl::StatusCode::kDataLoss);

// The encoded fields of a TensorChunk other than `data` (shape only when
// given: the first chunk of a tensor carries it); dtype is DtypeName(dtype).
std::string EncodeChunkHeader(const std::string& name, const std::vector<int64_t>* shape,
                              int64_t offset, TransferDtype dtype = TransferDtype::kF32);

// One message whose own fields are `prefix` (already encoded) followed by
// field `chunk_field`: a TensorChunk of `chunk_header` and a payload of
// `bytes` at `data`. The payload is referenced, not copied: it must stay
// unchanged until the message has been sent.
grpc::ByteBuffer ChunkMessage(const std::string& prefix, int chunk_field,
                              const std::string& chunk_header, const char* data, int64_t bytes);

// The request's own fields of a PushGradientsRequest (everything but chunk).
struct PushFields {
  std::string job_id;
  int64_t step = 0;
  int32_t slot = 0;
  int32_t slot_count = 0;
};

// The encoded PushGradientsRequest fields of `fields` (unset when zero or
// empty, as protobuf writes them): the prefix of a push's first message.
std::string EncodePushFields(const PushFields& fields);

// Called with a push message's own fields before its first chunk is read, or
// at the end of a message that has no chunk (has_chunk false). A non-OK
// status stops the decoding and is returned as is.
using BeginPush = std::function<absl::Status(const PushFields& fields, bool has_chunk)>;

// Decodes one PushGradientsRequest message from `in`: its own fields go to
// `begin`, each chunk's payload through `place` and `commit` (see
// ReadChunk). Malformed bytes are INVALID_ARGUMENT.
absl::Status DecodePush(google::protobuf::io::ZeroCopyInputStream* in, const BeginPush& begin,
                        const PlaceChunk& place, const CommitChunk& commit);

// The encoded `version` field of a PullParametersResponse (empty for 0): the
// prefix of every message of a pull.
std::string EncodePullVersion(int64_t version);

// Decodes one PullParametersResponse message from `in`: each chunk's payload
// goes through `place` and `commit`; the version field is skipped (the
// caller asked for it). Malformed bytes are DATA_LOSS naming `what`.
absl::Status DecodePull(google::protobuf::io::ZeroCopyInputStream* in, const PlaceChunk& place,
                        const CommitChunk& commit, const std::string& what);

}  // namespace muonps

#endif  // MUONPS_RPC_WIRE_H_
