#include "rpc/tensor_stream.h"

#include <algorithm>
#include <cmath>
#include <cstring>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace muonps {
namespace {

int64_t NumElements(const std::vector<int64_t>& shape) {
  int64_t n = 1;
  for (int64_t d : shape) n *= d;
  return n;
}

std::string ShapeString(const std::vector<int64_t>& shape) {
  return absl::StrCat("[", absl::StrJoin(shape, ", "), "]");
}

// INVALID_ARGUMENT for the non-finite value at index `bad` of `data`, whose
// first element is element `first` of tensor `name`.
absl::Status NonFiniteError(const std::string& name, const char* data, int64_t bad, int64_t first) {
  float x;
  std::memcpy(&x, data + bad * sizeof(float), sizeof(float));
  return absl::InvalidArgumentError(
      absl::StrCat("tensor ", name, ": data: non-finite value ", x, " at element ", first + bad));
}

}  // namespace

int64_t ChunkPayloadBytes(int64_t max_chunk_bytes) {
  return ChunkPayloadBytes(max_chunk_bytes, TransferDtype::kF32);
}

int64_t ChunkPayloadBytes(int64_t max_chunk_bytes, TransferDtype dtype) {
  const int64_t element = ElementBytes(dtype);
  return std::max(element, max_chunk_bytes / element * element);
}

bool SplitTensor(const std::string& name, const std::vector<int64_t>& shape, const float* data,
                 int64_t max_chunk_bytes, const std::function<bool(const v1::TensorChunk&)>& emit) {
  const int64_t total = NumElements(shape) * static_cast<int64_t>(sizeof(float));
  const int64_t step = ChunkPayloadBytes(max_chunk_bytes);
  v1::TensorChunk chunk;
  chunk.set_name(name);
  chunk.set_dtype("F32");
  int64_t offset = 0;
  do {
    const int64_t bytes = std::min(step, total - offset);
    chunk.clear_shape();
    if (offset == 0) {
      for (int64_t d : shape) chunk.add_shape(d);
    }
    chunk.set_offset(offset);
    chunk.set_data(reinterpret_cast<const char*>(data) + offset, static_cast<size_t>(bytes));
    if (!emit(chunk)) return false;
    offset += bytes;
  } while (offset < total);
  return true;
}

int64_t FirstNonFinite(const char* bytes, int64_t count) {
  constexpr uint32_t kExponent = 0x7f800000u;  // all ones: Inf or NaN
  constexpr int64_t kBlock = 1024;
  for (int64_t base = 0; base < count; base += kBlock) {
    const int64_t end = std::min(count, base + kBlock);
    uint32_t bad = 0;
    for (int64_t i = base; i < end; ++i) {
      uint32_t w;
      std::memcpy(&w, bytes + i * sizeof(float), sizeof(w));
      bad |= static_cast<uint32_t>((w & kExponent) == kExponent);
    }
    if (bad != 0) {
      for (int64_t i = base; i < end; ++i) {
        uint32_t w;
        std::memcpy(&w, bytes + i * sizeof(float), sizeof(w));
        if ((w & kExponent) == kExponent) return i;
      }
    }
  }
  return -1;
}

TensorAssembler::TensorAssembler(std::string name, std::vector<int64_t> expected_shape, float* out,
                                 bool require_finite, TransferDtype dtype)
    : name_(std::move(name)),
      shape_(std::move(expected_shape)),
      out_(out),
      require_finite_(require_finite),
      dtype_(dtype),
      total_bytes_(NumElements(shape_) * ElementBytes(dtype)) {}

