// Entry point of every test binary: the same compute environment as the
// muonps binary (fast BLAS kernel, sleeping idle OpenMP threads), then
// GoogleTest.
#include <gtest/gtest.h>

#include "common/blas_runtime.h"

int main(int argc, char** argv) {
  muonps::PrepareComputeRuntime(argc, argv);
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
