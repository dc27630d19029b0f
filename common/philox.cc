#include "common/philox.h"

#include <cmath>

namespace muonps {
namespace {

constexpr uint32_t kMul0 = 0xD2511F53u;
constexpr uint32_t kMul1 = 0xCD9E8D57u;
constexpr uint32_t kWeyl0 = 0x9E3779B9u;
constexpr uint32_t kWeyl1 = 0xBB67AE85u;

inline void MulHiLo(uint32_t a, uint32_t b, uint32_t* hi, uint32_t* lo) {
  const uint64_t p = static_cast<uint64_t>(a) * b;
  *hi = static_cast<uint32_t>(p >> 32);
  *lo = static_cast<uint32_t>(p);
}

// Uniform in (0, 1]: never 0, so log() is finite.
inline double UniformOpen(uint32_t x) { return (static_cast<double>(x) + 1.0) / 4294967296.0; }

}  // namespace

PhiloxBlock Philox4x32(std::array<uint32_t, 2> key, PhiloxBlock ctr) {
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    MulHiLo(kMul0, ctr[0], &hi0, &lo0);
    MulHiLo(kMul1, ctr[2], &hi1, &lo1);
    ctr = {hi1 ^ ctr[1] ^ key[0], lo1, hi0 ^ ctr[3] ^ key[1], lo0};
    key[0] += kWeyl0;
    key[1] += kWeyl1;
  }
  return ctr;
}

uint64_t StreamId(std::string_view name) {
  uint64_t h = 0xcbf29ce484222325ull;
  for (unsigned char c : name) {
    h ^= c;
    h *= 0x100000001b3ull;
  }
  return h;
}

void FillNormal(float* out, int64_t n, uint64_t seed, std::string_view name, double stddev) {
  const std::array<uint32_t, 2> key = {static_cast<uint32_t>(seed),
                                       static_cast<uint32_t>(seed >> 32)};
  const uint64_t stream = StreamId(name);
  constexpr double kTwoPi = 6.283185307179586476925286766559;
  for (int64_t block = 0; block * 4 < n; ++block) {
    const PhiloxBlock r =
        Philox4x32(key, {static_cast<uint32_t>(block), static_cast<uint32_t>(block >> 32),
                         static_cast<uint32_t>(stream), static_cast<uint32_t>(stream >> 32)});
    double z[4];
    for (int pair = 0; pair < 2; ++pair) {
      const double radius = std::sqrt(-2.0 * std::log(UniformOpen(r[2 * pair])));
      const double angle = kTwoPi * UniformOpen(r[2 * pair + 1]);
      z[2 * pair] = radius * std::cos(angle);
      z[2 * pair + 1] = radius * std::sin(angle);
    }
    for (int j = 0; j < 4 && block * 4 + j < n; ++j) {
      out[block * 4 + j] = static_cast<float>(stddev * z[j]);
    }
  }
}

uint64_t RandomU64(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3) {
  const PhiloxBlock r = Philox4x32({static_cast<uint32_t>(seed), static_cast<uint32_t>(seed >> 32)},
                                   {c0, c1, c2, c3});
  return (static_cast<uint64_t>(r[0]) << 32) | r[1];
}

}  // namespace muonps
