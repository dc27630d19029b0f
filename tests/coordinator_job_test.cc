// Whole in-process clusters around the coordinator: a tiny job trained to the
// Trainer's bits, a job whose data cannot be read, and a running job cancelled.
#include <set>

#include "model/cpu_backend.h"
#include "tests/coordinator_fixture.h"

namespace muonps {
namespace {

// The lease is longer than in the tests above: two workers and the trainer
// share the machine's cores, and a missed lease here would fail the job.
constexpr double kClusterHeartbeat = 0.1;
constexpr double kClusterLease = 3.0;

TEST_F(CoordinatorTest, TrainsATinyJobToTheTrainersBits) {
  StartCoordinator(kClusterHeartbeat, kClusterLease, /*min_shards=*/2);
  // Workers first, then the job (so the watch sees it from QUEUED), then the
  // shards that let it start.
  StartWorkers(2);
  AwaitCluster(0, 2);
  const v1::JobSpec spec = TinyJob(3, Path("cluster"));
  std::string id;
  ASSERT_TRUE(Submit(spec, &id).ok());
  std::vector<v1::WatchJobResponse> events;
  grpc::Status watch_status;
  std::thread watcher([&] { watch_status = Watch(id, &events); });
  std::this_thread::sleep_for(std::chrono::milliseconds(200));
  StartShards(2);
  watcher.join();
  ASSERT_TRUE(watch_status.ok()) << Describe(watch_status);

  // SNAPSHOT (queued), STATE running, PLACEMENT, STEP 1..3, ..., STATE succeeded.
  ASSERT_GE(events.size(), 6u);
  EXPECT_EQ(events.front().kind(), v1::JOB_EVENT_KIND_SNAPSHOT);
  EXPECT_EQ(events.front().job().state(), v1::JOB_STATE_QUEUED);
  EXPECT_EQ(events.back().kind(), v1::JOB_EVENT_KIND_STATE);
  EXPECT_EQ(events.back().job().state(), v1::JOB_STATE_SUCCEEDED) << events.back().job().error();
  std::vector<int64_t> steps;
  int placements = 0, running = 0, checkpoints = 0;
  for (const v1::WatchJobResponse& e : events) {
    if (e.kind() == v1::JOB_EVENT_KIND_STATE && e.job().state() == v1::JOB_STATE_RUNNING) ++running;
    if (e.kind() == v1::JOB_EVENT_KIND_CHECKPOINT) ++checkpoints;
    if (e.kind() == v1::JOB_EVENT_KIND_PLACEMENT) {
      ++placements;
      EXPECT_EQ(running, 1);  // after the job started
      ASSERT_EQ(e.job().placement_size(), 2);
      int tensors = 0;
      for (const v1::ShardPlacement& p : e.job().placement()) tensors += p.tensors_size();
      EXPECT_EQ(tensors, static_cast<int>(ModelLayout(spec.model()).tensors().size()));
    }
    if (e.kind() == v1::JOB_EVENT_KIND_STEP) {
      EXPECT_EQ(placements, 1);  // after the placement
      steps.push_back(e.job().progress().step());
      EXPECT_EQ(e.job().progress().total_steps(), 3);
      EXPECT_EQ(e.job().progress().workers(), 2);
      EXPECT_GT(e.job().progress().loss(), 0.0);
    }
  }
  EXPECT_EQ(running, 1);
  EXPECT_EQ(placements, 1);
  EXPECT_EQ(steps, (std::vector<int64_t>{1, 2, 3}));
  EXPECT_EQ(checkpoints, 2);  // step 2 and the end

  const v1::Job job = GetJob(id);
  EXPECT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED);
  EXPECT_EQ(job.last_checkpoint(), Path("cluster/step-00000003"));
  EXPECT_TRUE(job.progress().has_val_loss());
  EXPECT_EQ(job.progress().val_step(), 3);
  for (const auto& shard : shards_) EXPECT_EQ(shard->service.job_id(), "");

  // The same job in one process.
  v1::JobSpec single = spec;
  single.mutable_checkpoint()->set_dir(Path("trainer"));
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(single, {});
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  absl::StatusOr<TrainSummary> summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_EQ(summary->last_checkpoint, Path("trainer/step-00000003"));
  EXPECT_EQ(job.progress().loss(), summary->final_loss);
  ASSERT_TRUE(summary->final_val_loss.has_value());
  EXPECT_EQ(job.progress().val_loss(), *summary->final_val_loss);

