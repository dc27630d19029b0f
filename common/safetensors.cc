#include "common/safetensors.h"

#include <algorithm>
#include <bit>
#include <cstring>
#include <set>
#include <string_view>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "common/atomic_file.h"
#include "nlohmann/json.hpp"

namespace muonps {
namespace {

// Tensor bytes are copied as-is between memory and the file.
static_assert(std::endian::native == std::endian::little,
              "safetensors data is little-endian; this host is not");

constexpr char kMetadataKey[] = "__metadata__";

// Bytes per element of every dtype the format defines; 0 when unknown.
uint64_t DtypeSize(std::string_view dtype) {
  static const std::map<std::string_view, uint64_t> kSizes = {
      {"BOOL", 1}, {"U8", 1},  {"I8", 1},  {"F8_E5M2", 1}, {"F8_E4M3", 1},
      {"I16", 2},  {"U16", 2}, {"F16", 2}, {"BF16", 2},    {"I32", 4},
      {"U32", 4},  {"F32", 4}, {"F64", 8}, {"I64", 8},     {"U64", 8}};
  const auto it = kSizes.find(dtype);
  return it == kSizes.end() ? 0 : it->second;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// product(shape), or false on a negative dimension or uint64 overflow.
bool ElementCount(const std::vector<int64_t>& shape, uint64_t* count) {
  uint64_t n = 1;
  for (int64_t d : shape) {
    if (d < 0) return false;
    const uint64_t ud = static_cast<uint64_t>(d);
    if (ud != 0 && n > UINT64_MAX / ud) return false;
    n *= ud;
  }
  *count = n;
  return true;
}

// A non-negative JSON integer that fits int64, or false.
bool NonNegativeInt(const nlohmann::json& value, int64_t* out) {
  if (value.is_number_unsigned()) {
    const uint64_t v = value.get<uint64_t>();
    if (v > static_cast<uint64_t>(INT64_MAX)) return false;
    *out = static_cast<int64_t>(v);
    return true;
  }
  if (value.is_number_integer()) {
    const int64_t v = value.get<int64_t>();
    if (v < 0) return false;
    *out = v;
    return true;
  }
  return false;
}

}  // namespace

absl::Status WriteSafetensors(const std::string& path, const std::vector<TensorRef>& tensors,
                              const std::map<std::string, std::string>& metadata) {
  nlohmann::ordered_json header = nlohmann::ordered_json::object();
  if (!metadata.empty()) {
    nlohmann::ordered_json meta = nlohmann::ordered_json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    header[std::string(kMetadataKey)] = std::move(meta);
  }
  std::vector<std::string_view> data_pieces;
  std::set<std::string> seen;
  uint64_t offset = 0;
  for (const TensorRef& t : tensors) {
    if (t.name.empty() || t.name == kMetadataKey) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: invalid tensor name '%s'", path, t.name));
    }
    if (!seen.insert(t.name).second) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: tensor '%s' given twice", path, t.name));
    }
    uint64_t count = 0;
    if (!ElementCount(t.shape, &count) || count > UINT64_MAX / sizeof(float)) {
      return absl::InvalidArgumentError(absl::StrFormat("%s: tensor '%s' has an invalid shape %s",
                                                        path, t.name, ShapeString(t.shape)));
    }
    const uint64_t bytes = count * sizeof(float);
    if (bytes > 0 && t.data == nullptr) {
      return absl::InvalidArgumentError(
          absl::StrFormat("%s: tensor '%s' has no data", path, t.name));
    }
    header[t.name] = {
        {"dtype", "F32"}, {"shape", t.shape}, {"data_offsets", {offset, offset + bytes}}};
    if (bytes > 0) data_pieces.emplace_back(reinterpret_cast<const char*>(t.data), bytes);
    offset += bytes;
  }

