#include "cli/client.h"

#include <signal.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <iostream>
#include <optional>
#include <thread>
#include <vector>

#include "absl/flags/declare.h"
#include "absl/flags/flag.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "cli/progress.h"
#include "cli/security_flags.h"
#include "cli/tls_flags.h"
#include "google/protobuf/util/json_util.h"
#include "rpc/auth.h"
#include "rpc/rpc_util.h"
#include "services/coordinator/placement.h"

ABSL_DECLARE_FLAG(std::string, coordinator);

namespace muonps {
namespace {

std::atomic<int> g_signals{0};

void OnSignal(int) { g_signals.fetch_add(1); }

bool Ended(v1::JobState state) {
  return state == v1::JOB_STATE_SUCCEEDED || state == v1::JOB_STATE_FAILED ||
         state == v1::JOB_STATE_CANCELLED;
}

}  // namespace

void InstallSignalHandlers() {
  struct sigaction action = {};
  action.sa_handler = OnSignal;
  sigemptyset(&action.sa_mask);
  sigaction(SIGINT, &action, nullptr);
  sigaction(SIGTERM, &action, nullptr);
}

int SignalCount() { return g_signals.load(); }

std::string CoordinatorAddress() {
  const std::string flag = absl::GetFlag(FLAGS_coordinator);
  return flag.empty() ? "127.0.0.1:7070" : flag;
}

std::string OneLineJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.preserve_proto_field_names = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(message, &out, options);
  return out;
}

const char* StateName(v1::JobState state) {
  switch (state) {
    case v1::JOB_STATE_QUEUED:
      return "QUEUED";
    case v1::JOB_STATE_RUNNING:
      return "RUNNING";
    case v1::JOB_STATE_SUCCEEDED:
      return "SUCCEEDED";
    case v1::JOB_STATE_FAILED:
      return "FAILED";
    case v1::JOB_STATE_CANCELLED:
      return "CANCELLED";
    default:
      return "UNSPECIFIED";
  }
}

int ExitStatusOf(v1::JobState state) {
  if (state == v1::JOB_STATE_SUCCEEDED) return 0;
  if (state == v1::JOB_STATE_CANCELLED) return 4;
  return 1;
}

std::unique_ptr<v1::JobService::Stub> JobStub() {
  return v1::JobService::NewStub(MakeChannel(CoordinatorAddress()));
}

absl::Status Call(const std::function<grpc::Status(grpc::ClientContext*)>& rpc, const char* name) {
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(30.0));
  absl::StatusOr<std::string> token = ClientTokenFromFlags();
  if (!token.ok()) return token.status();
  AttachToken(&context, *token);
  return WithTlsHint(FromGrpcStatus(
      rpc(&context), absl::StrCat("coordinator ", CoordinatorAddress(), ": ", name)));
}

absl::StatusOr<std::string> Submit(const v1::JobSpec& spec, const std::string& resume) {
  auto stub = JobStub();
  v1::SubmitJobRequest request;
  *request.mutable_spec() = spec;
  request.set_resume_from(resume);
  v1::SubmitJobResponse response;
  absl::Status st = Call(
      [&](grpc::ClientContext* c) { return stub->SubmitJob(c, request, &response); }, "SubmitJob");
  if (!st.ok()) return st;
  return response.job_id();
}

static StepReport ToStepReport(const v1::Job& job) {
  const v1::JobProgress& p = job.progress();
  StepReport r;
  r.step = p.step();
  r.total_steps = p.total_steps();
  r.loss = p.loss();
  if (p.has_val_loss() && p.val_step() == p.step()) r.val_loss = p.val_loss();
  r.grad_norm = p.grad_norm();
  r.lr = p.lr();
  r.step_seconds = p.step_seconds();
  const v1::JobSpec& s = job.spec();
  r.tokens = static_cast<int64_t>(s.batch().slots()) * s.batch().micro_batch() *
             s.model().max_position_embeddings();
  r.max_load_ratio = p.max_load_ratio();
  r.max_attention_logit = p.max_attention_logit();
  r.qk_clipped_heads = p.qk_clipped_heads();
  return r;
}

