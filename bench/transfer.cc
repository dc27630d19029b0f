// Gradient push and parameter pull of a ~64 MiB parameter set between a worker
// and an optimizer shard in separate processes, next to raw loopback TCP
// between two processes, measured in the same run.
//
//   ./build/bench/transfer [--reps=5] [--dtype=f32|bf16]
//
// A forked child hosts ShardServiceImpl in a GrpcServer on 127.0.0.1 (no
// coordinator: this process calls LoadJob itself, then plays the coordinator's
// GetGradientSquares + ApplyStep between rounds). The model is sized so its
// tensors total ~64 MiB (V 4352, C 512, 2 layers, 8 experts of width 512: 47
// tensors from 32 bytes to 8.5 MiB, most of them 1 MiB); batch.slots is 1, so
// one push completes a step, and the optimizer is AdamW at a tiny lr, so the
// untimed ApplyStep is cheap.
// Each round, after one unmeasured warm-up round:
//   tcp   a second forked child reads 64 MiB from a loopback TCP socket into
//         a 64 MiB buffer while this process writes it in 1 MiB writes; timed
//         until the child's 1-byte acknowledgement arrives.
//   push  PushGradients of every trainable tensor for step t, exactly as
//         Worker::Push sends it (workers/worker/worker.cc: the same messages,
//         chunk size and header handling), timed until Finish returns, which
//         includes the shard taking the gradient (ShardState::AddGradients).
//   --    GetGradientSquares + ApplyStep(t), untimed.
//   pull  PullParameters of every tensor at version t+1, assembled into one
//         flat buffer exactly as Worker::Pull does (TensorAssembler, finite
//         check), timed until the stream has finished and been checked.
// The rounds alternate tcp, push, pull so that machine noise hits all alike.
// Every figure is the median over --reps rounds; GB/s is 1e9 bytes per second.
// ratio = (push+pull GB/s) / (raw TCP GB/s), the goal is >= 0.8, and push
// and pull each >= 0.7 of raw TCP: the RPC path should move bytes nearly at
// the rate the kernel moves them.
// --dtype=bf16 runs the job with transfer.dtype bf16: half the bytes on the
// wire; the push's time includes rounding the gradient to bf16 (the worker
// does it once per step), the pull's widening it back; GB/s counts wire
// bytes, and the shard's own count of the bytes it received is printed.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <signal.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <string>
#include <thread>
#include <tuple>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "bench/bench_util.h"
#include "common/blas_runtime.h"
#include "common/job_spec.h"
#include "common/model_layout.h"
#include "common/philox.h"
#include "muonps/v1/shard.grpc.pb.h"
#include "rpc/grpc_server.h"
#include "rpc/rpc_util.h"
#include "rpc/shard_client.h"
#include "rpc/tensor_stream.h"
#include "services/shard/shard_service.h"
#include "workers/worker/worker.h"

ABSL_FLAG(int, reps, 5, "Measured rounds (tcp, push, pull each); medians are reported");
ABSL_FLAG(std::string, dtype, "f32", "The job's transfer.dtype: f32 or bf16");

