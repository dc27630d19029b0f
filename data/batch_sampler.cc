#include "data/batch_sampler.h"

#include <algorithm>
#include <cassert>

#include "common/philox.h"

namespace muonps {

BatchSampler::BatchSampler(const std::vector<int32_t>* tokens, int T, int slots, int micro_batch,
                           bool random, uint64_t seed)
    : tokens_(tokens),
      T_(T),
      slots_(slots),
      micro_batch_(micro_batch),
      random_(random),
      seed_(seed) {
  assert(tokens != nullptr && T >= 1 && slots >= 1 && micro_batch >= 1);
  assert(static_cast<int64_t>(tokens->size()) >= static_cast<int64_t>(T) + 1);
}

int64_t BatchSampler::num_windows() const {
  const int64_t n = static_cast<int64_t>(tokens_->size());
  return n >= 1 ? (n - 1) / T_ : 0;
}

int64_t BatchSampler::WindowStart(int64_t step, int slot, int row) const {
  const uint64_t n = tokens_->size();
  if (random_) {
    const uint64_t r = RandomU64(seed_, kRandomWindowTag, static_cast<uint32_t>(step),
                                 static_cast<uint32_t>(slot), static_cast<uint32_t>(row));
    return static_cast<int64_t>(r % (n - static_cast<uint64_t>(T_)));
  }
  // Unsigned: well defined even for a (misused) negative step.
  const uint64_t index =
      (static_cast<uint64_t>(step) * static_cast<uint64_t>(slots_) + static_cast<uint64_t>(slot)) *
          static_cast<uint64_t>(micro_batch_) +
      static_cast<uint64_t>(row);
  const uint64_t window = index % static_cast<uint64_t>(num_windows());
  return static_cast<int64_t>(window * static_cast<uint64_t>(T_));
}

void BatchSampler::Fill(int64_t step, int slot, int32_t* inputs, int32_t* targets) const {
  const int64_t rows_size = static_cast<int64_t>(micro_batch_) * T_;
  if (num_windows() == 0) {  // precondition broken: give defined output, not a crash
    std::fill(inputs, inputs + rows_size, 0);
    std::fill(targets, targets + rows_size, 0);
    return;
  }
  const int32_t* data = tokens_->data();
  for (int row = 0; row < micro_batch_; ++row) {
    const int32_t* window = data + WindowStart(step, slot, row);
    std::copy(window, window + T_, inputs + static_cast<int64_t>(row) * T_);
    std::copy(window + 1, window + T_ + 1, targets + static_cast<int64_t>(row) * T_);
  }
}

int64_t ValidationWindows(const std::vector<int32_t>& val, int T, int max_windows,
                          std::vector<int32_t>* inputs, std::vector<int32_t>* targets) {
  const int64_t n = static_cast<int64_t>(val.size());
  int64_t count = 0;
  if (T >= 1 && n >= 1 && max_windows > 0) {
    count = std::min<int64_t>(max_windows, (n - 1) / T);
  }
  inputs->resize(static_cast<size_t>(count * T));
  targets->resize(static_cast<size_t>(count * T));
  for (int64_t w = 0; w < count; ++w) {
    const int32_t* window = val.data() + w * T;
    std::copy(window, window + T, inputs->data() + w * T);
    std::copy(window + 1, window + T + 1, targets->data() + w * T);
  }
  return count;
}

}  // namespace muonps
