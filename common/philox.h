// Counter-based random numbers (Philox4x32-10, Salmon et al., SC'11).
//
// Every random value in muonps is a pure function of (seed, stream, counter):
// any process can produce any tensor's initial values or any batch's sampling
// offsets without sharing state, which is what makes a run bit-identical no
// matter how it is split across processes.
#ifndef MUONPS_COMMON_PHILOX_H_
#define MUONPS_COMMON_PHILOX_H_

#include <array>
#include <cstdint>
#include <string_view>

namespace muonps {

using PhiloxBlock = std::array<uint32_t, 4>;

// One Philox4x32-10 evaluation: 4 random words for (key, counter).
PhiloxBlock Philox4x32(std::array<uint32_t, 2> key, PhiloxBlock counter);

// 64-bit FNV-1a hash of a string: turns a tensor name into a stream id.
uint64_t StreamId(std::string_view name);

// Fills out[0..n) with normal(0, stddev) values for the stream (seed, name).
// Element i depends only on (seed, name, i). Box-Muller in double precision.
void FillNormal(float* out, int64_t n, uint64_t seed, std::string_view name, double stddev);

// A uniform 64-bit value keyed by seed and four counters (e.g. a purpose
// tag, step, slot, row).
uint64_t RandomU64(uint64_t seed, uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3);

}  // namespace muonps

#endif  // MUONPS_COMMON_PHILOX_H_
