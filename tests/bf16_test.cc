// bfloat16 rounding (common/bf16.h) against an independent reference: the
// two bf16 neighbours of a float32 and the exact distance to each in double,
// with ties to the even neighbour and 2^128 standing for infinity, as IEEE
// round-to-nearest-even says. Plus hand-checked cases and the slot-sum rule.
#include "common/bf16.h"

#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "common/philox.h"

namespace muonps {
namespace {

uint32_t Bits(float x) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
}
float FromBits(uint32_t u) {
  float x;
  std::memcpy(&x, &u, sizeof(x));
  return x;
}

// The magnitude of the non-negative bf16 with bits `b` (0x7f80 = 2^128: what
// IEEE rounding compares against when it overflows).
double Magnitude(uint32_t b) {
  if (b == 0x7f80u) return std::ldexp(1.0, 128);
  return static_cast<double>(FromBits(b << 16));
}

// Round to nearest, ties to even, from first principles (finite x only).
uint16_t ReferenceBf16(float x) {
  const uint32_t u = Bits(x);
  const uint32_t sign = u & 0x80000000u;
  const uint32_t lo = (u & 0x7fffffffu) >> 16;  // truncated magnitude, bf16 bits
  const double ax = std::fabs(static_cast<double>(x));
  const double d_lo = ax - Magnitude(lo);
  if (d_lo == 0.0) return static_cast<uint16_t>((sign >> 16) | lo);
  const uint32_t hi = lo + 1;  // the next bf16 up (0x7f80: infinity)
  const double d_hi = Magnitude(hi) - ax;
  uint32_t pick;
  if (d_lo < d_hi) {
    pick = lo;
  } else if (d_hi < d_lo) {
    pick = hi;
  } else {
    pick = (lo & 1u) == 0 ? lo : hi;
  }
  return static_cast<uint16_t>((sign >> 16) | pick);
}

TEST(Bf16Test, HandCheckedCases) {
  EXPECT_EQ(FloatToBf16(1.0f), 0x3f80);
  EXPECT_EQ(FloatToBf16(-2.0f), 0xc000);
  EXPECT_EQ(FloatToBf16(0.0f), 0x0000);
  EXPECT_EQ(FloatToBf16(-0.0f), 0x8000);
  // 1 + 2^-8 lies halfway between 1 and 1 + 2^-7: ties go to the even 1.
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8)), 0x3f80);
  // 1 + 3 * 2^-8 lies halfway between 1 + 2^-7 (odd) and 1 + 2^-6 (even).
  EXPECT_EQ(FloatToBf16(1.0f + 3 * std::ldexp(1.0f, -8)), 0x3f82);
  // Just above the tie rounds up.
  EXPECT_EQ(FloatToBf16(1.0f + std::ldexp(1.0f, -8) + std::ldexp(1.0f, -20)), 0x3f81);
  // The carry moves into the exponent: 2 - 2^-9 rounds to 2.
  EXPECT_EQ(FloatToBf16(2.0f - std::ldexp(1.0f, -9)), 0x4000);
  // Past the largest bf16 (0x7f7f) by half an ulp or more: infinity.
  EXPECT_EQ(FloatToBf16(std::numeric_limits<float>::max()), 0x7f80);
  EXPECT_EQ(FloatToBf16(-std::numeric_limits<float>::infinity()), 0xff80);
  // The smallest float32 subnormal rounds to zero; a bf16 subnormal is kept.
  EXPECT_EQ(FloatToBf16(FromBits(0x00000001u)), 0x0000);
  EXPECT_EQ(FloatToBf16(FromBits(0x00010000u)), 0x0001);
  // NaN stays NaN, quiet, with its sign.
  const uint16_t nan = FloatToBf16(FromBits(0xff800001u));  // a signalling NaN
  EXPECT_TRUE(std::isnan(Bf16ToFloat(nan)));
  EXPECT_EQ(nan & 0x8000, 0x8000);
  EXPECT_NE(nan & 0x0040, 0);
  EXPECT_EQ(Bf16ToFloat(0x3f80), 1.0f);
  EXPECT_EQ(Bf16ToFloat(0x4049), 3.140625f);
}

TEST(Bf16Test, RoundingMatchesTheReferenceOnEveryKindOfFloat) {
  // Random bit patterns cover every exponent, subnormals and the ties (the
  // low 16 bits equal 0x8000) that random values hardly ever hit.
  int64_t ties = 0;
  for (int i = 0; i < 400000; ++i) {
    uint32_t u = static_cast<uint32_t>(RandomU64(7, 0, static_cast<uint32_t>(i), 0, 0));
    if (i % 4 == 1) u = (u & 0xffff0000u) | 0x8000u;  // exact ties
    if (i % 4 == 2) u = (u & 0xffff0000u) | (u & 0x7fffu) | ((i & 8) ? 0x8000u : 0u);
    const float x = FromBits(u);
    if (!std::isfinite(x)) continue;
    ties += (u & 0xffffu) == 0x8000u;
    ASSERT_EQ(FloatToBf16(x), ReferenceBf16(x)) << std::hex << "bits 0x" << u;
    ASSERT_EQ(Bits(RoundToBf16(x)), static_cast<uint32_t>(ReferenceBf16(x)) << 16);
  }
  EXPECT_GT(ties, 50000);
}