namespace {

// Prints one watch event (one JSON line with `json`).
void ShowEvent(const v1::WatchJobResponse& event, bool json, ProgressDisplay& display,
               bool& begun) {
  const v1::Job& job = event.job();
  if (json) {
    std::cout << OneLineJson(event) << std::endl;
    return;
  }
  if (event.missed() > 0) {
    display.Abort();
    std::fprintf(stderr, "(%lld event(s) not shown: the coordinator no longer holds them)\n",
                 static_cast<long long>(event.missed()));
  }
  switch (event.kind()) {
    case v1::JOB_EVENT_KIND_SNAPSHOT:
    case v1::JOB_EVENT_KIND_STATE:
      display.Abort();
      std::fprintf(stderr, "%s (%s): %s%s%s\n", job.job_id().c_str(), job.name().c_str(),
                   StateName(job.state()), job.error().empty() ? "" : ": ", job.error().c_str());
      break;
    case v1::JOB_EVENT_KIND_PLACEMENT: {
      display.Abort();
      std::vector<v1::ShardPlacement> shards(job.placement().begin(), job.placement().end());
      std::fprintf(stderr, "placement from step %lld:\n%s",
                   static_cast<long long>(job.start_step()), FormatPlacement(shards).c_str());
      begun = false;
      break;
    }
    case v1::JOB_EVENT_KIND_STEP:
      if (!begun) {
        display.Begin(job.start_step(), job.progress().total_steps());
        begun = true;
      }
      display.Step(ToStepReport(job));
      break;
    case v1::JOB_EVENT_KIND_CHECKPOINT:
      display.Abort();
      std::fprintf(stderr, "checkpoint: %s\n", job.last_checkpoint().c_str());
      break;
    case v1::JOB_EVENT_KIND_RECOVERY:
      display.Abort();
      std::fprintf(stderr, "recovered (%d so far): %s\n", job.recoveries(),
                   job.last_recovery().c_str());
      break;
    default:
      break;
  }
}

}  // namespace

absl::StatusOr<v1::Job> Watch(const std::string& job_id, bool json,
                              const std::function<void()>& poll, std::optional<int64_t> after_seq) {
  auto stub = JobStub();
  absl::StatusOr<std::string> token = ClientTokenFromFlags();
  if (!token.ok()) return token.status();
  std::atomic<bool> done{false};
  std::thread poller;
  if (poll) {
    poller = std::thread([&] {
      while (!done.load()) {
        poll();
        std::this_thread::sleep_for(std::chrono::milliseconds(100));
      }
    });
  }
  ProgressDisplay display(json ? nullptr : stderr, "");
  v1::WatchJobResponse event;
  v1::Job last;
  bool begun = false;
  // Once the watch has begun, a lost coordinator (restarted, rescheduled) is
  // waited for (10 minutes at most) and the watch resumes after the last
  // event received.
  std::optional<absl::Time> lost_since;
  grpc::Status finished;
  while (true) {
    grpc::ClientContext context;
    AttachToken(&context, *token);
    v1::WatchJobRequest request;
    request.set_job_id(job_id);
    if (after_seq.has_value()) request.set_after_seq(*after_seq);
    std::unique_ptr<grpc::ClientReader<v1::WatchJobResponse>> reader =
        stub->WatchJob(&context, request);
    while (reader->Read(&event)) {
      lost_since.reset();
      after_seq = event.seq();
      last = event.job();
      ShowEvent(event, json, display, begun);
    }
    finished = reader->Finish();
    if (finished.ok() || finished.error_code() != grpc::StatusCode::UNAVAILABLE ||
        !after_seq.has_value() || Ended(last.state())) {
      break;
    }
    const absl::Time now = absl::Now();
    if (!lost_since.has_value()) {
      lost_since = now;
      display.Abort();
      std::fprintf(stderr, "coordinator %s unavailable (%s); reconnecting\n",
                   CoordinatorAddress().c_str(), finished.error_message().c_str());
    }
    if (now - *lost_since > absl::Minutes(10)) break;
    std::this_thread::sleep_for(std::chrono::seconds(1));
  }
  done.store(true);
  if (poller.joinable()) poller.join();
  display.Abort();
  absl::Status st = WithTlsHint(
      FromGrpcStatus(finished, absl::StrCat("coordinator ", CoordinatorAddress(), ": WatchJob")));
  if (!st.ok()) return st;
  if (!json && Ended(last.state())) {
    const v1::JobProgress& p = last.progress();
    std::fprintf(stderr, "%s %s at step %lld/%lld: loss %.4f", last.job_id().c_str(),
                 StateName(last.state()), static_cast<long long>(p.step()),
                 static_cast<long long>(p.total_steps()), p.loss());
    if (p.has_val_loss())
      std::fprintf(stderr, ", val loss %.4f (step %lld)", p.val_loss(),
                   static_cast<long long>(p.val_step()));
    std::fprintf(stderr, ", %.0f tokens/s in %.1f s\n", p.tokens_per_second(),
                 last.started_at() > 0 ? last.ended_at() - last.started_at() : 0.0);
    if (!last.last_checkpoint().empty())
      std::fprintf(stderr, "checkpoint: %s\n", last.last_checkpoint().c_str());
    if (last.recoveries() > 0)
      std::fprintf(stderr, "recoveries: %d, steps computed again: %lld\n", last.recoveries(),
                   static_cast<long long>(last.steps_lost()));
  }
  return last;
}

}  // namespace muonps
