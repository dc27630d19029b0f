// bfloat16 on the wire (job option transfer.dtype = "bf16"), defined once.
//
// A bf16 value is the top 16 bits of a float32 (sign, 8 exponent bits, 7
// mantissa bits). Rounding a float32 to bf16 is IEEE round-to-nearest, ties
// to even, on those 16 bits; a NaN stays a (quiet) NaN, and a finite value
// past the largest bf16 rounds to infinity as IEEE rounding says.
//
// What a bf16 job does differently from an f32 one, everywhere alike (the
// worker, the shard, `muonps train`), so that it stays bit-identical across
// layouts:
//   - the model computes with the parameters rounded to bf16 (what a worker
//     pulls); the shards keep float32 master values and optimizer state;
//   - the gradient of a step is the slot gradients rounded to bf16 and
//     accumulated in slot order as s = bf16(s + bf16(g)): every prefix of the
//     sum is itself a bf16 value, so a worker that sums slots 0..k-1 pushes
//     it in bf16 and the shard, adding further slots, forms the same bits
//     (AccumulateSlotGradient).
//
// The per-element functions are inline in this header, so every backend
// calls the same arithmetic.
#ifndef MUONPS_COMMON_BF16_H_
#define MUONPS_COMMON_BF16_H_

#include <cstdint>
#include <cstring>
#include <string>

#include "absl/strings/string_view.h"

namespace muonps {

// How tensors of a job travel between workers and shards.
enum class TransferDtype {
  kF32,   // float32, exactly the values
  kBF16,  // bfloat16, rounded to nearest even
};

// Bytes of one element on the wire.
constexpr int64_t ElementBytes(TransferDtype dtype) {
  return dtype == TransferDtype::kBF16 ? 2 : 4;
}
// The TensorChunk.dtype / safetensors name: "F32" or "BF16".
absl::string_view DtypeName(TransferDtype dtype);

// float32 -> bf16 bits, round to nearest, ties to even.
// Branch-free, so that loops over it vectorise.
inline uint16_t FloatToBf16(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  const uint32_t rounded = (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;  // may carry into the exponent
  const uint32_t quiet_nan = (u >> 16) | 0x0040u;                   // a NaN stays a quiet NaN
  return static_cast<uint16_t>((u & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}

// bf16 bits -> float32 (exact).
inline float Bf16ToFloat(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// x rounded to the nearest bf16 value, as a float32.
inline float RoundToBf16(float x) { return Bf16ToFloat(FloatToBf16(x)); }

// Chunks on the wire, on the calling thread: the transfer paths call them
// once per chunk from gRPC's threads, where an OpenMP team would only wait
// for the cores the transport is using.
void EncodeBf16(const float* in, int64_t n, uint16_t* out);
void DecodeBf16(const uint16_t* in, int64_t n, float* out);
// Whole models, parallel over elements (the result does not depend on the
// thread count). out[i] = RoundToBf16(in[i]); `out` may be `in`.
void RoundBf16(const float* in, int64_t n, float* out);

// Adds one slot's gradient `g` into the running sum `sum` of a step under
// `dtype`: f32: sum += g; bf16: sum = bf16(sum + bf16(g)). Every party that
// sums slot gradients (trainer, worker, shard) calls this, in slot order.
void AccumulateSlotGradient(TransferDtype dtype, const float* g, int64_t n, float* sum);

// Index of the first bf16 NaN or Inf among `count` values at `bytes` (any
// alignment), or -1.
int64_t FirstNonFiniteBf16(const char* bytes, int64_t count);

}  // namespace muonps

#endif  // MUONPS_COMMON_BF16_H_
