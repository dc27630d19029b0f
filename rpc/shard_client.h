// The client side of a shard's tensor streams, shared by workers and the
// transfer benchmark: one PushGradients stream carrying a gradient for each
// named tensor, and one PullParameters stream assembled into place.
//
// Both speak the messages of shard.proto on the wire but skip protobuf's
// copies of the payload: a push sends each chunk as a small encoded header
// followed by a slice that points at the gradient itself, and a pull decodes
// each response in place, copying the payload once, from gRPC's buffers
// straight into the parameters.
#ifndef MUONPS_RPC_SHARD_CLIENT_H_
#define MUONPS_RPC_SHARD_CLIENT_H_

#include <cstdint>
#include <functional>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "common/bf16.h"
#include "common/model_layout.h"
#include "muonps/v1/shard.grpc.pb.h"

namespace muonps {

struct PushTarget {
  std::string job_id;
  std::string job_key;  // sent as metadata x-muonps-job-key (rpc/auth.h)
  int64_t step = 0;
  int first_slot = 0;
  int slot_count = 1;
};

// Pushes, for every trainable tensor among `tensors`, its gradient taken from
// the flat float32 buffer `grads` (layout offsets), in chunks of
// `chunk_bytes` of `dtype` (the job's transfer.dtype). BF16 chunks are
// rounded one at a time just before they are written, so the rounding of
// the next overlaps the sending of the last. `grads` must stay unchanged
// until the call returns.
// `what` prefixes errors (e.g. "shard shard-0 (host:port): PushGradients").
// Tensors are sent in the order of `tensors`. `ready`, when set, is called
// before each tensor's first chunk is read from `grads` and may block until
// that gradient is final (the stream stays open meanwhile); when it returns
// false the call is cancelled before the push is complete, so the shard
// counts none of it, and CANCELLED is returned.
absl::Status PushGradients(grpc::ChannelInterface* channel, const ModelLayout& layout,
                           const std::vector<std::string>& tensors, const PushTarget& target,
                           const float* grads, TransferDtype dtype, int64_t chunk_bytes,
                           const std::string& what, v1::PushGradientsResponse* response = nullptr,
                           const std::function<bool(const TensorInfo&)>& ready = nullptr);

// Pulls every tensor the shard owns at `version` (waiting up to
// `wait_seconds` for it) into the flat buffer `params` at layout offsets,
// checking names, shapes, dtype (`dtype`: the job's transfer.dtype; BF16 is
// widened to float32), order and finiteness; DATA_LOSS unless exactly
// `expected` tensors came. On an error, `params` may hold part of the pull.
// `on_tensor`, when set, is called on the calling thread with each tensor
// once it is complete and checked in `params` (the stream goes on), so that
// a consumer may start on it before the pull ends.
absl::Status PullParameters(grpc::ChannelInterface* channel, const ModelLayout& layout,
                            const std::string& job_id, const std::string& job_key, int64_t version,
                            int expected, double wait_seconds, int64_t chunk_bytes, float* params,
                            const std::string& what, TransferDtype dtype = TransferDtype::kF32,
                            const std::function<void(const TensorInfo&)>& on_tensor = nullptr);

}  // namespace muonps

#endif  // MUONPS_RPC_SHARD_CLIENT_H_