  std::string header_text;
  try {
    header_text = header.dump();
  } catch (const nlohmann::json::exception& e) {  // invalid UTF-8 in a name or value
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: cannot encode the header: %s", path, e.what()));
  }
  header_text.append((8 - header_text.size() % 8) % 8, ' ');

  char length[8];
  uint64_t n = header_text.size();
  for (int i = 0; i < 8; ++i) {
    length[i] = static_cast<char>(n & 0xff);
    n >>= 8;
  }
  std::vector<std::string_view> pieces = {std::string_view(length, 8), header_text};
  pieces.insert(pieces.end(), data_pieces.begin(), data_pieces.end());
  return WriteFileAtomically(path, pieces);
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Open(const std::string& path) {
  absl::StatusOr<std::string> bytes = ReadFileToString(path);
  if (!bytes.ok()) return bytes.status();
  return Parse(std::move(*bytes), path);
}

absl::StatusOr<SafetensorsFile> SafetensorsFile::Parse(std::string bytes, std::string path) {
  SafetensorsFile file;
  file.path_ = std::move(path);
  file.bytes_ = std::move(bytes);
  const std::string& b = file.bytes_;
  auto invalid = [&file](const std::string& what) {
    return absl::InvalidArgumentError(absl::StrCat(file.path_, ": ", what));
  };

  if (b.size() < 8) {
    return invalid(absl::StrFormat(
        "not a safetensors file: %d bytes, shorter than the 8-byte header length", b.size()));
  }
  uint64_t header_len = 0;
  for (int i = 7; i >= 0; --i) header_len = (header_len << 8) | static_cast<unsigned char>(b[i]);
  if (header_len > b.size() - 8) {
    return invalid(absl::StrFormat(
        "header length %d exceeds the %d bytes after the length field (truncated file?)",
        header_len, b.size() - 8));
  }
  file.data_start_ = 8 + header_len;
  const uint64_t data_size = b.size() - file.data_start_;

  const nlohmann::json header = nlohmann::json::parse(
      b.begin() + 8, b.begin() + static_cast<std::ptrdiff_t>(file.data_start_),
      /*cb=*/nullptr, /*allow_exceptions=*/false);
  if (header.is_discarded()) return invalid("header is not valid JSON");
  if (!header.is_object()) return invalid("header is not a JSON object");

  for (const auto& [name, value] : header.items()) {
    if (name == kMetadataKey) {
      if (!value.is_object()) return invalid("__metadata__ is not an object");
      for (const auto& [key, text] : value.items()) {
        if (!text.is_string()) {
          return invalid(absl::StrFormat("__metadata__ value for '%s' is not a string", key));
        }
        file.metadata_[key] = text.get<std::string>();
      }
      continue;
    }
    // (Lambdas may not capture structured bindings before C++20 in clang 14.)
    const std::string& tensor = name;
    auto bad = [&](const std::string& what) {
      return invalid(absl::StrFormat("tensor '%s': %s", tensor, what));
    };
    if (!value.is_object()) return bad("entry is not an object");
    Entry entry;

    const auto dtype = value.find("dtype");
    if (dtype == value.end() || !dtype->is_string()) return bad("missing string 'dtype'");
    entry.dtype = dtype->get<std::string>();
    const uint64_t element_size = DtypeSize(entry.dtype);
    if (element_size == 0) return bad(absl::StrFormat("unknown dtype '%s'", entry.dtype));

    const auto shape = value.find("shape");
    if (shape == value.end() || !shape->is_array()) return bad("missing array 'shape'");
    for (const nlohmann::json& dim : *shape) {
      int64_t d = 0;
      // Named by its position, not printed: the value may be JSON nested
      // deeply enough to overflow the stack of a recursive dump().
      if (!NonNegativeInt(dim, &d)) {
        return bad(absl::StrFormat("shape dimension %d is not a non-negative integer (a %s)",
                                   entry.shape.size(), dim.type_name()));
      }
      entry.shape.push_back(d);
    }
    uint64_t count = 0;
    if (!ElementCount(entry.shape, &count) || count > UINT64_MAX / element_size) {
      return bad(absl::StrFormat("shape %s is too large", ShapeString(entry.shape)));
    }

    const auto offsets = value.find("data_offsets");
    int64_t begin = 0, end = 0;
    if (offsets == value.end() || !offsets->is_array() || offsets->size() != 2 ||
        !NonNegativeInt((*offsets)[0], &begin) || !NonNegativeInt((*offsets)[1], &end)) {
      return bad("missing 'data_offsets' as two non-negative integers");
    }
    entry.begin = static_cast<uint64_t>(begin);
    entry.end = static_cast<uint64_t>(end);
    if (entry.end < entry.begin) {
      return bad(absl::StrFormat("data_offsets [%d, %d] end before they begin", begin, end));
    }
    if (entry.end > data_size) {
      return bad(absl::StrFormat(
          "data_offsets [%d, %d] extend past the %d-byte data buffer (truncated file?)", begin, end,
          data_size));
    }
    if (entry.end - entry.begin != count * element_size) {
      return bad(absl::StrFormat("data_offsets [%d, %d] span %d bytes, but %s %s needs %d", begin,
                                 end, entry.end - entry.begin, entry.dtype,
                                 ShapeString(entry.shape), count * element_size));
    }
    file.entries_[name] = std::move(entry);
    file.order_.push_back(name);
  }

  // The tensors must tile the data buffer: sorted by offset, each starts
  // where the previous one ended, and the last ends at the end of the file.
  std::sort(file.order_.begin(), file.order_.end(),
            [&file](const std::string& a, const std::string& c) {
              const Entry& ea = file.entries_.at(a);
              const Entry& ec = file.entries_.at(c);
              return std::tie(ea.begin, ea.end, a) < std::tie(ec.begin, ec.end, c);
            });
  uint64_t expected = 0;
  for (const std::string& name : file.order_) {
    const Entry& e = file.entries_.at(name);
    if (e.begin != expected) {
      return invalid(absl::StrFormat(
          "tensor '%s': data_offsets [%d, %d] %s (expected it to begin at %d)", name, e.begin,
          e.end, e.begin < expected ? "overlap the previous tensor" : "leave a gap", expected));
    }
    expected = e.end;
  }
  if (expected != data_size) {
    return invalid(absl::StrFormat("%d bytes of data after the last tensor, which ends at %d",
                                   data_size - expected, expected));
  }
  return file;
}

absl::StatusOr<std::vector<int64_t>> SafetensorsFile::shape(const std::string& name) const {
  const auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrFormat("%s: no tensor '%s'", path_, name));
  }
  return it->second.shape;
}

absl::StatusOr<std::string> SafetensorsFile::dtype(const std::string& name) const {
  const auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrFormat("%s: no tensor '%s'", path_, name));
  }
  return it->second.dtype;
}

absl::Status SafetensorsFile::ReadInto(const std::string& name,
                                       const std::vector<int64_t>& expected_shape,
                                       float* out) const {
  const auto it = entries_.find(name);
  if (it == entries_.end()) {
    return absl::NotFoundError(absl::StrFormat("%s: no tensor '%s'", path_, name));
  }
  const Entry& e = it->second;
  if (e.dtype != "F32") {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: tensor '%s' has dtype %s; only F32 can be read", path_, name, e.dtype));
  }
  if (e.shape != expected_shape) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: tensor '%s' has shape %s, expected %s",
                                                      path_, name, ShapeString(e.shape),
                                                      ShapeString(expected_shape)));
  }
  const uint64_t bytes = e.end - e.begin;
  if (bytes == 0) return absl::OkStatus();
  if (out == nullptr) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: no output buffer for tensor '%s'", path_, name));
  }
  std::memcpy(out, bytes_.data() + data_start_ + e.begin, bytes);
  return absl::OkStatus();
}

}  // namespace muonps
