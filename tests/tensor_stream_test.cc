// Tensor chunking and checked reassembly.
#include "rpc/tensor_stream.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <vector>

#include "common/philox.h"

namespace muonps {
namespace {

using ::testing::HasSubstr;

std::vector<v1::TensorChunk> Split(const std::vector<int64_t>& shape, const float* data,
                                   int64_t max_bytes) {
  std::vector<v1::TensorChunk> chunks;
  EXPECT_TRUE(SplitTensor("w", shape, data, max_bytes, [&](const v1::TensorChunk& c) {
    chunks.push_back(c);
    return true;
  }));
  return chunks;
}

TEST(TensorStreamTest, RoundTripIsBitExactForAnyChunkSize) {
  const std::vector<int64_t> shape = {37, 11};
  std::vector<float> data(37 * 11);
  FillNormal(data.data(), static_cast<int64_t>(data.size()), 3, "w", 1.0);
  data[7] = -0.0f;
  for (int64_t max_bytes : {1, 4, 6, 64, 1000, 1 << 20}) {
    const std::vector<v1::TensorChunk> chunks = Split(shape, data.data(), max_bytes);
    const int64_t per_chunk = std::max<int64_t>(4, max_bytes / 4 * 4);
    EXPECT_EQ(static_cast<int64_t>(chunks.size()), (1628 + per_chunk - 1) / per_chunk) << max_bytes;
    EXPECT_EQ(chunks[0].shape_size(), 2);
    std::vector<float> out(data.size(), 1.0f);
    TensorAssembler assembler("w", shape, out.data(), /*require_finite=*/true);
    for (const v1::TensorChunk& c : chunks) ASSERT_TRUE(assembler.Add(c).ok()) << max_bytes;
    EXPECT_TRUE(assembler.complete());
    EXPECT_TRUE(assembler.Finish().ok());
    EXPECT_EQ(std::memcmp(out.data(), data.data(), data.size() * sizeof(float)), 0);
  }
}

TEST(TensorStreamTest, EmptyTensorIsOneEmptyChunk) {
  const std::vector<v1::TensorChunk> chunks = Split({0, 4}, nullptr, 1024);
  ASSERT_EQ(chunks.size(), 1u);
  TensorAssembler assembler("w", {0, 4}, nullptr, true);
  EXPECT_TRUE(assembler.Add(chunks[0]).ok());
  EXPECT_TRUE(assembler.Finish().ok());
}

TEST(TensorStreamTest, StopsWhenTheStreamCloses) {
  std::vector<float> data(100, 1.0f);
  int calls = 0;
  EXPECT_FALSE(SplitTensor("w", {100}, data.data(), 40,
                           [&](const v1::TensorChunk&) { return ++calls < 2; }));
  EXPECT_EQ(calls, 2);
}

class RefusalTest : public ::testing::Test {
 protected:
  RefusalTest() : data_(24), out_(24, 7.0f) {
    FillNormal(data_.data(), 24, 5, "w", 1.0);
    chunks_ = Split({4, 6}, data_.data(), 32);  // 3 chunks of 8 floats
  }
  // Expects `chunk` refused with `what` in the message and `out_` untouched.
  void ExpectRefused(TensorAssembler& assembler, const v1::TensorChunk& chunk,
                     const std::string& what) {
    const std::vector<float> before = out_;
    absl::Status status = assembler.Add(chunk);
    ASSERT_FALSE(status.ok());
    EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(status.message()), HasSubstr(what));
    EXPECT_THAT(std::string(status.message()), HasSubstr("tensor w"));
    EXPECT_EQ(std::memcmp(before.data(), out_.data(), out_.size() * sizeof(float)), 0);
  }
  std::vector<float> data_, out_;
  std::vector<v1::TensorChunk> chunks_;
};

TEST_F(RefusalTest, WrongNameShapeOrDtype) {
  TensorAssembler assembler("w", {4, 6}, out_.data(), false);
  v1::TensorChunk c = chunks_[0];
  c.set_name("v");
  ExpectRefused(assembler, c, "name");
  c = chunks_[0];
  c.clear_shape();
  c.add_shape(6);
  c.add_shape(4);
  ExpectRefused(assembler, c, "shape: expected [4, 6], got [6, 4]");
  c = chunks_[0];
  c.set_dtype("BF16");
  ExpectRefused(assembler, c, "dtype");
  EXPECT_TRUE(assembler.Add(chunks_[0]).ok());  // and the stream goes on
}

TEST_F(RefusalTest, OutOfOrderRaggedOrOversizedChunks) {
  TensorAssembler assembler("w", {4, 6}, out_.data(), false);
  ExpectRefused(assembler, chunks_[1], "offset: expected 0");
  v1::TensorChunk c = chunks_[0];
  c.mutable_data()->pop_back();
  ExpectRefused(assembler, c, "whole number");
  c = chunks_[0];
  c.mutable_data()->append(std::string(200, '\0'));
  ExpectRefused(assembler, c, "run past");
  ASSERT_TRUE(assembler.Add(chunks_[0]).ok());
  ExpectRefused(assembler, chunks_[0], "offset: expected 32");  // a repeated chunk
  EXPECT_FALSE(assembler.complete());
  absl::Status end = assembler.Finish();
  EXPECT_THAT(std::string(end.message()), HasSubstr("32 of 96 bytes"));
}

TEST_F(RefusalTest, NonFiniteGradientsAreRefused) {
  data_[13] = std::nanf("");
  chunks_ = Split({4, 6}, data_.data(), 32);
  TensorAssembler assembler("w", {4, 6}, out_.data(), /*require_finite=*/true);
  ASSERT_TRUE(assembler.Add(chunks_[0]).ok());
  // Copy of out_ after the accepted chunk: the refused one must not land.
  ExpectRefused(assembler, chunks_[1], "non-finite value nan at element 13");
  data_[13] = INFINITY;
  chunks_ = Split({4, 6}, data_.data(), 32);
  TensorAssembler plain("w", {4, 6}, out_.data(), /*require_finite=*/false);
  for (const v1::TensorChunk& c : chunks_) EXPECT_TRUE(plain.Add(c).ok());
}

}  // namespace
}  // namespace muonps