  const ModelLayout layout(spec.model());
  const TrainingState distributed = ReadWholeCheckpoint(job.last_checkpoint(), spec);
  const TrainingState reference = ReadWholeCheckpoint(summary->last_checkpoint, spec);
  EXPECT_EQ(distributed.trainer.step(), 3);
  EXPECT_EQ(reference.trainer.step(), 3);
  EXPECT_EQ(distributed.trainer.tokens_seen(), reference.trainer.tokens_seen());
  // Bit equality of one tensor's slice of two flat buffers.
  auto same = [](const std::vector<float>& a, const std::vector<float>& b, const TensorInfo& t) {
    return std::memcmp(a.data() + t.offset, b.data() + t.offset, t.numel * sizeof(float)) == 0;
  };
  for (const TensorInfo& t : layout.tensors()) {
    EXPECT_TRUE(same(distributed.params, reference.params, t)) << t.name;
    EXPECT_TRUE(same(distributed.momentum, reference.momentum, t)) << t.name;
    EXPECT_TRUE(same(distributed.exp_avg, reference.exp_avg, t)) << t.name;
    EXPECT_TRUE(same(distributed.exp_avg_sq, reference.exp_avg_sq, t)) << t.name;
  }
}

// The CPU path through an injected backend: each lane of each worker on a
// backend of its own that forwards to the CPU but owns its memory and
// counts what it was asked. The job must still end on the trainer's bits,
// and the backends must have held the parameters and gradients and run the
// products: the worker's wiring of --device, checked without a GPU.
struct BackendUse {
  std::atomic<int64_t> backends{0}, bytes{0}, matmuls{0}, syncs{0};
};

class RecordingBackend : public CpuComputeBackend {
 public:
  explicit RecordingBackend(BackendUse* use) : use_(use) { ++use_->backends; }
  void* Allocate(size_t bytes) override {
    use_->bytes += static_cast<int64_t>(bytes);
    return CpuComputeBackend::Allocate(bytes);
  }
  void Synchronize() override { ++use_->syncs; }
  void matmul_forward(float* out, const float* inp, const float* weight, int N, int IC,
                      int OC) override {
    ++use_->matmuls;
    CpuComputeBackend::matmul_forward(out, inp, weight, N, IC, OC);
  }

 private:
  BackendUse* use_;
};

TEST_F(CoordinatorTest, WorkersOnAnInjectedBackendComputeTheTrainersBits) {
  StartCoordinator(kClusterHeartbeat, kClusterLease, /*min_shards=*/1);
  BackendUse use;
  StartWorkers(
      2,
      [&use](int) -> absl::StatusOr<std::unique_ptr<ComputeBackend>> {
        return std::make_unique<RecordingBackend>(&use);
      },
      /*threads=*/2);
  StartShards(1);
  AwaitCluster(1, 2);
  const v1::JobSpec spec = TinyJob(3, Path("cluster"));
  std::string id;
  ASSERT_TRUE(Submit(spec, &id).ok());
  std::vector<v1::WatchJobResponse> events;
  ASSERT_TRUE(Watch(id, &events).ok());
  const v1::Job job = GetJob(id);
  ASSERT_EQ(job.state(), v1::JOB_STATE_SUCCEEDED) << job.error();

  v1::JobSpec single = spec;
  single.mutable_checkpoint()->set_dir(Path("trainer"));
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(single, {});
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  absl::StatusOr<TrainSummary> summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  const TrainingState distributed = ReadWholeCheckpoint(job.last_checkpoint(), spec);
  const TrainingState reference = ReadWholeCheckpoint(summary->last_checkpoint, spec);
  const ModelLayout layout(spec.model());
  for (const TensorInfo& t : layout.tensors()) {
    EXPECT_EQ(std::memcmp(distributed.params.data() + t.offset, reference.params.data() + t.offset,
                          t.numel * sizeof(float)),
              0)
        << t.name;
  }
  // Two lanes per worker that computed, each with its parameters' or its
  // gradient's worth of backend memory at least, and every product.
  EXPECT_GE(use.backends.load(), 2);
  EXPECT_GE(use.bytes.load(), 2 * layout.total_floats() * static_cast<int64_t>(sizeof(float)));
  EXPECT_GT(use.matmuls.load(), 0);
  EXPECT_GT(use.syncs.load(), 0);
}

TEST_F(CoordinatorTest, UnreadableDataFailsTheJobNamingThePath) {
  StartCoordinator(kClusterHeartbeat, kClusterLease, /*min_shards=*/2);
  StartWorkers(2);
  StartShards(2);
  AwaitCluster(2, 2);
  v1::JobSpec spec = TinyJob(3, "");
  spec.mutable_data()->set_path(Path("no-such-corpus.txt"));
  std::string id;
  ASSERT_TRUE(Submit(spec, &id).ok());
  std::vector<v1::WatchJobResponse> events;
  ASSERT_TRUE(Watch(id, &events).ok());
  ASSERT_FALSE(events.empty());
  const v1::Job& job = events.back().job();
  EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED);
  EXPECT_THAT(job.error(), HasSubstr("no-such-corpus.txt"));
  EXPECT_THAT(job.error(), HasSubstr("worker-"));
  EXPECT_EQ(job.progress().step(), 0);
  for (const auto& shard : shards_) EXPECT_EQ(shard->service.job_id(), "");
  grpc::Status late = Cancel(id);
  EXPECT_EQ(late.error_code(), grpc::StatusCode::FAILED_PRECONDITION) << Describe(late);
}

