// Shared by the GPU tests (cuda_ops_test.cc, cuda_backend_test.cc): random
// inputs, the relative error and the per-op tolerances they are judged by,
// and the fixture that skips a test where no CUDA device is visible.
// Included only where MUONPS_HAVE_CUDA is set.
#ifndef MUONPS_TESTS_CUDA_TEST_UTIL_H_
#define MUONPS_TESTS_CUDA_TEST_UTIL_H_

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <string>
#include <vector>

#include "common/philox.h"
#include "workers/cuda/cuda_status.h"

namespace muonps {

inline std::vector<float> Random(int64_t n, const std::string& name, double scale = 1.0) {
  std::vector<float> x(static_cast<size_t>(n));
  FillNormal(x.data(), n, 3, name, scale);
  return x;
}

// max |a - b| / max(|b|) over the tensor: a relative error that does not
// blow up on entries near zero.
inline double RelMaxError(const std::vector<float>& a, const std::vector<float>& b) {
  double diff = 0.0, scale = 0.0;
  for (size_t i = 0; i < a.size(); ++i) {
    diff = std::max(diff, std::abs(static_cast<double>(a[i]) - b[i]));
    scale = std::max(scale, std::abs(static_cast<double>(b[i])));
  }
  return scale > 0 ? diff / scale : diff;
}

inline std::vector<float> Zeros(int64_t n) {
  return std::vector<float>(static_cast<size_t>(n), 0.0f);
}

// Float32 element-wise ops differ from the CPU only by fused multiply-adds
// and expf; row reductions add in another order.
constexpr double kElementwiseTol = 1e-5;
constexpr double kReductionTol = 1e-4;

// Skips each test, with cudaGetDeviceCount's reason, where no CUDA device
// is visible.
class CudaDeviceTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string why;
    if (cuda::VisibleDevices(&why) == 0) GTEST_SKIP() << "no CUDA device visible: " << why;
  }
};

}  // namespace muonps

#endif  // MUONPS_TESTS_CUDA_TEST_UTIL_H_
