#include "services/transfer/wire.h"

#include "absl/strings/str_cat.h"
#include "google/protobuf/wire_format_lite.h"

namespace muonps {

using google::protobuf::io::CodedInputStream;
using google::protobuf::internal::WireFormatLite;

absl::Status ReadChunk(CodedInputStream* in, uint32_t length, const PlaceChunk& place,
                       const CommitChunk& commit, const std::string& what) {
  // Field numbers of tensor.proto's TensorChunk.
  enum : int { kName = 1, kShape = 2, kDtype = 3, kOffset = 4, kData = 5 };
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

}  // namespace muonps
