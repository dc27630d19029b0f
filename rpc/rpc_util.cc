#include "rpc/rpc_util.h"

#include "absl/strings/str_cat.h"
#include "rpc/security.h"

namespace muonps {

grpc::Status ToGrpcStatus(const absl::Status& status) {
  if (status.ok()) return grpc::Status::OK;
  return grpc::Status(static_cast<grpc::StatusCode>(status.code()), std::string(status.message()));
}

grpc::Status Refuse(absl::StatusCode code, const std::string& message) {
  return ToGrpcStatus(absl::Status(code, message));
}

absl::Status FromGrpcStatus(const grpc::Status& status, const std::string& what) {
  if (status.ok()) return absl::OkStatus();
  return absl::Status(
      static_cast<absl::StatusCode>(status.error_code()),
      what.empty() ? status.error_message() : absl::StrCat(what, ": ", status.error_message()));
}

void TuneTransport(grpc::ChannelArguments* args) {
  // Tensor streams move tens of MiB: a large HTTP/2 window and reads in
  // large pieces keep the sender from stalling on flow control.
  args->SetInt(GRPC_ARG_HTTP2_STREAM_LOOKAHEAD_BYTES, 16 << 20);
  args->SetInt(GRPC_ARG_TCP_MIN_READ_CHUNK_SIZE, 1 << 20);
  args->SetInt(GRPC_ARG_TCP_MAX_READ_CHUNK_SIZE, 8 << 20);
}

std::shared_ptr<grpc::Channel> MakeChannel(const std::string& address) {
  grpc::ChannelArguments args;
  args.SetMaxReceiveMessageSize(16 << 20);
  args.SetMaxSendMessageSize(16 << 20);
  // Every channel its own connection: a worker's pushes to a shard do not
  // queue behind another component's calls in the same process.
  args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
  TuneTransport(&args);
  AddTransportChannelArguments(&args);
  return grpc::CreateCustomChannel(address, ChannelTransportCredentials(), args);
}

std::chrono::system_clock::time_point DeadlineIn(double seconds) {
  return std::chrono::system_clock::now() +
         std::chrono::microseconds(static_cast<int64_t>(seconds * 1e6));
}

}  // namespace muonps
