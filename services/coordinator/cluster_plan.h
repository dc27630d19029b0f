// What a job costs on a cluster shape, before anything runs (`muonps plan`):
// per step and per worker the bytes pulled and pushed and the compute time,
// per shard the memory its tensors take (parameters, Muon momentum or AdamW
// moments, the summed gradient, replicas included) and its Newton-Schulz
// time, and the expected step time with the step's phases run one after
// another (today's step) and with pulls hidden behind the forward pass and
// pushes behind the backward pass (the overlap the design aims for).
//
// The model is arithmetic, not a simulation: a phase's time is its work
// divided by a rate. The rates are options; their defaults were measured on
// the development machine (see kPlanDefaults in cluster_plan.cc), so a plan
// for this machine can be checked against bench/cluster_step.
#ifndef MUONPS_SERVICES_COORDINATOR_CLUSTER_PLAN_H_
#define MUONPS_SERVICES_COORDINATOR_CLUSTER_PLAN_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "muonps/v1/job.pb.h"

namespace muonps {

struct PlanOptions {
  int workers = 1;
  int shards = 1;
  // Each process's network link, Gbit/s per direction; 0 = the default.
  double link_gbps = 0.0;
  // A worker's sustained float32 GFLOP/s in forward and backward; 0 = the default.
  double worker_gflops = 0.0;
  // A shard's sustained GFLOP/s in Newton-Schulz; 0 = the default.
  double shard_gflops = 0.0;
};

struct ShardPlan {
  int tensors = 0, replicas = 0;
  double ns_gflop = 0.0;       // per step, replicas included
  int64_t memory_bytes = 0;    // parameters + optimizer state + summed gradients
  int64_t pull_out_bytes = 0;  // per step, to all workers
  int64_t push_in_bytes = 0;   // per step, from all workers
  double apply_seconds = 0.0;  // Newton-Schulz at shard_gflops
};

struct ClusterPlan {
  PlanOptions options;                                   // with the defaults filled in
  int copies = 1;                                        // of each tensor's state
  int64_t parameters = 0, trainable = 0, activated = 0;  // counts
  int64_t tokens_per_step = 0, tokens_per_worker = 0;    // the busiest worker's
  double flops_per_token = 0.0;                          // forward + backward
  int64_t pull_bytes = 0, push_bytes = 0;                // per worker per step
  double compute_seconds = 0.0;                          // the busiest worker's forward + backward
  double pull_seconds = 0.0, push_seconds = 0.0;         // the slower of worker and shard links
  double apply_seconds = 0.0;                            // the slowest shard
  std::vector<ShardPlan> shards;
  double serial_seconds = 0.0;   // pull + compute + push + apply
  double overlap_seconds = 0.0;  // max(pull, forward) + max(push, backward) + apply
  std::string bottleneck;        // "compute", "pull", "push" or "apply"
};

// Options for a local cluster on the development machine (`muonps local`):
// its workers share the default worker rate, its shards the default shard
// rate, since all of them share the same cores.
PlanOptions LocalPlanOptions(int workers, int shards);

// The plan of `job` (validated, defaults filled) on `options`' shape.
// InvalidArgument for a shape or rate out of range.
absl::StatusOr<ClusterPlan> PlanCluster(const v1::JobSpec& job, const PlanOptions& options);

// The plan as a table for people.
std::string FormatPlan(const v1::JobSpec& job, const ClusterPlan& plan);

}  // namespace muonps

#endif  // MUONPS_SERVICES_COORDINATOR_CLUSTER_PLAN_H_