absl::StatusOr<char*> TensorAssembler::Reserve(const v1::TensorChunk& chunk, int64_t bytes) {
  auto refuse = [&](absl::string_view what) {
    return absl::InvalidArgumentError(absl::StrCat("tensor ", name_, ": ", what));
  };
  if (chunk.name() != name_) {
    return refuse(absl::StrCat("name: chunk is for \"", chunk.name(), "\""));
  }
  if (chunk.dtype() != DtypeName(dtype_)) {
    return refuse(absl::StrCat("dtype: only ", DtypeName(dtype_),
                               " is accepted (the job's transfer.dtype), got \"", chunk.dtype(),
                               "\""));
  }
  if (chunk.offset() == 0 || chunk.shape_size() > 0) {
    const std::vector<int64_t> shape(chunk.shape().begin(), chunk.shape().end());
    if (shape != shape_) {
      return refuse(
          absl::StrCat("shape: expected ", ShapeString(shape_), ", got ", ShapeString(shape)));
    }
  }
  if (chunk.offset() != received_) {
    return refuse(
        absl::StrCat("offset: expected ", received_, " (chunks in order), got ", chunk.offset()));
  }
  if (bytes % ElementBytes(dtype_) != 0) {
    return refuse(absl::StrCat("data: ", bytes, " bytes is not a whole number of ",
                               DtypeName(dtype_), " values"));
  }
  if (bytes > total_bytes_ - received_) {
    return refuse(absl::StrCat("data: ", bytes, " bytes at offset ", received_,
                               " run past the tensor's ", total_bytes_, " bytes"));
  }
  if (dtype_ == TransferDtype::kBF16) {
    staging_.resize(static_cast<size_t>(bytes / 2));
    return reinterpret_cast<char*>(staging_.data());
  }
  return reinterpret_cast<char*>(out_) + received_;
}

absl::Status TensorAssembler::Commit(int64_t bytes) {
  const int64_t first = received_elements();
  const int64_t count = bytes / ElementBytes(dtype_);
  if (dtype_ == TransferDtype::kBF16) {
    if (require_finite_) {
      const int64_t bad = FirstNonFiniteBf16(reinterpret_cast<const char*>(staging_.data()), count);
      if (bad >= 0) {
        return absl::InvalidArgumentError(
            absl::StrCat("tensor ", name_, ": data: non-finite value ", Bf16ToFloat(staging_[bad]),
                         " at element ", first + bad));
      }
    }
    float* dst = out_ + first;
    const uint16_t* src = staging_.data();
    for (int64_t i = 0; i < count; ++i) dst[i] = Bf16ToFloat(src[i]);
    received_ += bytes;
    return absl::OkStatus();
  }
  if (require_finite_) {
    const char* data = reinterpret_cast<const char*>(out_) + received_;
    const int64_t bad = FirstNonFinite(data, count);
    if (bad >= 0) return NonFiniteError(name_, data, bad, first);
  }
  received_ += bytes;
  return absl::OkStatus();
}

absl::Status TensorAssembler::Add(const v1::TensorChunk& chunk) {
  const int64_t bytes = static_cast<int64_t>(chunk.data().size());
  absl::StatusOr<char*> dst = Reserve(chunk, bytes);
  if (!dst.ok()) return dst.status();
  if (dtype_ == TransferDtype::kBF16) {  // staged, checked, then widened
    if (bytes > 0) std::memcpy(*dst, chunk.data().data(), static_cast<size_t>(bytes));
    return Commit(bytes);
  }
  if (require_finite_) {
    // Checked before copying: a refused chunk writes nothing.
    const int64_t bad =
        FirstNonFinite(chunk.data().data(), bytes / static_cast<int64_t>(sizeof(float)));
    if (bad >= 0) {
      return NonFiniteError(name_, chunk.data().data(), bad,
                            received_ / static_cast<int64_t>(sizeof(float)));
    }
  }
  // An empty tensor's chunk has no destination: memcpy must not see null.
  if (bytes > 0) std::memcpy(*dst, chunk.data().data(), static_cast<size_t>(bytes));
  received_ += bytes;
  return absl::OkStatus();
}

absl::Status TensorAssembler::Finish() const {
  if (complete()) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat("tensor ", name_, ": stream ended after ",
                                                 received_, " of ", total_bytes_, " bytes"));
}

}  // namespace muonps
