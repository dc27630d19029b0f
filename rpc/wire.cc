#include "rpc/wire.h"

#include <limits>

#include "absl/strings/str_cat.h"
#include "common/status_macros.h"
#include "google/protobuf/io/zero_copy_stream_impl_lite.h"
#include "google/protobuf/wire_format_lite.h"
#include "muonps/v1/shard.pb.h"

namespace muonps {

using google::protobuf::internal::WireFormatLite;
using google::protobuf::io::CodedInputStream;
using google::protobuf::io::CodedOutputStream;

absl::Status ReadChunk(CodedInputStream* in, uint32_t length, const PlaceChunk& place,
                       const CommitChunk& commit, const std::string& what,
                       absl::StatusCode malformed_code) {
  // Field numbers of tensor.proto's TensorChunk.
  enum : int {
    kName = v1::TensorChunk::kNameFieldNumber,
    kShape = v1::TensorChunk::kShapeFieldNumber,
    kDtype = v1::TensorChunk::kDtypeFieldNumber,
    kOffset = v1::TensorChunk::kOffsetFieldNumber,
    kData = v1::TensorChunk::kDataFieldNumber,
  };
  auto malformed = [&](const char* why) {
    return absl::Status(malformed_code, absl::StrCat(what, ": malformed TensorChunk (", why, ")"));
  };
  if (length > static_cast<uint32_t>(std::numeric_limits<int>::max())) return malformed("length");
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
      if (!in->ReadVarint32(&n) || n > static_cast<uint32_t>(in->BytesUntilLimit())) {
        return malformed("shape");
      }
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
      if (!in->ReadVarint32(&bytes) || bytes > static_cast<uint32_t>(in->BytesUntilLimit())) {
        return malformed("data length");
      }
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
                              int64_t offset, TransferDtype dtype) {
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
  WireFormatLite::WriteString(kDtype, std::string(DtypeName(dtype)), &coded);
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

std::string EncodePushFields(const PushFields& fields) {
  std::string out;
  google::protobuf::io::StringOutputStream stream(&out);
  CodedOutputStream coded(&stream);
  using Request = v1::PushGradientsRequest;
  if (!fields.job_id.empty())
    WireFormatLite::WriteString(Request::kJobIdFieldNumber, fields.job_id, &coded);
  if (fields.step != 0) WireFormatLite::WriteInt64(Request::kStepFieldNumber, fields.step, &coded);
  if (fields.slot != 0) WireFormatLite::WriteInt32(Request::kSlotFieldNumber, fields.slot, &coded);
  if (fields.slot_count != 0)
    WireFormatLite::WriteInt32(Request::kSlotCountFieldNumber, fields.slot_count, &coded);
  coded.Trim();
  return out;
}

absl::Status DecodePush(google::protobuf::io::ZeroCopyInputStream* stream, const BeginPush& begin,
                        const PlaceChunk& place, const CommitChunk& commit) {
  using Request = v1::PushGradientsRequest;
  CodedInputStream in(stream);
  in.SetTotalBytesLimit(std::numeric_limits<int>::max());
  absl::Status malformed = absl::InvalidArgumentError("malformed PushGradientsRequest");
  PushFields fields;
  bool begun = false;
  while (uint32_t tag = in.ReadTag()) {
    const int field = WireFormatLite::GetTagFieldNumber(tag);
    const auto type = WireFormatLite::GetTagWireType(tag);
    uint64_t v = 0;
    if (field == Request::kJobIdFieldNumber && type == WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
      if (!WireFormatLite::ReadString(&in, &fields.job_id)) return malformed;
    } else if ((field == Request::kStepFieldNumber || field == Request::kSlotFieldNumber ||
                field == Request::kSlotCountFieldNumber) &&
               type == WireFormatLite::WIRETYPE_VARINT) {
      if (!in.ReadVarint64(&v)) return malformed;
      if (field == Request::kStepFieldNumber) fields.step = static_cast<int64_t>(v);
      if (field == Request::kSlotFieldNumber) fields.slot = static_cast<int32_t>(v);
      if (field == Request::kSlotCountFieldNumber) fields.slot_count = static_cast<int32_t>(v);
    } else if (field == Request::kChunkFieldNumber &&
               type == WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
      // The request's own fields come first (protobuf writes fields in number order).
      if (!begun) {
        begun = true;
        if (absl::Status st = begin(fields, /*has_chunk=*/true); !st.ok()) return st;
      }
      uint32_t length = 0;
      if (!in.ReadVarint32(&length)) return malformed;
      if (absl::Status st = ReadChunk(&in, length, place, commit, "PushGradientsRequest",
                                      absl::StatusCode::kInvalidArgument);
          !st.ok()) {
        return st;
      }
    } else if (!WireFormatLite::SkipField(&in, tag)) {
      return malformed;
    }
  }
  if (!in.ConsumedEntireMessage()) return malformed;
  if (!begun) return begin(fields, /*has_chunk=*/false);
  return absl::OkStatus();
}

std::string EncodePullVersion(int64_t version) {
  std::string out;
  if (version == 0) return out;
  google::protobuf::io::StringOutputStream stream(&out);
  CodedOutputStream coded(&stream);
  WireFormatLite::WriteInt64(v1::PullParametersResponse::kVersionFieldNumber, version, &coded);
  coded.Trim();
  return out;
}

absl::Status DecodePull(google::protobuf::io::ZeroCopyInputStream* stream, const PlaceChunk& place,
                        const CommitChunk& commit, const std::string& what) {
  CodedInputStream in(stream);
  in.SetTotalBytesLimit(std::numeric_limits<int>::max());
  auto malformed = [&](absl::string_view why) {
    return absl::DataLossError(absl::StrCat(what, ": malformed response (", why, ")"));
  };
  while (uint32_t tag = in.ReadTag()) {
    if (WireFormatLite::GetTagFieldNumber(tag) != v1::PullParametersResponse::kChunkFieldNumber ||
        WireFormatLite::GetTagWireType(tag) != WireFormatLite::WIRETYPE_LENGTH_DELIMITED) {
      if (!WireFormatLite::SkipField(&in, tag)) return malformed("field");
      continue;
    }
    uint32_t length = 0;
    if (!in.ReadVarint32(&length)) return malformed("chunk length");
    MUONPS_RETURN_IF_ERROR(ReadChunk(&in, length, place, commit, what));
  }
  if (!in.ConsumedEntireMessage()) return malformed("tag");
  return absl::OkStatus();
}

}  // namespace muonps
