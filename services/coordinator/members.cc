// The cluster side of the coordinator: members register, heartbeat and lose
// their leases; workers take tasks and report slots, evaluations and
// failures.
#include <algorithm>
#include <cmath>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "common/numerics.h"
#include "rpc/auth.h"
#include "rpc/metrics.h"
#include "rpc/rpc_util.h"
#include "services/coordinator/coordinator.h"
#include "step/step.h"

namespace muonps {
namespace {

grpc::Status UnknownJob(const std::string& job_id) {
  return Refuse(absl::StatusCode::kNotFound, absl::StrCat("job_id: no job \"", job_id, "\""));
}

}  // namespace
grpc::Status Coordinator::GetCluster(const grpc::ServerContext& context,
                                     v1::GetClusterResponse* response) {
  absl::StatusOr<User> user = Caller(context);
  if (!user.ok()) return ToGrpcStatus(user.status());
  absl::MutexLock lock(&mu_);
  ExpireMembersLocked();
  for (bool shards : {true, false}) {
    for (const Member* m : LiveLocked(shards)) {
      v1::Member* out = shards ? response->add_shards() : response->add_workers();
      out->set_member_id(m->id);
      out->set_address(m->address);
      out->set_last_seen_seconds_ago(absl::ToDoubleSeconds(absl::Now() - m->last_seen));
      out->set_job_id(m->job_id);
    }
  }
  return grpc::Status::OK;
}

// ---------------------------------------------------------------------------
// ClusterService

grpc::Status Coordinator::Register(const grpc::ServerContext& context, bool shard,
                                   const std::string& address, int threads, int64_t memory_bytes,
                                   const v1::NumericsProfile& numerics, std::string* member_id,
                                   std::string* member_secret) {
  if (!options_.cluster_secret.empty() &&
      !CallerPresents(context, kClusterSecretHeader, options_.cluster_secret)) {
    metrics_.refused_members.Increment();
    return Refuse(absl::StatusCode::kUnauthenticated,
                  "registering needs the cluster secret (--cluster_secret_file)");
  }
  if (shard && address.empty()) {
    return Refuse(absl::StatusCode::kInvalidArgument,
                  "address: a shard must give the address it serves on");
  }
  if (address.size() > 256) {
    return Refuse(absl::StatusCode::kInvalidArgument, "address: longer than 256 bytes");
  }
  if (shard) {
    // host:port with a port in range, so the coordinator only dials shards.
    const size_t colon = address.rfind(':');
    int port = 0;
    if (colon == std::string::npos || colon == 0 ||
        !absl::SimpleAtoi(address.substr(colon + 1), &port) || port < 1 || port > 65535) {
      return Refuse(absl::StatusCode::kInvalidArgument,
                    absl::StrCat("address: \"", address, "\" is not host:port"));
    }
  }
  if (threads < 0 || threads > 4096 || memory_bytes < 0) {
    return Refuse(absl::StatusCode::kInvalidArgument, "threads/memory_bytes: out of range");
  }
  const std::string who = absl::StrCat(shard ? "the shard at " : "the worker at ",
                                       address.empty() ? "?" : address.substr(0, 256));
  if (absl::Status st = CheckSameNumerics(numerics, who, LocalNumerics(), "the coordinator");
      !st.ok()) {
    metrics_.refused_members.Increment();
    Log(std::string(st.message()));
    return Refuse(absl::StatusCode::kFailedPrecondition, std::string(st.message()));
  }
  if (numerics.device().size() > 256) {
    return Refuse(absl::StatusCode::kInvalidArgument, "numerics.device: longer than 256 bytes");
  }
  absl::MutexLock lock(&mu_);
  // One kind of device per role: a GPU computes within tolerances of the
  // CPU, not bit for bit, so a job's bits would depend on who computed what.
  for (const auto& [other_id, other] : members_) {
    if (other.shard != shard || (shard && other.address == address)) continue;
    if (other.device != numerics.device()) {
      const auto where = [](const std::string& d) {
        return d.empty() ? std::string("the CPU") : d;
      };
      const std::string message = absl::StrCat(
          who, " computes on ", where(numerics.device()), ", but ", other_id, " (",
          other.address.empty() ? "?" : other.address, ") computes on ", where(other.device),
          ": every ", shard ? "shard" : "worker",
          " of a cluster computes on the same kind of device (--device), or the job's bits "
          "would depend on which one computed what");
      metrics_.refused_members.Increment();
      Log(message);
      return Refuse(absl::StatusCode::kFailedPrecondition, message);
    }
  }
  if (shard) {
    // Only one process serves an address: a shard registering at the
    // address of a member is that member restarted (a Kubernetes pod keeps
    // its name), and the old registration is gone without waiting for its
    // lease.
    for (auto it = members_.begin(); it != members_.end();) {
      if (it->second.shard && it->second.address == address) {
        Log(absl::StrCat(it->first, " (", address, ") replaced by a new registration"));
        it = members_.erase(it);
      } else {
        ++it;
      }
    }
  }
  // Unguessable ids, unique across coordinator restarts: a member of an
  // earlier coordinator never holds an id of this one.
  const std::string id = absl::StrCat(shard ? "shard-" : "worker-", RandomHex(6));
  Member& m = members_[id];
  m.id = id;
  m.secret = RandomHex(24);
  m.address = address;
  m.shard = shard;
  m.threads = threads;
  m.memory_bytes = memory_bytes;
  m.device = numerics.device();
  *member_secret = m.secret;
  m.last_seen = absl::Now();
  m.order = next_order_++;
  *member_id = id;
  UpdateJobGaugesLocked();
  return grpc::Status::OK;
}

grpc::Status Coordinator::AuthenticateMemberLocked(const grpc::ServerContext& context,
                                                   const std::string& id, bool shard) const {
  auto it = members_.find(id);
  if (it == members_.end() || it->second.shard != shard) {
    return Refuse(
        absl::StatusCode::kNotFound,
        absl::StrCat(shard ? "member_id" : "worker_id", ": \"", id.substr(0, 64),
                     "\" is not a registered ", shard ? "member" : "worker", "; register again"));
  }
  if (!CallerPresents(context, kMemberSecretHeader, it->second.secret)) {
    return Refuse(absl::StatusCode::kUnauthenticated,
                  absl::StrCat("member ", id, ": the call lacks its member secret"));
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::Heartbeat(const grpc::ServerContext& context,
                                    const v1::HeartbeatRequest& request,
                                    v1::HeartbeatResponse* response) {
  absl::MutexLock lock(&mu_);
  auto it = members_.find(request.member_id());
  if (it == members_.end()) {
    return Refuse(absl::StatusCode::kNotFound,
                  absl::StrCat("member_id: \"", request.member_id().substr(0, 64),
                               "\" is not registered; register again"));
  }
  if (grpc::Status st = AuthenticateMemberLocked(context, request.member_id(), it->second.shard);
      !st.ok()) {
    return st;
  }
  it->second.last_seen = absl::Now();
  it->second.confirmed = true;
  if (request.draining() && !it->second.draining) {
    it->second.draining = true;
    Log(absl::StrCat(it->first, " (", it->second.address, ") is leaving"));
  }
  for (const std::string& id : ended_recently_) response->add_ended_job_ids(id);
  return grpc::Status::OK;
}

grpc::Status Coordinator::GetTask(grpc::ServerContext* context, const v1::GetTaskRequest& request,
                                  v1::GetTaskResponse* response) {
  const std::string& id = request.worker_id();
  const double wait = std::min(30.0, std::max(0.0, request.wait_seconds()));
  const absl::Time deadline = absl::Now() + absl::Seconds(wait);
  absl::MutexLock lock(&mu_);
  auto known = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    auto it = members_.find(id);
    return it != members_.end() && !it->second.shard;
  };
  if (grpc::Status st = AuthenticateMemberLocked(*context, id, /*shard=*/false); !st.ok()) {
    return st;
  }
  members_[id].last_seen = absl::Now();
  // A worker asking for work has finished or abandoned what it was given.
  if (step_ != nullptr) {
    for (TaskRecord& t : step_->tasks) {
      if (t.worker == id && t.delivered && !t.done) {
        t.worker.clear();
        t.delivered = false;
        metrics_.reassignments.Increment();
      }
    }
  }
  TaskRecord* pick = nullptr;
  auto available = [&]() ABSL_SHARED_LOCKS_REQUIRED(mu_) {
    pick = nullptr;
    if (shutdown_ || !known()) return true;
    if (step_ == nullptr) return false;
    for (TaskRecord& t : step_->tasks) {
      if (!t.done && !t.delivered && t.worker == id) {
        pick = &t;
        return true;
      }
    }
    for (TaskRecord& t : step_->tasks) {
      if (!t.done && t.worker.empty()) {
        pick = &t;
        return true;
      }
    }
    return false;
  };
  while (!available() && absl::Now() < deadline && !context->IsCancelled()) {
    mu_.AwaitWithDeadline(absl::Condition(&available),
                          std::min(deadline, absl::Now() + absl::Milliseconds(250)));
  }
  if (!known()) {
    return Refuse(absl::StatusCode::kNotFound,
                  absl::StrCat("worker_id: \"", id, "\" is not registered; register again"));
  }
  if (pick != nullptr && available()) {
    pick->worker = id;
    pick->delivered = true;
    pick->delivered_at = absl::Now();
    *response->mutable_task() = pick->task;
    members_[id].job_id = pick->task.job_id();
  }
  return grpc::Status::OK;
}

absl::StatusOr<Coordinator::TaskRecord*> Coordinator::HeldTaskLocked(const std::string& worker_id,
                                                                     const std::string& task_id) {
  if (step_ != nullptr) {
    for (TaskRecord& t : step_->tasks) {
      if (t.task.task_id() != task_id) continue;
      if (t.worker == worker_id && t.delivered) return &t;
      break;
    }
  }
  return absl::FailedPreconditionError(
      absl::StrCat("task_id: worker ", worker_id, " does not hold task \"", task_id.substr(0, 64),
                   "\" (it ended, or was given to another worker)"));
}

void Coordinator::ExpireTasksLocked() {
  if (step_ == nullptr || options_.task_timeout_seconds <= 0) return;
  const absl::Time now = absl::Now();
  for (TaskRecord& t : step_->tasks) {
    if (t.delivered && !t.done &&
        now - t.delivered_at > absl::Seconds(options_.task_timeout_seconds)) {
      Log(absl::StrCat(t.task.task_id(), " of ", t.task.job_id(), ": worker ", t.worker,
                       " did not report within ", options_.task_timeout_seconds,
                       " s; the task goes to another worker"));
      t.worker.clear();
      t.delivered = false;
      metrics_.reassignments.Increment();
    }
  }
}

grpc::Status Coordinator::ReportSlots(const grpc::ServerContext& context,
                                      const v1::ReportSlotsRequest& request,
                                      v1::ReportSlotsResponse* response) {
  absl::MutexLock lock(&mu_);
  if (grpc::Status st = AuthenticateMemberLocked(context, request.worker_id(), false); !st.ok()) {
    return st;
  }
  if (jobs_.count(request.job_id()) == 0) {
    return UnknownJob(request.job_id());
  }
  if (step_ == nullptr || step_->job_id != request.job_id() || step_->eval ||
      step_->version != request.step()) {
    return Refuse(absl::StatusCode::kFailedPrecondition,
                  absl::StrCat("step: ", request.step(), " of ", request.job_id(),
                               " is not the step in progress"));
  }
  absl::StatusOr<TaskRecord*> held = HeldTaskLocked(request.worker_id(), request.task_id());
  if (!held.ok()) return ToGrpcStatus(held.status());
  const int slots = static_cast<int>(step_->slots.size());
  if (request.slots_size() > (*held)->task.slots_size()) {
    return Refuse(absl::StatusCode::kInvalidArgument,
                  absl::StrCat("slots: ", request.slots_size(), " reported, the task has ",
                               (*held)->task.slots_size()));
  }
  for (const v1::SlotStats& s : request.slots()) {
    if (std::find((*held)->task.slots().begin(), (*held)->task.slots().end(), s.slot()) ==
        (*held)->task.slots().end()) {
      return Refuse(
          absl::StatusCode::kInvalidArgument,
          absl::StrCat("slots.slot: ", s.slot(), " is not a slot of task ", request.task_id()));
    }
    if (s.slot() < 0 || s.slot() >= slots) {
      return Refuse(absl::StatusCode::kInvalidArgument,
                    absl::StrCat("slots.slot: ", s.slot(), " out of [0, ", slots, ")"));
    }
    if (!std::isfinite(s.loss_sum()) || s.tokens() <= 0) {
      return Refuse(absl::StatusCode::kInvalidArgument,
                    absl::StrCat("slots.loss_sum: slot ", s.slot(), " reports loss_sum ",
                                 s.loss_sum(), " over ", s.tokens(), " tokens"));
    }
    // The loads go to every shard's router-bias update: their shape must be
    // the model's.
    const v1::JobSpec& spec = jobs_.at(request.job_id()).job.spec();
    ExpertLoads check(spec.model());
    if (absl::Status st = check.Add(s.expert_load()); !st.ok()) {
      return Refuse(absl::StatusCode::kInvalidArgument,
                    absl::StrCat("slots.", st.message(), " (slot ", s.slot(), ")"));
    }
    // The logits go to every shard's QK-Clip: the model's shape, finite,
    // and present when the job clips.
    AttentionLogits logits(spec.model());
    if (s.attention_logit_max_size() > 0 || spec.optimizer().qk_clip_tau() > 0.0) {
      if (absl::Status st = logits.Add(s.attention_logit_max()); !st.ok()) {
        return Refuse(absl::StatusCode::kInvalidArgument,
                      absl::StrCat("slots.", st.message(), " (slot ", s.slot(), ")"));
      }
    }
  }
  int accepted = 0;
  for (const v1::SlotStats& s : request.slots()) {
    if (!step_->slots[s.slot()].has_value()) {
      step_->slots[s.slot()] = s;
      ++accepted;
    }
  }
  for (TaskRecord& t : step_->tasks) {
    bool all = true;
    for (int s : t.task.slots()) all = all && step_->slots[s].has_value();
    if (all) t.done = true;
  }
  response->set_accepted(accepted);
  return grpc::Status::OK;
}

grpc::Status Coordinator::ReportEval(const grpc::ServerContext& context,
                                     const v1::ReportEvalRequest& request) {
  absl::MutexLock lock(&mu_);
  if (grpc::Status st = AuthenticateMemberLocked(context, request.worker_id(), false); !st.ok()) {
    return st;
  }
  if (jobs_.count(request.job_id()) == 0) {
    return UnknownJob(request.job_id());
  }
  if (step_ == nullptr || step_->job_id != request.job_id() || !step_->eval ||
      step_->version != request.version()) {
    return Refuse(absl::StatusCode::kFailedPrecondition,
                  absl::StrCat("version: evaluation of version ", request.version(), " of ",
                               request.job_id(), " is not in progress"));
  }
  absl::StatusOr<TaskRecord*> held = HeldTaskLocked(request.worker_id(), request.task_id());
  if (!held.ok()) return ToGrpcStatus(held.status());
  if (request.eval_part() != (*held)->task.eval_part()) {
    return Refuse(absl::StatusCode::kInvalidArgument,
                  absl::StrCat("eval_part: ", request.eval_part(), " is not the part of task ",
                               request.task_id()));
  }
  const int parts = static_cast<int>(step_->eval_parts_done.size());
  if (request.eval_part() < 0 || request.eval_part() >= parts) {
    return Refuse(absl::StatusCode::kInvalidArgument,
                  absl::StrCat("eval_part: ", request.eval_part(), " out of [0, ", parts, ")"));
  }
  if (step_->eval_total_batches >= 0 && request.total_batches() != step_->eval_total_batches) {
    return Refuse(absl::StatusCode::kInvalidArgument,
                  absl::StrCat("total_batches: ", request.total_batches(),
                               ", another worker reported ", step_->eval_total_batches));
  }
  if (step_->eval_parts_done[request.eval_part()]) return grpc::Status::OK;  // a repeat
  step_->eval_total_batches = request.total_batches();
  for (const v1::EvalBatch& b : request.batches()) step_->eval_batches[b.batch()] = b;
  step_->eval_parts_done[request.eval_part()] = true;
  for (TaskRecord& t : step_->tasks) {
    if (t.task.eval_part() == request.eval_part()) t.done = true;
  }
  return grpc::Status::OK;
}

grpc::Status Coordinator::FailTask(const grpc::ServerContext& context,
                                   const v1::FailTaskRequest& request) {
  absl::MutexLock lock(&mu_);
  if (grpc::Status st = AuthenticateMemberLocked(context, request.worker_id(), false); !st.ok()) {
    return st;
  }
  absl::StatusOr<TaskRecord*> held = HeldTaskLocked(request.worker_id(), request.task_id());
  if (!held.ok()) return ToGrpcStatus(held.status());
  if (step_->job_id == request.job_id() && step_->failure.empty()) {
    step_->failure =
        absl::StrCat("worker ", request.worker_id(), ": ", request.error().substr(0, 2048));
  }
  return grpc::Status::OK;
}

// ---------------------------------------------------------------------------
// Membership

std::vector<const Coordinator::Member*> Coordinator::LiveLocked(bool shards) const {
  std::vector<const Member*> out;
  for (const auto& [id, m] : members_) {
    if (m.shard == shards && !m.draining) out.push_back(&m);
  }
  std::sort(out.begin(), out.end(),
            [](const Member* a, const Member* b) { return a->order < b->order; });
  return out;
}

std::vector<const Coordinator::Member*> Coordinator::PlaceableShardsLocked() const {
  std::vector<const Member*> out = LiveLocked(true);
  out.erase(std::remove_if(out.begin(), out.end(), [](const Member* m) { return !m->confirmed; }),
            out.end());
  return out;
}

void Coordinator::ExpireMembersLocked() {
  const absl::Time now = absl::Now();
  for (auto it = members_.begin(); it != members_.end();) {
    if (now - it->second.last_seen > absl::Seconds(options_.lease_seconds)) {
      Log(absl::StrCat(it->first, " (", it->second.address, ") lease expired"));
      if (step_ != nullptr) {
        for (TaskRecord& t : step_->tasks) {
          if (t.worker == it->first && !t.done) {
            t.worker.clear();
            t.delivered = false;
            metrics_.reassignments.Increment();
          }
        }
      }
      it = members_.erase(it);
      UpdateJobGaugesLocked();
    } else {
      ++it;
    }
  }
}

void Coordinator::ReaperLoop() {
  absl::MutexLock lock(&mu_);
  while (!shutdown_) {
    mu_.AwaitWithTimeout(absl::Condition(&shutdown_), absl::Milliseconds(100));
    ExpireMembersLocked();
    ExpireTasksLocked();
  }
}

}  // namespace muonps
