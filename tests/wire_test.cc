// The hand-written wire format (rpc/wire.h) against protobuf's generated
// classes: what one encodes the other reads, field for field, and hostile
// bytes are statuses.
#include "rpc/wire.h"

#include <gmock/gmock.h>
#include <grpcpp/support/proto_buffer_reader.h>
#include <gtest/gtest.h>

#include <cstring>
#include <string>
#include <vector>

#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "muonps/v1/shard.pb.h"

namespace muonps {
namespace {

using ::testing::HasSubstr;

std::string Flatten(const grpc::ByteBuffer& buffer) {
  std::vector<grpc::Slice> slices;
  EXPECT_TRUE(buffer.Dump(&slices).ok());
  std::string out;
  for (const grpc::Slice& s : slices)
    out.append(reinterpret_cast<const char*>(s.begin()), s.size());
  return out;
}

struct Decoded {
  std::vector<PushFields> begins;
  std::vector<v1::TensorChunk> headers;
  std::string payload;
};

absl::Status Push(const std::string& bytes, Decoded* out) {
  std::string buffer(1 << 16, '\0');
  google::protobuf::io::ArrayInputStream in(bytes.data(), static_cast<int>(bytes.size()));
  return DecodePush(
      &in,
      [&](const PushFields& fields, bool has_chunk) {
        out->begins.push_back(fields);
        return has_chunk ? absl::OkStatus() : absl::InvalidArgumentError("no chunk");
      },
      [&](const v1::TensorChunk& header, int64_t n) -> absl::StatusOr<char*> {
        out->headers.push_back(header);
        if (n > static_cast<int64_t>(buffer.size())) return absl::ResourceExhaustedError("big");
        return buffer.data();
      },
      [&](int64_t n) {
        out->payload.append(buffer.data(), static_cast<size_t>(n));
        return absl::OkStatus();
      });
}

TEST(WireTest, PushMessageReadsAsTheGeneratedClassWroteIt) {
  const std::vector<float> values = {1.5f, -2.0f, 3.25f, 0.0f};
  const std::vector<int64_t> shape = {2, 2};
  const std::string header = EncodeChunkHeader("model.norm.weight", &shape, 0);
  const std::string bytes = Flatten(ChunkMessage(
      EncodePushFields({"job-7", 42, 3, 2}), v1::PushGradientsRequest::kChunkFieldNumber, header,
      reinterpret_cast<const char*>(values.data()), 16));

  // Protobuf's own parser sees the same message.
  v1::PushGradientsRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(bytes));
  EXPECT_EQ(parsed.job_id(), "job-7");
  EXPECT_EQ(parsed.step(), 42);
  EXPECT_EQ(parsed.slot(), 3);
  EXPECT_EQ(parsed.slot_count(), 2);
  EXPECT_EQ(parsed.chunk().name(), "model.norm.weight");
  EXPECT_THAT(parsed.chunk().shape(), ::testing::ElementsAre(2, 2));
  EXPECT_EQ(parsed.chunk().dtype(), "F32");
  ASSERT_EQ(parsed.chunk().data().size(), 16u);
  // NOLINTNEXTLINE(bugprone-suspicious-memory-comparison): the test wants bit-identical floats.
  EXPECT_EQ(std::memcmp(parsed.chunk().data().data(), values.data(), 16), 0);

  // And the decoder reads what the generated class writes.
  Decoded d;
  ASSERT_TRUE(Push(parsed.SerializeAsString(), &d).ok());
  ASSERT_EQ(d.begins.size(), 1u);
  EXPECT_EQ(d.begins[0].job_id, "job-7");
  EXPECT_EQ(d.begins[0].step, 42);
  EXPECT_EQ(d.begins[0].slot, 3);
  EXPECT_EQ(d.begins[0].slot_count, 2);
  ASSERT_EQ(d.headers.size(), 1u);
  EXPECT_EQ(d.headers[0].name(), "model.norm.weight");
  EXPECT_EQ(d.payload, parsed.chunk().data());
}

TEST(WireTest, PullVersionAndChunkReadAsTheGeneratedClassWroteThem) {
  v1::PullParametersResponse response;
  response.set_version(9);
  response.mutable_chunk()->set_name("lm_head.weight");
  response.mutable_chunk()->set_offset(64);
  response.mutable_chunk()->set_data(std::string(8, '\x01'));
  EXPECT_EQ(EncodePullVersion(9), [] {
    v1::PullParametersResponse r;
    r.set_version(9);
    return r.SerializeAsString();
  }());
  EXPECT_EQ(EncodePullVersion(0), "");
  const std::string bytes = response.SerializeAsString();
  google::protobuf::io::ArrayInputStream in(bytes.data(), static_cast<int>(bytes.size()));
  std::string got(8, '\0');
  int64_t offset = -1;
  ASSERT_TRUE(DecodePull(
                  &in,
                  [&](const v1::TensorChunk& h, int64_t n) -> absl::StatusOr<char*> {
                    offset = h.offset();
                    EXPECT_EQ(n, 8);
                    return got.data();
                  },
                  [](int64_t) { return absl::OkStatus(); }, "pull")
                  .ok());
  EXPECT_EQ(offset, 64);
  EXPECT_EQ(got, std::string(8, '\x01'));
}

TEST(WireTest, HostileLengthsAreStatusesBeforeAnythingIsPlaced) {
  v1::PushGradientsRequest request;
  request.set_job_id("j");
  request.mutable_chunk()->set_name("t");
  request.mutable_chunk()->set_data(std::string(32, 'x'));
  const std::string good = request.SerializeAsString();
  // Every truncation is refused or decodes a shorter, consistent message;
  // a payload longer than what arrived is never handed to place().
  for (size_t n = 0; n < good.size(); ++n) {
    Decoded d;
    const absl::Status st = Push(good.substr(0, n), &d);
    for (const v1::TensorChunk& h : d.headers) EXPECT_EQ(h.name(), "t");
    EXPECT_LE(d.payload.size(), 32u);
    if (n > 0 && n < good.size()) {
      EXPECT_FALSE(st.ok()) << n;
    }
  }
  // A data length claiming 16 MiB inside a message of 40 bytes.
  std::string forged = good;
  const size_t at = forged.find(std::string(32, 'x'));
  ASSERT_NE(at, std::string::npos);
  forged[at - 1] = '\xff';  // the data length's varint, now 0x7f... continuing
  forged.insert(at, "\xff\xff\x07");
  Decoded d;
  const absl::Status st = Push(forged, &d);
  EXPECT_FALSE(st.ok());
  EXPECT_TRUE(d.headers.empty()) << "place() was asked for bytes that never arrived";
  EXPECT_TRUE(d.payload.empty());
}

TEST(WireTest, MessageWithoutChunkStillReportsItsFields) {
  Decoded d;
  const absl::Status st = Push(EncodePushFields({"job-1", 5, 0, 0}), &d);
  EXPECT_THAT(st.message(), HasSubstr("no chunk"));
  ASSERT_EQ(d.begins.size(), 1u);
  EXPECT_EQ(d.begins[0].job_id, "job-1");
  EXPECT_EQ(d.begins[0].step, 5);
}

}  // namespace
}  // namespace muonps
