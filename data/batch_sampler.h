// Which token windows make up each batch.
//
// Legend: T sequence length (tokens), n tokens in the stream. A window is
// T + 1 consecutive tokens; a row's inputs are its first T and its targets
// its last T. Every window is a pure function of (step, slot, row) and, for
// random sampling, the seed: any process can build any slot's batch.
#ifndef MUONPS_DATA_BATCH_SAMPLER_H_
#define MUONPS_DATA_BATCH_SAMPLER_H_

#include <cstdint>
#include <vector>

namespace muonps {

// The purpose tag (first Philox counter word) of random window offsets:
// "WIND" in ASCII. Other users of RandomU64 must pick different tags.
inline constexpr uint32_t kRandomWindowTag = 0x57494E44u;

// Samples (micro_batch, T) windows over a token stream.
//
// sequential: window w = tokens[w*T, w*T + T + 1), n_windows = (n - 1) / T;
//   step t, slot s, row r takes window ((t*slots + s)*micro_batch + r) mod
//   n_windows, so consecutive rows of consecutive slots and steps walk the
//   stream in order and wrap around at its end.
// random: the window starts at offset
//   RandomU64(seed, kRandomWindowTag, t, s, r) mod (n - T), with t, s and r
//   taken modulo 2^32, i.e. tokens[o, o + T + 1).
//
// Preconditions (programmer errors, not checked in release builds):
// tokens->size() >= T + 1 (LoadTokenCorpus guarantees it), T, slots,
// micro_batch >= 1, step >= 0, 0 <= slot < slots. The token vector is
// borrowed and must outlive the sampler. Thread-safe: Fill is const.
class BatchSampler {
 public:
  BatchSampler(const std::vector<int32_t>* tokens, int T, int slots, int micro_batch, bool random,
               uint64_t seed);

  // Writes the batch of (step, slot): inputs and targets are (micro_batch, T).
  void Fill(int64_t step, int slot, int32_t* inputs, int32_t* targets) const;

  // The number of distinct sequential windows, (n - 1) / T.
  int64_t num_windows() const;

 private:
  // Offset of the first token of row `row`'s window.
  int64_t WindowStart(int64_t step, int slot, int row) const;

  const std::vector<int32_t>* tokens_;
  int T_;
  int slots_;
  int micro_batch_;
  bool random_;
  uint64_t seed_;
};

// The fixed validation windows: the first min(max_windows, (n - 1) / T)
// sequential windows of `val`. Resizes inputs and targets to (count, T),
// fills them and returns count (0 when max_windows <= 0 or val is shorter
// than T + 1).
int64_t ValidationWindows(const std::vector<int32_t>& val, int T, int max_windows,
                          std::vector<int32_t>* inputs, std::vector<int32_t>* targets);

}  // namespace muonps

#endif  // MUONPS_DATA_BATCH_SAMPLER_H_