// A job cannot read outside the workers' data roots, and the refusal is the
// same whether the file exists or not (it never tells what is there).
TEST_F(CoordinatorTest, DataOutsideTheWorkersRootsIsRefusedWithoutSayingWhatExists) {
  StartCoordinator(kClusterHeartbeat, kClusterLease, /*min_shards=*/1);
  StartWorkers(1);
  StartShards(1);
  AwaitCluster(1, 1);
  std::filesystem::create_symlink("/etc", Path("etc-link"));
  std::vector<std::string> errors;
  for (const std::string& path : std::vector<std::string>{
           "/etc/os-release", "/nonexistent/file", "/dev/zero", Path("etc-link/os-release")}) {
    v1::JobSpec spec = TinyJob(3, "");
    spec.mutable_data()->set_path(path);
    std::string id;
    ASSERT_TRUE(Submit(spec, &id).ok());
    std::vector<v1::WatchJobResponse> events;
    ASSERT_TRUE(Watch(id, &events).ok());
    ASSERT_FALSE(events.empty());
    const v1::Job& job = events.back().job();
    EXPECT_EQ(job.state(), v1::JOB_STATE_FAILED) << path;
    EXPECT_THAT(job.error(), HasSubstr("data.path"));
    EXPECT_THAT(job.error(), HasSubstr("is not under the allowed roots"));
    std::string error = job.error();
    error.replace(error.find(path), path.size(), "PATH");
    error = error.substr(error.find(": ") + 2);  // after "worker ID: "
    errors.push_back(error);
  }
  EXPECT_EQ(std::set<std::string>(errors.begin(), errors.end()).size(), 1u)
      << errors[0] << " | " << errors[1];
}

TEST_F(CoordinatorTest, CancellingARunningJobDropsItFromTheShards) {
  StartCoordinator(kClusterHeartbeat, kClusterLease, /*min_shards=*/2);
  StartWorkers(2);
  StartShards(2);
  AwaitCluster(2, 2);
  // No validation: the job is only ever between optimizer steps or in one.
  v1::JobSpec spec = TinyJob(100000, Path("cancelled"));
  spec.mutable_data()->set_eval_every(0);
  std::string id;
  ASSERT_TRUE(Submit(spec, &id).ok());
  std::atomic<bool> cancel_sent{false};
  std::vector<v1::WatchJobResponse> events;
  grpc::Status cancel_status;
  v1::Job at_cancel;
  const grpc::Status watch_status = Watch(id, &events, [&](const v1::WatchJobResponse& e) {
    if (e.kind() == v1::JOB_EVENT_KIND_STEP && e.job().progress().step() == 2 && !cancel_sent) {
      cancel_sent = true;
      for (const auto& shard : shards_) EXPECT_EQ(shard->service.job_id(), id);
      cancel_status = Cancel(id, &at_cancel);
    }
  });
  ASSERT_TRUE(watch_status.ok()) << Describe(watch_status);
  ASSERT_TRUE(cancel_sent);
  EXPECT_TRUE(cancel_status.ok()) << Describe(cancel_status);
  EXPECT_THAT(at_cancel.state(), ::testing::AnyOf(v1::JOB_STATE_RUNNING, v1::JOB_STATE_CANCELLED));
  const v1::Job& job = events.back().job();
  EXPECT_EQ(job.state(), v1::JOB_STATE_CANCELLED) << job.error();
  EXPECT_GE(job.progress().step(), 2);
  EXPECT_LT(job.progress().step(), 100000);
  for (const auto& shard : shards_) EXPECT_EQ(shard->service.job_id(), "");
  // The last completed step was checkpointed.
  EXPECT_EQ(job.last_checkpoint(),
            Path(absl::StrCat("cancelled/", CheckpointName(job.progress().step()))));
  EXPECT_TRUE(std::filesystem::exists(job.last_checkpoint() + "/trainer_state.json"));
  // The shards take the next job.
  std::string next;
  ASSERT_TRUE(Submit(TinyJob(1, ""), &next).ok());
  std::vector<v1::WatchJobResponse> next_events;
  ASSERT_TRUE(Watch(next, &next_events).ok());
  EXPECT_EQ(next_events.back().job().state(), v1::JOB_STATE_SUCCEEDED)
      << next_events.back().job().error();
}

}  // namespace
}  // namespace muonps