TEST(Bf16Test, BuffersMatchTheElementFunctions) {
  std::vector<float> x(10007);
  FillNormal(x.data(), static_cast<int64_t>(x.size()), 3, "x", 1.0);
  std::vector<uint16_t> encoded(x.size());
  std::vector<float> decoded(x.size()), rounded(x.size());
  EncodeBf16(x.data(), static_cast<int64_t>(x.size()), encoded.data());
  DecodeBf16(encoded.data(), static_cast<int64_t>(x.size()), decoded.data());
  RoundBf16(x.data(), static_cast<int64_t>(x.size()), rounded.data());
  for (size_t i = 0; i < x.size(); ++i) {
    ASSERT_EQ(encoded[i], ReferenceBf16(x[i])) << i;
    ASSERT_EQ(Bits(decoded[i]), static_cast<uint32_t>(encoded[i]) << 16) << i;
    ASSERT_EQ(Bits(rounded[i]), Bits(decoded[i])) << i;
  }
}

TEST(Bf16Test, SlotSumRoundsEveryPrefixSoAPushedPrefixContinuesExactly) {
  constexpr int kSlots = 5;
  constexpr int64_t kN = 4099;
  std::vector<std::vector<float>> g(kSlots, std::vector<float>(kN));
  for (int s = 0; s < kSlots; ++s) FillNormal(g[s].data(), kN, 11 + s, "g", 1e-3);
  // The shard's way: every slot on its own.
  std::vector<float> shard(kN, 0.0f);
  for (int s = 0; s < kSlots; ++s)
    AccumulateSlotGradient(TransferDtype::kBF16, g[s].data(), kN, shard.data());
  // A worker's prefix of slots 0..2, sent as bf16 and widened, then the rest.
  std::vector<float> prefix(kN, 0.0f);
  for (int s = 0; s < 3; ++s)
    AccumulateSlotGradient(TransferDtype::kBF16, g[s].data(), kN, prefix.data());
  std::vector<uint16_t> wire(kN);
  EncodeBf16(prefix.data(), kN, wire.data());
  std::vector<float> received(kN), split(kN, 0.0f);
  DecodeBf16(wire.data(), kN, received.data());
  AccumulateSlotGradient(TransferDtype::kBF16, received.data(), kN, split.data());
  for (int s = 3; s < kSlots; ++s)
    AccumulateSlotGradient(TransferDtype::kBF16, g[s].data(), kN, split.data());
  for (int64_t i = 0; i < kN; ++i) {
    // The rule written out with the reference rounding.
    float want = 0.0f;
    for (int s = 0; s < kSlots; ++s) {
      want = Bf16ToFloat(ReferenceBf16(want + Bf16ToFloat(ReferenceBf16(g[s][i]))));
    }
    ASSERT_EQ(Bits(shard[i]), Bits(want)) << i;
    ASSERT_EQ(Bits(split[i]), Bits(want)) << i;
    ASSERT_EQ(Bits(prefix[i]), Bits(received[i])) << "a prefix is not a bf16 value at " << i;
  }
  // f32 is the plain left-to-right sum.
  std::vector<float> f32(kN, 0.0f);
  for (int s = 0; s < kSlots; ++s)
    AccumulateSlotGradient(TransferDtype::kF32, g[s].data(), kN, f32.data());
  float want0 = 0.0f;
  for (int s = 0; s < kSlots; ++s) want0 += g[s][0];
  EXPECT_EQ(Bits(f32[0]), Bits(want0));
}

TEST(Bf16Test, NonFiniteValuesAreFound) {
  std::vector<uint16_t> v(3000, 0x3f80);
  EXPECT_EQ(FirstNonFiniteBf16(reinterpret_cast<const char*>(v.data()), 3000), -1);
  v[2049] = 0x7fc0;  // NaN
  v[2500] = 0xff80;  // -Inf
  EXPECT_EQ(FirstNonFiniteBf16(reinterpret_cast<const char*>(v.data()), 3000), 2049);
  EXPECT_EQ(FirstNonFiniteBf16(reinterpret_cast<const char*>(v.data()) + 2 * 2050, 950), 450);
}

}  // namespace
}  // namespace muonps
