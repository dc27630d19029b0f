// The headers most test binaries parse: precompiled once
// (tests/CMakeLists.txt, MUONPS_PCH) and reused by every test target.
#pragma once

#include <gmock/gmock.h>
#include <grpcpp/grpcpp.h>
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <map>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "muonps/v1/coordinator.grpc.pb.h"
#include "muonps/v1/shard.grpc.pb.h"
#include "nlohmann/json.hpp"