namespace muonps {
namespace {

constexpr double kGoalRatio = 0.8;
constexpr double kGoalEachRatio = 0.7;
constexpr char kJobId[] = "bench-transfer";

using Clock = std::chrono::steady_clock;

double Seconds(Clock::time_point a, Clock::time_point b) {
  return std::chrono::duration<double>(b - a).count();
}

[[noreturn]] void Die(const std::string& what) { muonps::Die("transfer", what); }

// The bench job: ~64 MiB of tensors, one slot per step, AdamW.
v1::JobSpec TransferJob() {
  v1::JobSpec job;
  v1::ModelConfig* m = job.mutable_model();
  m->set_vocab_size(4352);
  m->set_hidden_size(512);
  m->set_num_hidden_layers(2);
  m->set_num_attention_heads(4);
  m->set_first_k_dense_replace(1);
  m->set_intermediate_size(2048);
  m->set_n_routed_experts(8);
  m->set_num_experts_per_tok(2);
  m->set_n_shared_experts(1);
  m->set_moe_intermediate_size(512);
  job.mutable_optimizer()->set_name("adamw");
  job.mutable_batch()->set_slots(1);
  job.mutable_batch()->set_micro_batch(1);
  job.mutable_transfer()->set_dtype(absl::GetFlag(FLAGS_dtype));
  FillJobDefaults(&job);
  if (absl::Status st = ValidateJobSpec(job); !st.ok()) Die(std::string(st.message()));
  return job;
}

// ---------------------------------------------------------------------------
// Raw loopback TCP between two processes.

bool WriteAll(int fd, const char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = write(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

// False at end of stream or on an error.
bool ReadAll(int fd, char* data, size_t size) {
  while (size > 0) {
    const ssize_t n = read(fd, data, size);
    if (n < 0 && errno == EINTR) continue;
    if (n <= 0) return false;
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

// A forked child that receives `bytes` at a time into one buffer and
// acknowledges each transfer with one byte, until the connection closes.
class TcpSink {
 public:
  TcpSink(int64_t bytes, int64_t write_bytes) : bytes_(bytes), write_bytes_(write_bytes) {
    const int listener = socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr = {};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    socklen_t len = sizeof(addr);
    if (listener < 0 || bind(listener, reinterpret_cast<sockaddr*>(&addr), len) != 0 ||
        listen(listener, 1) != 0 ||
        getsockname(listener, reinterpret_cast<sockaddr*>(&addr), &len) != 0) {
      Die(absl::StrCat("loopback listen: ", std::strerror(errno)));
    }
    const pid_t parent = getpid();
    pid_ = fork();
    if (pid_ < 0) Die("fork failed");
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(1);
      close(listener);
      const int fd = socket(AF_INET, SOCK_STREAM, 0);
      if (fd < 0 || connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) _exit(1);
      std::vector<char> buffer(static_cast<size_t>(bytes_), 1);  // touched: no page faults later
      const char ack = 'k';
      while (ReadAll(fd, buffer.data(), buffer.size())) {
        if (!WriteAll(fd, &ack, 1)) break;
      }
      _exit(0);
    }
    fd_ = accept(listener, nullptr, nullptr);
    close(listener);
    if (fd_ < 0) Die(absl::StrCat("loopback accept: ", std::strerror(errno)));
    const int one = 1;  // as gRPC sets it on its sockets
    setsockopt(fd_, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  }

  ~TcpSink() {
    close(fd_);
    int status = 0;
    waitpid(pid_, &status, 0);
  }

  // Sends `data` (bytes_ long) in write_bytes_ writes; seconds until acknowledged.
  double Send(const char* data) {
    const auto t0 = Clock::now();
    for (int64_t offset = 0; offset < bytes_; offset += write_bytes_) {
      const size_t n = static_cast<size_t>(std::min(write_bytes_, bytes_ - offset));
      if (!WriteAll(fd_, data + offset, n)) Die("loopback write failed");
    }
    char ack = 0;
    if (!ReadAll(fd_, &ack, 1)) Die("loopback sink did not acknowledge");
    return Seconds(t0, Clock::now());
  }

 private:
  const int64_t bytes_, write_bytes_;
  pid_t pid_ = -1;
  int fd_ = -1;
};

// ---------------------------------------------------------------------------
// The shard, in a forked child.

class ShardProcess {
 public:
  ShardProcess() {
    int ready[2], stop[2];
    if (pipe(ready) != 0 || pipe(stop) != 0) Die("pipe failed");
    const pid_t parent = getpid();
    pid_ = fork();
    if (pid_ < 0) Die("fork failed");
    if (pid_ == 0) {
      prctl(PR_SET_PDEATHSIG, SIGKILL);
      if (getppid() != parent) _exit(1);
      close(ready[0]);
      close(stop[1]);
      ShardServiceImpl service;
      absl::StatusOr<std::unique_ptr<GrpcServer>> server =
          GrpcServer::Start(GrpcServerOptions{}, {&service});
      int port = server.ok() ? (*server)->port() : -1;
      if (!WriteAll(ready[1], reinterpret_cast<const char*>(&port), sizeof(port)) || port < 0) {
        _exit(1);
      }
      (*server)->SetServing(true);
      char byte;
      while (read(stop[0], &byte, 1) > 0) {
      }  // until the parent closes the pipe
      service.Shutdown();
      (*server)->Shutdown(1.0);
      _exit(0);
    }
    close(ready[1]);
    close(stop[0]);
    stop_fd_ = stop[1];
    int port = -1;
    if (!ReadAll(ready[0], reinterpret_cast<char*>(&port), sizeof(port)) || port < 0) {
      Die("the shard process did not start its server");
    }
    close(ready[0]);
    address_ = absl::StrCat("127.0.0.1:", port);
  }

  ~ShardProcess() {
    close(stop_fd_);
    int status = 0;
    waitpid(pid_, &status, 0);
  }

  const std::string& address() const { return address_; }

 private:
  pid_t pid_ = -1;
  int stop_fd_ = -1;
  std::string address_;
};

// ---------------------------------------------------------------------------
// The worker side: Worker::Push's and Worker::Pull's per-shard bodies
// (workers/worker/worker.cc), for one shard that owns every tensor.

struct Route {
  std::string job_id;
  std::vector<std::string> tensors;  // owned, layout order
};

// The worker's own client code (rpc/shard_client.h).
// *received gets the payload bytes the shard counted.
absl::Status Push(grpc::ChannelInterface* channel, const ModelLayout& layout, const Route& route,
                  int64_t step, int64_t chunk_bytes, const float* grads, TransferDtype dtype,
                  int64_t* received) {
  PushTarget target;
  target.job_id = route.job_id;
  target.step = step;
  v1::PushGradientsResponse response;
  absl::Status st = PushGradients(channel, layout, route.tensors, target, grads, dtype, chunk_bytes,
                                  "PushGradients", &response);
  if (st.ok() && !response.counted()) return absl::InternalError("push acknowledged as a repeat");
  *received = response.bytes();
  return st;
}

absl::Status Pull(grpc::ChannelInterface* channel, const ModelLayout& layout, const Route& route,
                  int64_t version, int64_t chunk_bytes, float* params, TransferDtype dtype) {
  return PullParameters(channel, layout, route.job_id, /*job_key=*/"", version,
                        static_cast<int>(route.tensors.size()), 600.0, chunk_bytes, params,
                        "PullParameters", dtype);
}

// The coordinator's part of a step, untimed: norms, then the update.
absl::Status AdvanceStep(v1::ShardService::Stub* stub, int64_t step) {
  {
    grpc::ClientContext context;
    context.set_deadline(DeadlineIn(60.0));
    v1::GetGradientSquaresRequest request;
    request.set_job_id(kJobId);
    request.set_step(step);
    v1::GetGradientSquaresResponse response;
    absl::Status st = FromGrpcStatus(stub->GetGradientSquares(&context, request, &response),
                                     "GetGradientSquares");
    if (!st.ok()) return st;
  }
  grpc::ClientContext context;
  context.set_deadline(DeadlineIn(60.0));
  v1::ApplyStepRequest request;
  request.set_job_id(kJobId);
  request.set_step(step);
  request.set_lr(1e-6);
  request.set_clip_coef(1.0);
  v1::ApplyStepResponse response;
  return FromGrpcStatus(stub->ApplyStep(&context, request, &response), "ApplyStep");
}

// Worker::Push and Worker::Pull run each shard's stream on its own thread.
template <typename Fn>
double TimedOnThread(Fn&& fn) {
  absl::Status st;
  const auto t0 = Clock::now();
  std::thread thread([&] { st = fn(); });
  thread.join();
  const double s = Seconds(t0, Clock::now());
  if (!st.ok()) Die(std::string(st.message()));
  return s;
}

struct Figures {
  std::vector<double> tcp, push, pull;  // seconds
};

void PrintLine(const char* what, const std::vector<double>& seconds, int64_t bytes, double limit) {
  const double s = Median(seconds);
  const double gbs = static_cast<double>(bytes) / s * 1e-9;
  const auto [lo, hi] = std::minmax_element(seconds.begin(), seconds.end());
  std::printf("%-34s %8.1f ms  [%.1f .. %.1f]  %6.2f GB/s", what, s * 1e3, *lo * 1e3, *hi * 1e3,
              gbs);
  if (limit > 0) std::printf("  (%.2f of raw TCP)", gbs / limit);
  std::printf("\n");
}

int Run(int reps) {
  const int64_t chunk_bytes = WorkerOptions().chunk_bytes;

  const v1::JobSpec job = TransferJob();
  const TransferDtype dtype = TransferDtypeOf(job);
  const ModelLayout layout(job.model());
  Route route{kJobId, {}};
  int64_t push_bytes = 0, pull_bytes = 0, push_chunks = 0;
  int trainable = 0;
  for (const TensorInfo& t : layout.tensors()) {
    route.tensors.push_back(t.name);
    const int64_t bytes = t.numel * ElementBytes(dtype);
    pull_bytes += bytes;
    if (!t.trainable()) continue;
    ++trainable;
    push_bytes += bytes;
    push_chunks += std::max<int64_t>(1, (bytes + chunk_bytes - 1) / chunk_bytes);
  }
  const int64_t tcp_bytes = push_bytes;

  std::vector<float> grads(static_cast<size_t>(layout.total_floats()), 0.0f);
  for (const TensorInfo& t : layout.tensors()) {
    if (t.trainable()) FillNormal(grads.data() + t.offset, t.numel, 7, t.name, 1e-3);
  }
  std::vector<float> params(static_cast<size_t>(layout.total_floats()), 0.0f);
  int64_t received = 0;
  // Both children are forked before this process starts any thread (gRPC, OpenMP).
  TcpSink tcp(tcp_bytes, chunk_bytes);
  ShardProcess shard;

  const v1::ModelConfig& m = job.model();
  std::printf(
      "transfer: one worker and one optimizer shard in separate processes over loopback gRPC, "
      "next to raw loopback TCP between two processes\n"
      "  model V=%d C=%d L=%d E=%d F=%d I=%d: %zu tensors (%d trainable), transfer.dtype %s: "
      "push %lld bytes (%.2f MiB), pull %lld bytes (%.2f MiB)\n"
      "  chunk %lld bytes (the worker's default): %lld chunks per push; raw TCP: %lld bytes in "
      "%lld-byte writes\n"
      "  median of %d rounds (tcp, push, pull alternating) after 1 warm-up round; shard %s; "
      "BLAS %s (not used here)\n",
      m.vocab_size(), m.hidden_size(), m.num_hidden_layers(), m.n_routed_experts(),
      m.moe_intermediate_size(), m.intermediate_size(), layout.tensors().size(), trainable,
      job.transfer().dtype().c_str(), static_cast<long long>(push_bytes), push_bytes / 1048576.0,
      static_cast<long long>(pull_bytes), pull_bytes / 1048576.0,
      static_cast<long long>(chunk_bytes), static_cast<long long>(push_chunks),
      static_cast<long long>(tcp_bytes), static_cast<long long>(chunk_bytes), reps,
      shard.address().c_str(), BlasCoreName().c_str());
  std::fflush(stdout);

  const std::shared_ptr<grpc::Channel> channel = MakeChannel(shard.address());
  std::unique_ptr<v1::ShardService::Stub> stub = v1::ShardService::NewStub(channel);
  {
    grpc::ClientContext context;
    context.set_deadline(DeadlineIn(120.0));
    v1::LoadJobRequest request;
    request.set_job_id(kJobId);
    *request.mutable_spec() = job;
    for (const std::string& name : route.tensors) request.add_tensors(name);
    v1::LoadJobResponse response;
    absl::Status st = FromGrpcStatus(stub->LoadJob(&context, request, &response), "LoadJob");
    if (!st.ok()) Die(std::string(st.message()));
  }

  Figures figures;
  int64_t step = 0;
  for (int round = 0; round <= reps; ++round) {
    const double tcp_s = tcp.Send(reinterpret_cast<const char*>(grads.data()));
    const double push_s = TimedOnThread([&] {
      return Push(channel.get(), layout, route, step, chunk_bytes, grads.data(), dtype, &received);
    });
    if (received != push_bytes) {
      Die(absl::StrCat("the shard counted ", received, " pushed bytes, expected ", push_bytes));
    }
    if (absl::Status st = AdvanceStep(stub.get(), step); !st.ok()) Die(std::string(st.message()));
    ++step;
    const double pull_s = TimedOnThread([&] {
      return Pull(channel.get(), layout, route, step, chunk_bytes, params.data(), dtype);
    });
    if (round == 0) continue;  // warm-up: connections, first-touch of the shard's buffers
    figures.tcp.push_back(tcp_s);
    figures.push.push_back(push_s);
    figures.pull.push_back(pull_s);
  }

  std::vector<double> both;
  both.reserve(static_cast<size_t>(reps));
  for (int i = 0; i < reps; ++i) both.push_back(figures.push[i] + figures.pull[i]);
  const double tcp_gbs = static_cast<double>(tcp_bytes) / Median(figures.tcp) * 1e-9;
  PrintLine("raw TCP (64 MiB, 1 MiB writes)", figures.tcp, tcp_bytes, 0.0);
  PrintLine("push (PushGradients, step t)", figures.push, push_bytes, tcp_gbs);
  PrintLine("pull (PullParameters, version t+1)", figures.pull, pull_bytes, tcp_gbs);
  PrintLine("push+pull", both, push_bytes + pull_bytes, tcp_gbs);
  std::printf("bytes per push counted by the shard: %lld (%s)\n", static_cast<long long>(received),
              job.transfer().dtype().c_str());
  const double ratio = static_cast<double>(push_bytes + pull_bytes) / Median(both) * 1e-9 / tcp_gbs;
  std::printf("ratio (push+pull GB/s) / (raw TCP GB/s) = %.2f (goal >= %.1f: %s)\n", ratio,
              kGoalRatio, ratio >= kGoalRatio ? "met" : "NOT MET");
  for (const auto& [name, times, bytes] :
       {std::tuple<const char*, const std::vector<double>*, int64_t>{"push", &figures.push,
                                                                     push_bytes},
        {"pull", &figures.pull, pull_bytes}}) {
    const double each = static_cast<double>(bytes) / Median(*times) * 1e-9 / tcp_gbs;
    std::printf("ratio %s / raw TCP = %.2f (goal >= %.1f: %s)\n", name, each, kGoalEachRatio,
                each >= kGoalEachRatio ? "met" : "NOT MET");
  }
  return 0;
}

}  // namespace
}  // namespace muonps

int main(int argc, char** argv) {
  muonps::PrepareComputeRuntime(argc, argv);
  absl::ParseCommandLine(argc, argv);
  return muonps::Run(std::max(1, absl::GetFlag(FLAGS_reps)));
}
