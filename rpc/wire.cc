#include "rpc/wire.h"

#include "absl/strings/str_cat.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "google/protobuf/wire_format_lite.h"

namespace muonps {

using google::protobuf::internal::WireFormatLite;
using google::protobuf::io::CodedInputStream;
using google::protobuf::io::CodedOutputStream;

absl::Status ReadChunk(CodedInputStream* in, uint32_t length, const PlaceChunk& place,
                       const CommitChunk& commit, const std::string& what) {
  // Field numbers of tensor.proto's TensorChunk.
  enum : int {
    kName = v1::TensorChunk::kNameFieldNumber,
    kShape = v1::TensorChunk::kShapeFieldNumber,
    kDtype = v1::TensorChunk::kDtypeFieldNumber,
    kOffset = v1::TensorChunk::kOffsetFieldNumber,
    kData = v1::TensorChunk::kDataFieldNumber,
  };
  auto malformed = [&](const char* why) {
    return absl::DataLossError(absl::StrCat(what, ": malformed TensorChunk (", why, ")"));
  };
  const CodedInputStream::Limit limit = in->PushLimit(static_cast<int>(length));
  v1::TensorChunk header;
  bool placed = false;
  while (uint32_t tag = in->ReadTag()) {
    const int field = WireFormatLite::GetTagFieldNumber(tag);
    const auto type = WireFormatLite::GetTagWireType(tag);
    if (field == kName && type == WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
      if (!WireFormatLite::ReadString(in, header.mutable_name())) return malformed("name");
    } else if (field == kDtype && type == WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
      if (!WireFormatLite::ReadString(in, header.mutable_dtype())) return malformed("dtype");
    } else if (field == kOffset && type == WireFormatLite::WIRETYPE_VARINT) {
      uint64_t v = 0;
      if (!in->ReadVarint64(&v)) return malformed("offset");
      header.set_offset(static_cast<int64_t>(v));
    } else if (field == kShape && type == WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
      uint32_t n = 0;
      if (!in->ReadVarint32(&n)) return malformed("shape");
      const CodedInputStream::Limit shape_limit = in->PushLimit(static_cast<int>(n));
      while (in->BytesUntilLimit() > 0) {
        uint64_t v = 0;
        if (!in->ReadVarint64(&v)) return malformed("shape");
        header.add_shape(static_cast<int64_t>(v));
      }
      in->PopLimit(shape_limit);
    } else if (field == kShape && type == WireFormatLite::WIRETYPE_VARINT) {
      uint64_t v = 0;
      if (!in->ReadVarint64(&v)) return malformed("shape");
      header.add_shape(static_cast<int64_t>(v));
    } else if (field == kData && type == WireFormatLite::WIRETYPE_LENGTH_DELIMITED && !placed) {
      uint32_t bytes = 0;
      if (!in->ReadVarint32(&bytes)) return malformed("data length");
      absl::StatusOr<char*> dst = place(header, bytes);
      if (!dst.ok()) return dst.status();
      if (!in->ReadRaw(*dst, static_cast<int>(bytes))) return malformed("data");
      if (absl::Status st = commit(bytes); !st.ok()) return st;
      placed = true;
    } else if (!WireFormatLite::SkipField(in, tag)) {
      return malformed("field");
    }
  }
  if (in->BytesUntilLimit() != 0) return malformed("length");
  in->PopLimit(limit);
  if (!placed) {  // an empty payload: proto3 leaves empty bytes out
    absl::StatusOr<char*> dst = place(header, 0);
    if (!dst.ok()) return dst.status();
    return commit(0);
  }
  return absl::OkStatus();
}

std::string EncodeChunkHeader(const std::string& name, const std::vector<int64_t>* shape,
                              int64_t offset) {
  enum : int {
    kName = v1::TensorChunk::kNameFieldNumber,
    kShape = v1::TensorChunk::kShapeFieldNumber,
    kDtype = v1::TensorChunk::kDtypeFieldNumber,
    kOffset = v1::TensorChunk::kOffsetFieldNumber,
  };
  std::string out;
  google::protobuf::io::StringOutputStream stream(&out);
  CodedOutputStream coded(&stream);
  WireFormatLite::WriteString(kName, name, &coded);
  if (shape != nullptr) {
    size_t size = 0;
    for (int64_t d : *shape) size += CodedOutputStream::VarintSize64(static_cast<uint64_t>(d));
    WireFormatLite::WriteTag(kShape, WireFormatLite::WIRETYPE_LENGTH_DELIMITED, &coded);
    coded.WriteVarint32(static_cast<uint32_t>(size));
    for (int64_t d : *shape) coded.WriteVarint64(static_cast<uint64_t>(d));
  }
  WireFormatLite::WriteString(kDtype, "F32", &coded);
  if (offset != 0) WireFormatLite::WriteInt64(kOffset, offset, &coded);
  coded.Trim();
  return out;
}

grpc::ByteBuffer ChunkMessage(const std::string& prefix, int chunk_field,
                              const std::string& chunk_header, const char* data, int64_t bytes) {
  constexpr int kData = v1::TensorChunk::kDataFieldNumber;
  std::string head = prefix;
  {
    google::protobuf::io::StringOutputStream stream(&head);
    CodedOutputStream coded(&stream);
    const size_t data_field = 1 + CodedOutputStream::VarintSize64(static_cast<uint64_t>(bytes)) +
                              static_cast<size_t>(bytes);
    WireFormatLite::WriteTag(chunk_field, WireFormatLite::WIRETYPE_LENGTH_DELIMITED, &coded);
    coded.WriteVarint64(chunk_header.size() + data_field);
    coded.WriteRaw(chunk_header.data(), static_cast<int>(chunk_header.size()));
    WireFormatLite::WriteTag(kData, WireFormatLite::WIRETYPE_LENGTH_DELIMITED, &coded);
    coded.WriteVarint64(static_cast<uint64_t>(bytes));
    coded.Trim();
  }
  grpc::Slice slices[2] = {
      grpc::Slice(head), grpc::Slice(data, static_cast<size_t>(bytes), grpc::Slice::STATIC_SLICE)};
  return grpc::ByteBuffer(slices, bytes > 0 ? 2 : 1);
}

}  // namespace muonps
