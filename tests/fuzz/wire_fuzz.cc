// Fuzz target: the hand-written decoders of the large tensor messages
// (rpc/wire.h), as a shard reads a PushGradientsRequest and a worker reads a
// PullParametersResponse, with every chunk placed by a TensorAssembler
// (rpc/tensor_stream.h) into buffers of a small fixed layout.
//
// Input: byte 0 chooses the message (bit 0: 0 push, 1 pull) and the size of
// the blocks the stream hands out (bits 1-7: 0 for one block, else that many
// bytes, as gRPC hands a message over in slices); the rest is the message.
// Any input must give a status, never a crash or a write outside the
// buffers (each is a heap block of exactly the tensor's size, so ASan sees
// any overrun).
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "muonps/v1/tensor.pb.h"
#include "rpc/tensor_stream.h"
#include "rpc/wire.h"

namespace {

// The layout the chunks are assembled into: a matrix, a vector, a scalar
// and an empty tensor.
struct LayoutTensor {
  const char* name;
  std::vector<int64_t> shape;
};
const std::vector<LayoutTensor>& Layout() {
  static const auto* layout =
      new std::vector<LayoutTensor>{{"w", {2, 3}}, {"b", {5}}, {"s", {}}, {"e", {0, 4}}};
  return *layout;
}

// One tensor's destination: a heap block of exactly numel floats (none for
// an empty tensor, as a caller with nothing to receive may pass null).
struct Destination {
  std::unique_ptr<float[]> buffer;
  std::unique_ptr<muonps::TensorAssembler> assembler;
};

// Places chunks the way the shard's push session and the worker's pull do:
// one assembler per tensor, created on its first chunk, and payload bytes
// committed to the assembler that placed them.
class Receiver {
 public:
  explicit Receiver(bool require_finite) : require_finite_(require_finite) {}

  absl::StatusOr<char*> Place(const muonps::v1::TensorChunk& header, int64_t bytes) {
    Destination* d = Find(header.name());
    if (d == nullptr) return absl::NotFoundError("unknown tensor " + header.name());
    current_ = d->assembler.get();
    return current_->Reserve(header, bytes);
  }

  absl::Status Commit(int64_t bytes) {
    if (current_ == nullptr) std::abort();  // a commit without a placed chunk
    return current_->Commit(bytes);
  }

  void Finish() {
    for (auto& [name, d] : destinations_) (void)d.assembler->Finish();
  }

 private:
  Destination* Find(const std::string& name) {
    auto it = destinations_.find(name);
    if (it != destinations_.end()) return &it->second;
    for (const LayoutTensor& t : Layout()) {
      if (name != t.name) continue;
      int64_t numel = 1;
      for (int64_t d : t.shape) numel *= d;
      Destination& d = destinations_[name];
      if (numel > 0) d.buffer = std::make_unique<float[]>(static_cast<size_t>(numel));
      d.assembler =
          std::make_unique<muonps::TensorAssembler>(name, t.shape, d.buffer.get(), require_finite_);
      return &d;
    }
    return nullptr;
  }

  bool require_finite_;
  std::map<std::string, Destination> destinations_;
  muonps::TensorAssembler* current_ = nullptr;
};

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  if (size < 1) return 0;
  const bool pull = (data[0] & 1) != 0;
  const int block = data[0] >> 1;
  google::protobuf::io::ArrayInputStream stream(data + 1, static_cast<int>(size - 1),
                                                block == 0 ? -1 : block);
  Receiver receiver(/*require_finite=*/!pull);
  auto place = [&receiver](const muonps::v1::TensorChunk& header, int64_t bytes) {
    return receiver.Place(header, bytes);
  };
  auto commit = [&receiver](int64_t bytes) { return receiver.Commit(bytes); };

  if (pull) {
    (void)muonps::DecodePull(&stream, place, commit, "fuzz pull");
  } else {
    int begins = 0;
    const absl::Status st = muonps::DecodePush(
        &stream,
        [&begins](const muonps::PushFields&, bool) {
          ++begins;
          return absl::OkStatus();
        },
        place, commit);
    // Once per message: before the first chunk, or at the end of one without.
    if (begins > 1 || (st.ok() && begins != 1)) {
      std::fprintf(stderr, "BeginPush called %d times for one message\n", begins);
      std::abort();
    }
  }
  receiver.Finish();
  return 0;
}
