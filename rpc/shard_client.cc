#include "rpc/shard_client.h"

#include <grpcpp/impl/rpc_method.h>
#include <grpcpp/support/byte_buffer.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <grpcpp/support/sync_stream.h>

#include <algorithm>
#include <memory>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "rpc/auth.h"
#include "rpc/rpc_util.h"
#include "rpc/tensor_stream.h"
#include "rpc/wire.h"

namespace muonps {
namespace {

constexpr char kPushMethod[] = "/muonps.v1.ShardService/PushGradients";
constexpr char kPullMethod[] = "/muonps.v1.ShardService/PullParameters";

}  // namespace

absl::Status PushGradients(grpc::ChannelInterface* channel, const ModelLayout& layout,
                           const std::vector<std::string>& tensors, const PushTarget& target,
                           const float* grads, TransferDtype dtype, int64_t chunk_bytes,
                           const std::string& what, v1::PushGradientsResponse* response,
                           const std::function<bool(const TensorInfo&)>& ready) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(300.0));
  if (!target.job_key.empty()) context.AddMetadata(kJobKeyHeader, target.job_key);
  v1::PushGradientsResponse local;
  if (response == nullptr) response = &local;
  const grpc::internal::RpcMethod method(kPushMethod, grpc::internal::RpcMethod::CLIENT_STREAMING);
  std::unique_ptr<grpc::ClientWriter<grpc::ByteBuffer>> writer(
      grpc::internal::ClientWriterFactory<grpc::ByteBuffer>::Create(channel, method, &context,
                                                                    response));
  // The request's own fields travel in the first message only.
  std::string top =
      EncodePushFields({target.job_id, target.step, target.first_slot, target.slot_count});
  const int64_t element = ElementBytes(dtype);
  const int64_t step = ChunkPayloadBytes(chunk_bytes, dtype);
  // BF16 chunks, each rounded just before it is written; the messages point
  // into this buffer, which outlives the call's writes.
  // It holds only this push's tensors, one after another.
  std::vector<uint16_t> encoded;
  if (dtype == TransferDtype::kBF16) {
    int64_t numel = 0;
    for (const std::string& name : tensors) {
      const TensorInfo* info = layout.Find(name);
      if (info != nullptr && info->trainable()) numel += info->numel;
    }
    encoded.resize(static_cast<size_t>(numel));
  }
  int64_t encoded_at = 0;  // where the next tensor's bf16 values go
  bool open = true;
  for (const std::string& name : tensors) {
    const TensorInfo* info = layout.Find(name);
    if (info == nullptr || !info->trainable()) continue;
    if (ready && !ready(*info)) {
      // Cancelled with at least this tensor unsent: the shard refuses an
      // incomplete push, so nothing of it is counted.
      context.TryCancel();
      (void)writer->Finish();
      return absl::CancelledError(
          absl::StrCat(what, ": abandoned before tensor ", name, " (its gradient never came)"));
    }
    const char* data = reinterpret_cast<const char*>(grads + info->offset);
    uint16_t* bf16 = nullptr;
    if (dtype == TransferDtype::kBF16) {
      bf16 = encoded.data() + encoded_at;
      encoded_at += info->numel;
      data = reinterpret_cast<const char*>(bf16);
    }
    const int64_t total = info->numel * element;
    int64_t offset = 0;
    do {
      const int64_t bytes = std::min(step, total - offset);
      if (bf16 != nullptr) {
        const int64_t first = offset / element;
        EncodeBf16(grads + info->offset + first, bytes / element, bf16 + first);
      }
      const std::string header =
          EncodeChunkHeader(name, offset == 0 ? &info->shape : nullptr, offset, dtype);
      open = writer->Write(ChunkMessage(top, v1::PushGradientsRequest::kChunkFieldNumber, header,
                                        data + offset, bytes));
      top.clear();
      offset += bytes;
    } while (open && offset < total);
    if (!open) break;
  }
  writer->WritesDone();
  return FromGrpcStatus(writer->Finish(), what);
}

