#include "services/coordinator/cluster_plan.h"

#include <algorithm>
#include <cmath>
#include <map>
#include <utility>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/job_spec.h"
#include "common/model_layout.h"
#include "services/coordinator/placement.h"
#include "step/step.h"

namespace muonps {
namespace {

// Rates measured on the development machine (AMD EPYC, 2 cores, OpenBLAS
// Haswell kernel, all threads), so that a plan of a job on this machine can
// be compared with bench/cluster_step:
// - worker: bench/train_step's forward + backward of the default model,
//   231.7 ms for 2048 tokens, against this file's count of its FLOPs
//   (14.8 GFLOP): 64 GFLOP/s;
// - shard: the same benchmark's optimizer step, 60.9 ms, nearly all of it
//   Newton-Schulz on the default model's matrices (6.67 GFLOP as counted by
//   NewtonSchulzFlops): 110 GFLOP/s;
// - link: bench/transfer's raw loopback TCP, 2.37 GB/s: 19 Gbit/s.
struct PlanDefaults {
  double worker_gflops = 64.0;
  double shard_gflops = 110.0;
  double link_gbps = 19.0;
};
constexpr PlanDefaults kPlanDefaults;

// Bytes in a second of a link of `gbps` Gbit/s.
double BytesPerSecond(double gbps) { return gbps * 1e9 / 8.0; }

}  // namespace

PlanOptions LocalPlanOptions(int workers, int shards) {
  PlanOptions o;
  o.workers = workers;
  o.shards = shards;
  o.worker_gflops = kPlanDefaults.worker_gflops / std::max(1, workers);
  o.shard_gflops = kPlanDefaults.shard_gflops / std::max(1, shards);
  return o;
}

absl::StatusOr<ClusterPlan> PlanCluster(const v1::JobSpec& job, const PlanOptions& options) {
  ClusterPlan plan;
  plan.options = options;
  PlanOptions& o = plan.options;
  if (o.workers < 1 || o.workers > 1000000) {
    return absl::InvalidArgumentError(absl::StrCat("workers: ", o.workers, " not in [1, 1e6]"));
  }
  if (o.shards < 1 || o.shards > 100000) {
    return absl::InvalidArgumentError(absl::StrCat("shards: ", o.shards, " not in [1, 1e5]"));
  }
  for (auto [name, value] : {std::pair<const char*, double>{"link_gbps", o.link_gbps},
                             {"worker_gflops", o.worker_gflops},
                             {"shard_gflops", o.shard_gflops}}) {
    if (!(value >= 0.0) || !std::isfinite(value)) {
      return absl::InvalidArgumentError(absl::StrCat(name, ": must be finite and >= 0"));
    }
  }
  if (o.link_gbps == 0.0) o.link_gbps = kPlanDefaults.link_gbps;
  if (o.worker_gflops == 0.0) o.worker_gflops = kPlanDefaults.worker_gflops;
  if (o.shard_gflops == 0.0) o.shard_gflops = kPlanDefaults.shard_gflops;

  const v1::ModelConfig& m = job.model();
  const ModelLayout layout(m);
  plan.copies = std::min(o.shards, std::max(1, job.recovery().replicas()));
  const int copies = plan.copies;
  // Each token passes through K of the E routed experts of a MoE layer; the
  // embedding is a lookup, not a product.
  const double routed_share =
      m.n_routed_experts() > 0 ? static_cast<double>(m.num_experts_per_tok()) / m.n_routed_experts()
                               : 0.0;
  double activated = 0.0;
  for (const TensorInfo& t : layout.tensors()) {
    plan.parameters += t.numel;
    if (t.trainable()) plan.trainable += t.numel;
    if (t.shape.size() != 2 || t.role == TensorRole::kEmbedding) continue;
    activated += absl::StrContains(t.name, ".mlp.experts.") ? routed_share * t.numel : t.numel;
  }
  plan.activated = static_cast<int64_t>(std::llround(activated));
  const double T = m.max_position_embeddings();
  // Forward: 2 FLOP per activated weight and token, and per layer the two
  // T x T attention products (QKᵀ over H·Dqk channels and AV over H·Dv,
  // 2·T·C each under MHA); backward twice that.
  const double H = m.num_attention_heads(), D = m.hidden_size() / H;
  const bool mla = m.attention() == "mla";
  const double dqk = mla ? m.qk_nope_head_dim() + m.qk_rope_head_dim() : D;
  const double dv = mla ? m.v_head_dim() : D;
  plan.flops_per_token = 3.0 * (2.0 * activated + 2.0 * m.num_hidden_layers() * T * H * (dqk + dv));
  plan.tokens_per_step = StepScalesOf(job).global_tokens;
  const int slots = job.batch().slots();
  const int busiest = (slots + o.workers - 1) / o.workers;  // slots of the busiest worker
  plan.tokens_per_worker = plan.tokens_per_step / slots * busiest;
  plan.compute_seconds =
      static_cast<double>(plan.tokens_per_worker) * plan.flops_per_token / (o.worker_gflops * 1e9);

  // Every worker pulls every tensor and pushes every gradient to each copy
  // (workers with no slot sit idle: at most `slots` workers work).
  const int working = std::min(o.workers, slots);
  // On the wire each element is transfer.dtype's size; the shards' memory
  // is float32 whatever it is.
  const int64_t wire = ElementBytes(TransferDtypeOf(job));
  plan.pull_bytes = plan.parameters * wire;
  plan.push_bytes = plan.trainable * wire * copies;
  const Placement placement = PlaceTensors(layout, job.optimizer(), o.shards, copies);
  std::map<std::string, const TensorInfo*> by_name;
  for (const TensorInfo& t : layout.tensors()) by_name[t.name] = &t;
  const double link = BytesPerSecond(o.link_gbps);
  double shard_pull = 0.0, shard_push = 0.0;
  for (const v1::ShardPlacement& p : placement.shards) {
    ShardPlan s;
    s.tensors = p.tensors_size();
    s.replicas = p.replicas_size();
    auto add = [&](const std::string& name, bool owned) {
      const TensorInfo& t = *by_name.at(name);
      const int64_t bytes = t.numel * static_cast<int64_t>(sizeof(float));
      int64_t state = 0;
      if (t.trainable()) state = UsesMuon(t, job.optimizer().name()) ? 1 : 2;
      s.memory_bytes += bytes * (1 + state + (t.trainable() ? 1 : 0));
      if (t.trainable() && UsesMuon(t, job.optimizer().name())) {
        s.ns_gflop += NewtonSchulzFlops(t.rows(), t.cols(), job.optimizer().ns_steps()) * 1e-9;
      }
      if (owned) s.pull_out_bytes += t.numel * wire * working;
      if (t.trainable()) s.push_in_bytes += t.numel * wire * working;
    };
    for (const std::string& name : p.tensors()) add(name, true);
    for (const std::string& name : p.replicas()) add(name, false);
    s.apply_seconds = s.ns_gflop / o.shard_gflops;
    shard_pull = std::max(shard_pull, static_cast<double>(s.pull_out_bytes) / link);
    shard_push = std::max(shard_push, static_cast<double>(s.push_in_bytes) / link);
    plan.apply_seconds = std::max(plan.apply_seconds, s.apply_seconds);
    plan.shards.push_back(s);
  }
  // A phase lasts as long as the busier end of the wire: a worker's link,
  // or the busiest shard's serving every worker.
  plan.pull_seconds = std::max(static_cast<double>(plan.pull_bytes) / link, shard_pull);
  plan.push_seconds = std::max(static_cast<double>(plan.push_bytes) / link, shard_push);
  plan.serial_seconds =
      plan.pull_seconds + plan.compute_seconds + plan.push_seconds + plan.apply_seconds;
  // Forward is a third of forward + backward.
  const double forward = plan.compute_seconds / 3.0, backward = plan.compute_seconds - forward;
  plan.overlap_seconds = std::max(plan.pull_seconds, forward) +
                         std::max(plan.push_seconds, backward) + plan.apply_seconds;
  const std::pair<double, const char*> phases[] = {{plan.compute_seconds, "compute"},
                                                   {plan.pull_seconds, "pull"},
                                                   {plan.push_seconds, "push"},
                                                   {plan.apply_seconds, "apply"}};
  plan.bottleneck = std::max_element(std::begin(phases), std::end(phases))->second;
  return plan;
}

std::string FormatPlan(const v1::JobSpec& job, const ClusterPlan& p) {
  const v1::ModelConfig& m = job.model();
  auto mib = [](int64_t bytes) { return static_cast<double>(bytes) / 1048576.0; };
  std::string out = absl::StrFormat(
      "model: %d layers, hidden %d, %d routed experts (%d per token), vocab %d, T %d\n"
      "parameters %.1f M (trainable %.1f M), activated in products %.1f M per token\n"
      "cluster: %d worker(s), %d shard(s), %d cop%s of each tensor's state; link %.1f Gbit/s, "
      "worker %.1f GFLOP/s, shard %.1f GFLOP/s\n\n",
      m.num_hidden_layers(), m.hidden_size(), m.n_routed_experts(), m.num_experts_per_tok(),
      m.vocab_size(), m.max_position_embeddings(), p.parameters / 1e6, p.trainable / 1e6,
      p.activated / 1e6, p.options.workers, p.options.shards, p.copies, p.copies == 1 ? "y" : "ies",
      p.options.link_gbps, p.options.worker_gflops, p.options.shard_gflops);
  absl::StrAppendFormat(&out,
                        "per step and worker (the busiest of %d tokens of %d; %s on the wire):\n",
                        p.tokens_per_worker, p.tokens_per_step, DtypeName(TransferDtypeOf(job)));
  absl::StrAppendFormat(&out, "  pulled   %10.1f MiB  %9.1f ms\n", mib(p.pull_bytes),
                        p.pull_seconds * 1e3);
  absl::StrAppendFormat(&out, "  compute  %10.1f GFLOP %8.1f ms\n",
                        p.tokens_per_worker * p.flops_per_token * 1e-9, p.compute_seconds * 1e3);
  absl::StrAppendFormat(&out, "  pushed   %10.1f MiB  %9.1f ms\n", mib(p.push_bytes),
                        p.push_seconds * 1e3);
  absl::StrAppendFormat(&out, "  apply    %21.1f ms  (Newton-Schulz on the slowest shard)\n\n",
                        p.apply_seconds * 1e3);
  absl::StrAppendFormat(&out, "%-7s %8s %9s %12s %12s %14s %14s\n", "shard", "tensors", "replicas",
                        "memory MiB", "NS GFLOP", "pull out MiB", "push in MiB");
  for (size_t i = 0; i < p.shards.size(); ++i) {
    const ShardPlan& s = p.shards[i];
    absl::StrAppendFormat(&out, "%-7d %8d %9d %12.1f %12.3f %14.1f %14.1f\n", static_cast<int>(i),
                          s.tensors, s.replicas, mib(s.memory_bytes), s.ns_gflop,
                          mib(s.pull_out_bytes), mib(s.push_in_bytes));
  }
  absl::StrAppendFormat(&out,
                        "\nstep time: %.1f ms with its phases in turn, %.1f ms with pulls behind "
                        "the forward pass and pushes behind the backward pass; bottleneck: %s\n",
                        p.serial_seconds * 1e3, p.overlap_seconds * 1e3, p.bottleneck);
  return out;
}

}  // namespace muonps
