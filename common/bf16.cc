#include "common/bf16.h"

#include <algorithm>

#include "common/parallel.h"

namespace muonps {

absl::string_view DtypeName(TransferDtype dtype) {
  return dtype == TransferDtype::kBF16 ? "BF16" : "F32";
}

// Integer arithmetic only, so every instruction set gives the same bits:
// the AVX2 versions are there for speed alone. The choice is made once, at
// first use, by an ordinary branch rather than an ifunc (target_clones): an
// ifunc resolver runs while the dynamic loader relocates the program, before
// a sanitizer's runtime is up, and an instrumented resolver crashes there.
namespace {

template <typename In, typename Out, Out (*Convert)(In)>
void ConvertAll(const In* in, int64_t n, Out* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = Convert(in[i]);
}

__attribute__((target("avx2"))) void EncodeBf16Avx2(const float* in, int64_t n, uint16_t* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = FloatToBf16(in[i]);
}

__attribute__((target("avx2"))) void DecodeBf16Avx2(const uint16_t* in, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) out[i] = Bf16ToFloat(in[i]);
}

bool HasAvx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}

}  // namespace

void EncodeBf16(const float* in, int64_t n, uint16_t* out) {
  if (HasAvx2()) {
    EncodeBf16Avx2(in, n, out);
  } else {
    ConvertAll<float, uint16_t, FloatToBf16>(in, n, out);
  }
}

void DecodeBf16(const uint16_t* in, int64_t n, float* out) {
  if (HasAvx2()) {
    DecodeBf16Avx2(in, n, out);
  } else {
    ConvertAll<uint16_t, float, Bf16ToFloat>(in, n, out);
  }
}

void RoundBf16(const float* in, int64_t n, float* out) {
  ParallelFor(n, [&](int64_t i) { out[i] = RoundToBf16(in[i]); });
}

void AccumulateSlotGradient(TransferDtype dtype, const float* g, int64_t n, float* sum) {
  if (dtype == TransferDtype::kBF16) {
    ParallelFor(n, [&](int64_t i) { sum[i] = RoundToBf16(sum[i] + RoundToBf16(g[i])); });
  } else {
    ParallelFor(n, [&](int64_t i) { sum[i] += g[i]; });
  }
}

int64_t FirstNonFiniteBf16(const char* bytes, int64_t count) {
  constexpr uint16_t kExponent = 0x7f80u;  // all ones: Inf or NaN
  constexpr int64_t kBlock = 1024;
  for (int64_t base = 0; base < count; base += kBlock) {
    const int64_t end = std::min(count, base + kBlock);
    uint32_t bad = 0;
    for (int64_t i = base; i < end; ++i) {
      uint16_t w;
      std::memcpy(&w, bytes + i * 2, sizeof(w));
      bad |= static_cast<uint32_t>((w & kExponent) == kExponent);
    }
    if (bad != 0) {
      for (int64_t i = base; i < end; ++i) {
        uint16_t w;
        std::memcpy(&w, bytes + i * 2, sizeof(w));
        if ((w & kExponent) == kExponent) return i;
      }
    }
  }
  return -1;
}

}  // namespace muonps