namespace {

// Decodes one PullParametersResponse from `buffer`, copying the payload of
// its chunk straight into place through `assemblers` (created on a tensor's
// first chunk).
absl::Status DecodePull(grpc::ByteBuffer* buffer, const ModelLayout& layout, float* params,
                        TransferDtype dtype, std::unique_ptr<TensorAssembler>* current,
                        int* received, const std::string& what,
                        const std::function<void(const TensorInfo&)>& on_tensor) {
  grpc::ProtoBufferReader stream(buffer);
  // Where `bytes` of the chunk described by `header` go (a new tensor starts
  // a new assembler).
  auto place = [&](const v1::TensorChunk& header, int64_t bytes) -> absl::StatusOr<char*> {
    if (*current == nullptr || header.name() != (*current)->name()) {
      if (*current != nullptr) {
        MUONPS_RETURN_IF_ERROR((*current)->Finish());
        if (on_tensor) on_tensor(*layout.Find((*current)->name()));
      }
      const TensorInfo* info = layout.Find(header.name());
      if (info == nullptr) {
        return absl::InvalidArgumentError(absl::StrCat(what, ": unknown tensor ", header.name()));
      }
      *current = std::make_unique<TensorAssembler>(
          header.name(), info->shape, params + info->offset, /*require_finite=*/true, dtype);
      ++*received;
    }
    return (*current)->Reserve(header, bytes);
  };
  // A tensor is reported as soon as its last byte is in (a shard may send
  // the next one only much later, when it has been updated).
  auto commit = [&](int64_t bytes) -> absl::Status {
    MUONPS_RETURN_IF_ERROR((*current)->Commit(bytes));
    if ((*current)->complete()) {
      if (on_tensor) on_tensor(*layout.Find((*current)->name()));
      current->reset();
    }
    return absl::OkStatus();
  };
  return muonps::DecodePull(&stream, place, commit, what);
}

}  // namespace

absl::Status PullParameters(grpc::ChannelInterface* channel, const ModelLayout& layout,
                            const std::string& job_id, const std::string& job_key, int64_t version,
                            int expected, double wait_seconds, int64_t chunk_bytes, float* params,
                            const std::string& what, TransferDtype dtype,
                            const std::function<void(const TensorInfo&)>& on_tensor) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(wait_seconds + 60.0));
  if (!job_key.empty()) context.AddMetadata(kJobKeyHeader, job_key);
  v1::PullParametersRequest request;
  request.set_job_id(job_id);
  request.set_version(version);
  request.set_wait_seconds(wait_seconds);
  request.set_max_chunk_bytes(chunk_bytes);
  const grpc::internal::RpcMethod method(kPullMethod, grpc::internal::RpcMethod::SERVER_STREAMING);
  std::unique_ptr<grpc::ClientReader<grpc::ByteBuffer>> reader(
      grpc::internal::ClientReaderFactory<grpc::ByteBuffer>::Create(channel, method, &context,
                                                                    request));
  grpc::ByteBuffer buffer;
  std::unique_ptr<TensorAssembler> current;
  int received = 0;
  absl::Status st;
  while (reader->Read(&buffer)) {
    if (!st.ok()) continue;  // drain after a refusal
    st = DecodePull(&buffer, layout, params, dtype, &current, &received, what, on_tensor);
  }
  MUONPS_RETURN_IF_ERROR(FromGrpcStatus(reader->Finish(), what));
  MUONPS_RETURN_IF_ERROR(st);
  if (current != nullptr) {
    MUONPS_RETURN_IF_ERROR(current->Finish());
    if (on_tensor) on_tensor(*layout.Find(current->name()));
  }
  if (received != expected) {
    return absl::DataLossError(
        absl::StrCat(what, ": received ", received, " tensors, expected ", expected));
  }
  return absl::OkStatus();
}

}  // namespace muonps
