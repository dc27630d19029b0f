// The shard service: jobs (load, drop), gradient squares, steps and
// checkpoints. The pull path is in shard_pull.cc, the push path in
// shard_push.cc.
#include "services/shard/shard_service.h"

#include <grpcpp/support/proto_buffer_reader.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <filesystem>
#include <future>
#include <limits>
#include <map>
#include <optional>
#include <set>

#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/time/time.h"
#include "checkpoint/checkpoint.h"
#include "common/confine.h"
#include "common/job_spec.h"
#include "common/status_macros.h"
#include "google/protobuf/util/message_differencer.h"
#include "rpc/auth.h"
#include "rpc/metrics.h"
#include "rpc/rpc_util.h"
#include "rpc/tensor_stream.h"
#include "rpc/wire.h"

namespace muonps {

ShardServiceImpl::Metrics::Metrics(prometheus::Registry& r)
    : tensors(NewGauge(r, "muonps_shard_tensors", "Tensors this shard holds")),
      parameter_bytes(NewGauge(r, "muonps_shard_parameter_bytes", "Bytes of parameters held")),
      state_bytes(NewGauge(r, "muonps_shard_optimizer_state_bytes",
                           "Bytes of optimizer state held (Muon momentum, AdamW moments)")),
      version(
          NewGauge(r, "muonps_shard_parameter_version", "Optimizer steps applied to the held job")),
      muon_rms(prometheus::BuildGauge()
                   .Name("muonps_shard_update_rms")
                   .Help("RMS of the latest step's parameter change, by optimizer")
                   .Register(r)
                   .Add({{"optimizer", "muon"}})),
      adamw_rms(prometheus::BuildGauge()
                    .Name("muonps_shard_update_rms")
                    .Help("RMS of the latest step's parameter change, by optimizer")
                    .Register(r)
                    .Add({{"optimizer", "adamw"}})),
      pushed_bytes(
          NewCounter(r, "muonps_shard_pushed_bytes_total", "Gradient bytes received by pushes")),
      pulled_bytes(
          NewCounter(r, "muonps_shard_pulled_bytes_total", "Parameter bytes sent by pulls")),
      steps(NewCounter(r, "muonps_shard_steps_total", "Optimizer steps applied")),
      push_seconds(NewHistogram(r, "muonps_shard_push_duration_seconds",
                                "Duration of a gradient push stream, first message to answer")),
      pull_seconds(NewHistogram(r, "muonps_shard_pull_duration_seconds",
                                "Duration of a parameter pull stream once its version is there")),
      apply_seconds(NewHistogram(r, "muonps_shard_apply_duration_seconds",
                                 "Wall time of applying one optimizer step on this shard")),
      muon_seconds(prometheus::BuildHistogram()
                       .Name("muonps_shard_tensor_update_duration_seconds")
                       .Help("Time of one tensor's update (Newton-Schulz for Muon), by optimizer")
                       .Register(r)
                       .Add({{"optimizer", "muon"}}, FineLatencyBuckets())),
      adamw_seconds(prometheus::BuildHistogram()
                        .Name("muonps_shard_tensor_update_duration_seconds")
                        .Help("Time of one tensor's update (Newton-Schulz for Muon), by optimizer")
                        .Register(r)
                        .Add({{"optimizer", "adamw"}}, FineLatencyBuckets())) {}

ShardServiceImpl::ShardServiceImpl(std::shared_ptr<prometheus::Registry> metrics)
    : registry_(metrics != nullptr ? std::move(metrics) : std::make_shared<prometheus::Registry>()),
      metrics_(*registry_) {
  pull_timer_ = std::thread([this] { PullTimerLoop(); });
}

void ShardServiceImpl::Shutdown() {
  {
    absl::MutexLock lock(&mu_);
    shutdown_ = true;
  }
  WakePulls();
}

std::string ShardServiceImpl::job_id() const {
  absl::MutexLock lock(&mu_);
  return job_id_;
}

int64_t ShardServiceImpl::version() const {
  absl::MutexLock lock(&mu_);
  return version_;
}

absl::StatusOr<std::shared_ptr<ShardState>> ShardServiceImpl::Find(
    const std::string& job_id) const {
  absl::MutexLock lock(&mu_);
  if (state_ == nullptr || job_id != job_id_) {
    return absl::NotFoundError(
        absl::StrCat("job_id: this shard does not hold job \"", job_id, "\"",
                     job_id_.empty() ? "" : absl::StrCat(" (it holds ", job_id_, ")")));
  }
  return state_;
}

void ShardServiceImpl::RequireMemberSecret() {
  absl::MutexLock lock(&mu_);
  require_secret_ = true;
}

void ShardServiceImpl::SetMemberSecret(const std::string& secret) {
  absl::MutexLock lock(&mu_);
  member_secret_ = secret;
}

void ShardServiceImpl::ConfineCheckpoints(const std::vector<std::string>& roots) {
  absl::MutexLock lock(&mu_);
  checkpoint_roots_ = roots;
}

absl::Status ShardServiceImpl::Authorize(const grpc::ServerContextBase& context, bool worker_call,
                                         int64_t* run) const {
  absl::MutexLock lock(&mu_);
  if (run != nullptr) *run = run_;
  if (!require_secret_ && member_secret_.empty()) return absl::OkStatus();
  if (member_secret_.empty()) {
    return absl::UnavailableError("this shard has not registered with its coordinator yet");
  }
  if (CallerPresents(context, kMemberSecretHeader, member_secret_)) return absl::OkStatus();
  if (worker_call && CallerPresents(context, kJobKeyHeader, job_key_)) return absl::OkStatus();
  return absl::UnauthenticatedError(
      worker_call ? "pushes and pulls need the job's key (x-muonps-job-key)"
                  : "only this shard's coordinator may make this call (x-muonps-member-secret)");
}

bool ShardServiceImpl::Confined() const {
  absl::MutexLock lock(&mu_);
  return checkpoint_roots_.has_value();
}

absl::StatusOr<std::string> ShardServiceImpl::CheckpointPath(const std::string& path,
                                                             absl::string_view field) const {
  std::optional<std::vector<std::string>> roots;
  {
    absl::MutexLock lock(&mu_);
    roots = checkpoint_roots_;
  }
  if (!roots.has_value()) return path;
  return ConfinedPath(path, *roots, field);
}

grpc::Status ShardServiceImpl::LoadJob(grpc::ServerContext* context,
                                       const v1::LoadJobRequest* request,
                                       v1::LoadJobResponse* response) {
  if (absl::Status st = Authorize(*context, false); !st.ok()) return ToGrpcStatus(st);
  if (request->job_id().empty()) {
    return Refuse(absl::StatusCode::kInvalidArgument, "job_id: must not be empty");
  }
  const std::vector<std::string> tensors(request->tensors().begin(), request->tensors().end());
  const std::vector<std::string> replicas(request->replicas().begin(), request->replicas().end());
  v1::JobSpec spec = request->spec();
  FillJobDefaults(&spec);
  {
    absl::MutexLock lock(&mu_);
    if (state_ != nullptr) {
      if (!request->reload() && job_id_ == request->job_id() && tensors_ == tensors &&
          replicas_ == replicas &&
          google::protobuf::util::MessageDifferencer::Equals(state_->job(), spec)) {
        // A repeated load (a restarted coordinator taking the job over):
        // the state stays; the run's key is the new one, and the step in
        // flight starts over.
        job_key_ = request->job_key();
        state_->StartGeneration(++run_);
        response->set_version(version_);
        return grpc::Status::OK;
      }
      if (!request->replace()) {
        return Refuse(absl::StatusCode::kFailedPrecondition,
                      absl::StrCat("this shard holds job ", job_id_, "; drop it first"));
      }
    }
  }
  if (absl::Status st = ValidateJobSpec(spec); !st.ok()) return ToGrpcStatus(st);
  // Owned and replicated tensors are held alike; ShardState refuses a name
  // the model lacks and one given twice (in either list or both).
  std::vector<std::string> held = tensors;
  held.insert(held.end(), replicas.begin(), replicas.end());
  absl::StatusOr<std::unique_ptr<ShardState>> created = ShardState::Create(spec, tensors, replicas);
  if (!created.ok()) return ToGrpcStatus(created.status());
  std::shared_ptr<ShardState> state = std::move(*created);
  state->set_orthogonalizer(orthogonalizer_);
  if (!request->resume_from().empty()) {
    absl::StatusOr<std::string> confined = CheckpointPath(request->resume_from(), "resume_from");
    if (!confined.ok()) return ToGrpcStatus(confined.status());
    absl::StatusOr<std::string> dir = ResolveCheckpointDir(*confined);
    if (!dir.ok()) return ToGrpcStatus(dir.status());
    absl::StatusOr<v1::TrainerState> trainer = ReadTrainerState(*dir);
    if (!trainer.ok()) return ToGrpcStatus(trainer.status());
    absl::StatusOr<std::map<std::string, TensorState>> values =
        ReadCheckpointTensors(*dir, state->layout(), spec.model(), spec.optimizer().name(), held);
    if (!values.ok()) return ToGrpcStatus(values.status());
    for (auto& [name, v] : *values) {
      absl::Status st = state->Restore(name, std::move(v.value), std::move(v.momentum),
                                       std::move(v.exp_avg), std::move(v.exp_avg_sq));
      if (!st.ok()) return ToGrpcStatus(st);
    }
    state->set_version(trainer->step());
    *response->mutable_checkpoint_numerics() = trainer->numerics();
  }
  absl::Status installed = Install(request->job_id(), request->job_key(), tensors, replicas,
                                   std::move(state), request->replace());
  if (!installed.ok()) return ToGrpcStatus(installed);
  response->set_version(version());
  WakePulls();
  return grpc::Status::OK;
}

absl::Status ShardServiceImpl::Install(const std::string& job_id, const std::string& job_key,
                                       const std::vector<std::string>& tensors,
                                       const std::vector<std::string>& replicas,
                                       std::shared_ptr<ShardState> state, bool replace) {
  absl::MutexLock lock(&mu_);
  if (state_ != nullptr && !replace) {
    return absl::FailedPreconditionError(
        absl::StrCat("this shard holds job ", job_id_, "; drop it first"));
  }
  state->StartGeneration(++run_);
  state->set_on_publish([this] { RequestWake(); });
  job_id_ = job_id;
  job_key_ = job_key;
  tensors_ = tensors;
  replicas_ = replicas;
  served_.clear();
  const std::set<std::string> owned(tensors.begin(), tensors.end());
  for (const std::string& name : state->owned()) {
    if (owned.count(name) != 0) served_.push_back(name);
  }
  version_ = state->version();
  int64_t params = 0, optimizer_state = 0;
  state->Visit([&](const TensorInfo&, const std::vector<float>& value,
                   const std::vector<float>& momentum, const std::vector<float>& exp_avg,
                   const std::vector<float>& exp_avg_sq) {
    params += static_cast<int64_t>(value.size() * sizeof(float));
    optimizer_state += static_cast<int64_t>((momentum.size() + exp_avg.size() + exp_avg_sq.size()) *
                                            sizeof(float));
  });
  metrics_.tensors.Set(static_cast<double>(tensors.size() + replicas.size()));
  metrics_.parameter_bytes.Set(static_cast<double>(params));
  metrics_.state_bytes.Set(static_cast<double>(optimizer_state));
  metrics_.version.Set(static_cast<double>(version_));
  state_ = std::move(state);
  return absl::OkStatus();
}

grpc::Status ShardServiceImpl::DropJob(grpc::ServerContext* context,
                                       const v1::DropJobRequest* request, v1::DropJobResponse*) {
  if (absl::Status st = Authorize(*context, false); !st.ok()) return ToGrpcStatus(st);
  {
    absl::MutexLock lock(&mu_);
    if (job_id_ == request->job_id()) {
      job_id_.clear();
      job_key_.clear();
      tensors_.clear();
      replicas_.clear();
      served_.clear();
      state_.reset();
      version_ = 0;
      metrics_.tensors.Set(0);
      metrics_.parameter_bytes.Set(0);
      metrics_.state_bytes.Set(0);
      metrics_.version.Set(0);
    }
  }
  WakePulls();
  return grpc::Status::OK;
}

grpc::Status ShardServiceImpl::GetGradientSquares(grpc::ServerContext* context,
                                                  const v1::GetGradientSquaresRequest* request,
                                                  v1::GetGradientSquaresResponse* response) {
  if (absl::Status st = Authorize(*context, false); !st.ok()) return ToGrpcStatus(st);
  absl::StatusOr<std::shared_ptr<ShardState>> state = Find(request->job_id());
  if (!state.ok()) return ToGrpcStatus(state.status());
  if ((*state)->version() != request->step()) {
    return Refuse(
        absl::StatusCode::kFailedPrecondition,
        absl::StrCat("step: ", request->step(), ", the shard is at step ", (*state)->version()));
  }
  absl::StatusOr<std::vector<std::pair<std::string, double>>> squares = (*state)->GradientSquares();
  if (!squares.ok()) return ToGrpcStatus(squares.status());
  for (const auto& [name, sq] : *squares) {
    v1::TensorSquares* t = response->add_tensors();
    t->set_name(name);
    t->set_sum_of_squares(sq);
  }
  return grpc::Status::OK;
}

grpc::Status ShardServiceImpl::ApplyStep(grpc::ServerContext* context,
                                         const v1::ApplyStepRequest* request,
                                         v1::ApplyStepResponse* response) {
  if (absl::Status st = Authorize(*context, false); !st.ok()) return ToGrpcStatus(st);
  absl::StatusOr<std::shared_ptr<ShardState>> state = Find(request->job_id());
  if (!state.ok()) return ToGrpcStatus(state.status());
  if (!(request->lr() >= 0.0) || !std::isfinite(request->lr())) {
    return Refuse(absl::StatusCode::kInvalidArgument, "lr: must be finite and >= 0");
  }
  if (!(request->clip_coef() > 0.0) || !std::isfinite(request->clip_coef())) {
    return Refuse(absl::StatusCode::kInvalidArgument, "clip_coef: must be finite and > 0");
  }
  const int64_t now = (*state)->version();
  if (now > 0 && request->step() == now - 1) {
    response->set_version(now);  // a repeat of the step just applied
    return grpc::Status::OK;
  }
  std::vector<std::vector<int64_t>> loads;
  for (const v1::ExpertLoad& layer : request->expert_load()) {
    loads.emplace_back(layer.tokens().begin(), layer.tokens().end());
  }
  const auto t0 = std::chrono::steady_clock::now();
  ShardState::ApplyStats stats;
  absl::Status st = (*state)->ApplyStep(request->step(), request->lr(), request->clip_coef(), loads,
                                        &stats, &request->attention_logit_max());
  if (!st.ok()) return ToGrpcStatus(st);
  const double seconds =
      std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  response->set_seconds(seconds);
  metrics_.apply_seconds.Observe(seconds);
  metrics_.steps.Increment();
  for (const auto& [muon, s] : stats.tensor_seconds)
    (muon ? metrics_.muon_seconds : metrics_.adamw_seconds).Observe(s);
  if (stats.muon_numel > 0)
    metrics_.muon_rms.Set(std::sqrt(stats.muon_update_sq / stats.muon_numel));
  if (stats.adamw_numel > 0)
    metrics_.adamw_rms.Set(std::sqrt(stats.adamw_update_sq / stats.adamw_numel));
  {
    absl::MutexLock lock(&mu_);
    if (state_ == *state) version_ = state_->version();
    metrics_.version.Set(static_cast<double>(version_));
    response->set_version(version_);
  }
  WakePulls();
  return grpc::Status::OK;
}

grpc::Status ShardServiceImpl::SaveCheckpoint(grpc::ServerContext* context,
                                              const v1::SaveCheckpointRequest* request,
                                              v1::SaveCheckpointResponse* response) {
  if (absl::Status st = Authorize(*context, false); !st.ok()) return ToGrpcStatus(st);
  absl::StatusOr<std::shared_ptr<ShardState>> state = Find(request->job_id());
  if (!state.ok()) return ToGrpcStatus(state.status());
  if (request->shard_count() < 1 || request->shard_index() < 0 ||
      request->shard_index() >= request->shard_count()) {
    return Refuse(absl::StatusCode::kInvalidArgument,
                  absl::StrCat("shard_index: ", request->shard_index(), " not in [0, ",
                               request->shard_count(), ")"));
  }
  if (request->dir().empty()) return Refuse(absl::StatusCode::kInvalidArgument, "dir: empty");
  // Only into a staging directory the coordinator created for this job,
  // under the checkpoint root.
  absl::StatusOr<std::string> dir = CheckpointPath(request->dir(), "dir");
  if (!dir.ok()) return ToGrpcStatus(dir.status());
  if (Confined() && (!absl::EndsWith(*dir, ".tmp") ||
                     !std::filesystem::exists(std::filesystem::path(*dir) / kCheckpointMarker))) {
    return Refuse(absl::StatusCode::kFailedPrecondition,
                  absl::StrCat("dir: ", request->dir(),
                               " is not a checkpoint staging directory muonps created"));
  }
  const std::shared_ptr<ShardState> held = *state;
  const int index = request->shard_index(), count = request->shard_count();
  // The outcome of a background write of this directory and version.
  if (!request->background()) {
    std::optional<std::shared_future<absl::StatusOr<int64_t>>> pending;
    {
      absl::MutexLock lock(&write_mu_);
      if (write_.has_value() && write_->job_id == request->job_id() && write_->dir == *dir &&
          write_->version == request->version() && write_->index == index &&
          write_->count == count) {
        pending = write_->done;
      }
    }
    if (pending.has_value()) {
      const absl::StatusOr<int64_t>& written = pending->get();
      if (!written.ok()) return ToGrpcStatus(written.status());
      response->set_bytes(*written);
      return grpc::Status::OK;
    }
  }
  // The tensors to write: those named (each held, once), else the owned ones.
  std::set<std::string> wanted;
  if (request->tensors().empty()) {
    absl::MutexLock lock(&mu_);
    wanted.insert(tensors_.begin(), tensors_.end());
  } else {
    for (const std::string& name : request->tensors()) {
      if (!held->Owns(name)) {
        return Refuse(absl::StatusCode::kNotFound,
                      absl::StrCat("tensors: ", name, " is not held by this shard"));
      }
      if (!wanted.insert(name).second) {
        return Refuse(absl::StatusCode::kInvalidArgument,
                      absl::StrCat("tensors: ", name, " named twice"));
      }
    }
  }
  // Every tensor at one version, shared, not copied: the next steps update
  // copies of what the write still reads.
  ShardState::StateSnapshot snapshot = held->TakeSnapshot(wanted);
  if (snapshot.version != request->version()) {
    return Refuse(absl::StatusCode::kFailedPrecondition,
                  absl::StrCat("version: checkpoint asked at version ", request->version(),
                               ", the shard is at ", snapshot.version));
  }
  const int64_t bytes = snapshot.bytes();
  auto write = [held, index, count, path = *dir,
                held_snapshot = std::move(snapshot)]() mutable -> absl::StatusOr<int64_t> {
    // Released when the write ends: from then on steps update in place.
    const ShardState::StateSnapshot snapshot = std::move(held_snapshot);
    std::vector<std::pair<const TensorInfo*, TensorStateView>> tensors;
    tensors.reserve(snapshot.tensors.size());
    for (const ShardState::StateSnapshot::Entry& e : snapshot.tensors) {
      tensors.emplace_back(e.info, TensorStateView{e.value.get(), e.momentum.get(), e.exp_avg.get(),
                                                   e.exp_avg_sq.get()});
    }
    MUONPS_RETURN_IF_ERROR(WriteCheckpointShard(path, index, count, held->layout(),
                                                held->job().optimizer().name(), tensors));
    return snapshot.bytes();
  };
  if (!request->background()) {
    absl::StatusOr<int64_t> written = write();
    if (!written.ok()) return ToGrpcStatus(written.status());
    response->set_bytes(*written);
    return grpc::Status::OK;
  }
  // One write in the background at a time: a new one waits for the last.
  std::optional<CheckpointWrite> last;
  {
    absl::MutexLock lock(&write_mu_);
    last.swap(write_);
  }
  if (last.has_value()) last->done.wait();
  CheckpointWrite next{request->job_id(),
                       *dir,
                       request->version(),
                       index,
                       count,
                       std::async(std::launch::async, std::move(write)).share()};
  {
    absl::MutexLock lock(&write_mu_);
    write_ = std::move(next);
  }
  response->set_bytes(bytes);
  return grpc::Status::OK;
}

}  // namespace muonps
