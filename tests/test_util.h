// Shared GoogleTest scaffolding for tests that work with files.
#ifndef MUONPS_TESTS_TEST_UTIL_H_
#define MUONPS_TESTS_TEST_UTIL_H_

#include <stdlib.h>

#include <algorithm>
#include <filesystem>
#include <string>
#include <system_error>

#include "gtest/gtest.h"

namespace muonps::testing_util {

// A fixture that gives every test a fresh directory under
// ::testing::TempDir(), named after the test suite, and removes it (with
// everything in it) after the test.
class TempDirTest : public ::testing::Test {
 protected:
  void SetUp() override {
    const ::testing::TestInfo* info = ::testing::UnitTest::GetInstance()->current_test_info();
    std::string prefix = info != nullptr ? info->test_suite_name() : "test";
    // Parameterised suites are named "Instantiation/Suite".
    std::replace(prefix.begin(), prefix.end(), '/', '_');
    std::string pattern = ::testing::TempDir() + "/" + prefix + ".XXXXXX";
    ASSERT_NE(mkdtemp(pattern.data()), nullptr) << pattern;
    dir_ = pattern;
  }

  void TearDown() override {
    if (dir_.empty()) return;
    std::error_code ec;
    std::filesystem::remove_all(dir_, ec);
  }

  // The test's directory.
  const std::string& dir() const { return dir_; }

  // The path of `name` inside the test's directory.
  std::string Path(const std::string& name) const { return dir_ + "/" + name; }

 private:
  std::string dir_;
};

}  // namespace muonps::testing_util

#endif  // MUONPS_TESTS_TEST_UTIL_H_
