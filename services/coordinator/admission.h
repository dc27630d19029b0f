// Admission by size: before a job is queued, the memory it will need on the
// coordinator, on each shard and on each worker is estimated from its spec
// and compared with what those processes may use. A job that cannot fit is
// refused at submit, with the estimate in the message, instead of failing
// (or crash-looping its members) later.
#ifndef MUONPS_SERVICES_COORDINATOR_ADMISSION_H_
#define MUONPS_SERVICES_COORDINATOR_ADMISSION_H_

#include <cstdint>

#include "absl/status/status.h"
#include "muonps/v1/job.pb.h"

namespace muonps {

// Upper estimates in bytes, from the spec alone (no layout is built, so an
// absurd spec costs nothing to estimate).
struct MemoryEstimate {
  double tensors = 0;
  double parameters = 0;
  double largest_tensor = 0;  // parameters of the largest tensor
  double coordinator = 0;     // the job's records and placement
  double shard = 0;           // parameters, optimizer state, gradients of one shard's part
  double worker = 0;          // parameters, gradients and one slot's activations
};

// `spec` with defaults filled in and valid; `shards` the shards it will be
// placed on (at least 1).
MemoryEstimate EstimateMemory(const v1::JobSpec& spec, int shards);

// What each kind of process may use, in bytes (0: not known, not checked).
struct MemoryLimits {
  int64_t coordinator = 0;
  int64_t shard = 0;
  int64_t worker = 0;
};

// Most tensors a job may have: the coordinator and every shard keep per
// tensor records.
inline constexpr double kMaxTensors = 100000;

// RESOURCE_EXHAUSTED naming the process kind, the estimate and the limit
// when the job does not fit.
absl::Status AdmitBySize(const v1::JobSpec& spec, int shards, const MemoryLimits& limits);

}  // namespace muonps

#endif  // MUONPS_SERVICES_COORDINATOR_ADMISSION_H_
