#include "services/transfer/shard_client.h"

#include <memory>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "services/server/rpc_util.h"
#include "services/transfer/tensor_stream.h"

namespace muonps {

absl::Status PushGradients(v1::ShardService::Stub* stub, const ModelLayout& layout,
                           const std::vector<std::string>& tensors, const PushTarget& target,
                           const float* grads, int64_t chunk_bytes, const std::string& what,
                           v1::PushGradientsResponse* response) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(300.0));
  v1::PushGradientsResponse local;
  if (response == nullptr) response = &local;
  std::unique_ptr<grpc::ClientWriter<v1::PushGradientsRequest>> writer =
      stub->PushGradients(&context, response);
  // One message reused for every chunk: its buffers are allocated once.
  v1::PushGradientsRequest message;
  message.set_job_id(target.job_id);
  message.set_step(target.step);
  message.set_slot(target.first_slot);
  message.set_slot_count(target.slot_count);
  for (const std::string& name : tensors) {
    const TensorInfo* info = layout.Find(name);
    if (info == nullptr || !info->trainable()) continue;
    const bool open = SplitTensorInto(name, info->shape, grads + info->offset, chunk_bytes,
                                      message.mutable_chunk(), [&] {
                                        const bool ok = writer->Write(message);
                                        // The header travels in the first message only.
                                        message.clear_job_id();
                                        message.clear_step();
                                        message.clear_slot();
                                        message.clear_slot_count();
                                        return ok;
                                      });
    if (!open) break;
  }
  writer->WritesDone();
  return FromGrpcStatus(writer->Finish(), what);
}

absl::Status PullParameters(v1::ShardService::Stub* stub, const ModelLayout& layout,
                            const std::string& job_id, int64_t version, int expected,
                            double wait_seconds, int64_t chunk_bytes, float* params,
                            const std::string& what) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(wait_seconds + 60.0));
  v1::PullParametersRequest request;
  request.set_job_id(job_id);
  request.set_version(version);
  request.set_wait_seconds(wait_seconds);
  request.set_max_chunk_bytes(chunk_bytes);
  std::unique_ptr<grpc::ClientReader<v1::PullParametersResponse>> reader =
      stub->PullParameters(&context, request);
  v1::PullParametersResponse message;
  std::unique_ptr<TensorAssembler> current;
  std::string name;
  int received = 0;
  absl::Status st;
  while (reader->Read(&message)) {
    if (!st.ok()) continue;  // drain after a refusal
    const v1::TensorChunk& chunk = message.chunk();
    if (current == nullptr || chunk.name() != name) {
      if (current != nullptr && !(st = current->Finish()).ok()) continue;
      const TensorInfo* info = layout.Find(chunk.name());
      if (info == nullptr) {
        st = absl::InvalidArgumentError(absl::StrCat(what, ": unknown tensor ", chunk.name()));
        continue;
      }
      name = chunk.name();
      current = std::make_unique<TensorAssembler>(name, info->shape, params + info->offset,
                                                  /*require_finite=*/true);
      ++received;
    }
    st = current->Add(chunk);
  }
  MUONPS_RETURN_IF_ERROR(FromGrpcStatus(reader->Finish(), what));
  MUONPS_RETURN_IF_ERROR(st);
  if (current != nullptr) MUONPS_RETURN_IF_ERROR(current->Finish());
  if (received != expected) {
    return absl::DataLossError(
        absl::StrCat(what, ": received ", received, " tensors, expected ", expected));
  }
  return absl::OkStatus();
}

}  // namespace muonps
