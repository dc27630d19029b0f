// The single-process trainer: determinism, bit-identical resume, thread-count
// independence, learning on the default corpus, and clear errors.
#include "trainer/trainer.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <sys/wait.h>

#include <cmath>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>

#include "absl/strings/str_cat.h"
#include "checkpoint/checkpoint.h"
#include "common/bf16.h"
#include "common/job_spec.h"
#include "common/parallel.h"
#include "common/safetensors.h"
#include "data/batch_sampler.h"
#include "model/moe_model.h"
#include "tests/trainer_test_util.h"

namespace muonps {
namespace {

namespace fs = std::filesystem;
using ::testing::HasSubstr;

std::string TempDir(const std::string& name) {
  const fs::path dir =
      fs::path(testing::TempDir()) / absl::StrCat("muonps_trainer_", name, "_", ::getpid());
  fs::remove_all(dir);
  fs::create_directories(dir);
  return dir.string();
}

using testing_util::RunJob;
using testing_util::TinyJob;
using testing_util::WriteCorpus;

void ExpectBitIdentical(const std::vector<float>& a, const std::vector<float>& b,
                        const char* what) {
  ASSERT_EQ(a.size(), b.size()) << what;
  EXPECT_EQ(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)), 0) << what << " differ";
}

class TrainerTest : public ::testing::TestWithParam<std::string> {};

TEST_P(TrainerTest, SameJobSameSeedIsBitIdentical) {
  const std::string dir = TempDir("repeat_" + GetParam());
  const v1::JobSpec job = TinyJob(WriteCorpus(dir), GetParam());
  const TrainingState a = RunJob(job);
  const TrainingState b = RunJob(job);
  ExpectBitIdentical(a.params, b.params, "parameters");
  // And training did change the parameters.
  const v1::JobSpec& zero = job;
  absl::StatusOr<std::unique_ptr<Trainer>> fresh = Trainer::Create(zero, {});
  ASSERT_TRUE(fresh.ok());
  EXPECT_NE(std::memcmp(a.params.data(), (*fresh)->state().params.data(),
                        a.params.size() * sizeof(float)),
            0);
}

TEST_P(TrainerTest, ResumeIsBitIdenticalToAnUninterruptedRun) {
  const std::string dir = TempDir("resume_" + GetParam());
  v1::JobSpec job = TinyJob(WriteCorpus(dir), GetParam());
  const TrainingState straight = RunJob(job);

  job.mutable_checkpoint()->set_dir(dir + "/ckpt");
  TrainOptions first;
  first.until_step = 3;
  const TrainingState half = RunJob(job, first);
  ASSERT_EQ(half.trainer.step(), 3);
  ASSERT_TRUE(fs::exists(dir + "/ckpt/step-00000003/model.safetensors"));

  TrainOptions second;
  second.resume = dir + "/ckpt";  // resolves to the newest step-* inside
  const TrainingState resumed = RunJob(job, second);
  ASSERT_EQ(resumed.trainer.step(), 6);
  ExpectBitIdentical(straight.params, resumed.params, "parameters");
  ExpectBitIdentical(straight.momentum, resumed.momentum, "momentum buffers");
  ExpectBitIdentical(straight.exp_avg, resumed.exp_avg, "exp_avg");
  ExpectBitIdentical(straight.exp_avg_sq, resumed.exp_avg_sq, "exp_avg_sq");
}

TEST_P(TrainerTest, ThreadCountDoesNotChangeTheResult) {
  const std::string dir = TempDir("threads_" + GetParam());
  const v1::JobSpec job = TinyJob(WriteCorpus(dir), GetParam());
  SetNumThreads(1);
  const TrainingState one = RunJob(job);
  SetNumThreads(2);
  const TrainingState two = RunJob(job);
  ExpectBitIdentical(one.params, two.params, "parameters");
}

INSTANTIATE_TEST_SUITE_P(Optimizers, TrainerTest, ::testing::Values("muon", "adamw"));

TEST(TrainerErrors, MissingDataIsAClearError) {
  v1::JobSpec job = TinyJob("/nonexistent/corpus", "muon");
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(job, {});
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()), HasSubstr("/nonexistent/corpus"));
}

TEST(TrainerErrors, CorpusShorterThanOneWindowIsAClearError) {
  const std::string dir = TempDir("short");
  std::ofstream(dir + "/short.txt") << "too short";
  absl::StatusOr<std::unique_ptr<Trainer>> trainer =
      Trainer::Create(TinyJob(dir + "/short.txt", "muon"), {});
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()), HasSubstr("short"));
}

// Trains the tiny Muon job for one step with checkpoints in dir/ckpt.
v1::JobSpec TrainOneStepWithCheckpoint(const std::string& dir) {
  v1::JobSpec job = TinyJob(WriteCorpus(dir), "muon");
  job.mutable_checkpoint()->set_dir(dir + "/ckpt");
  TrainOptions first;
  first.until_step = 1;
  RunJob(job, first);
  return job;
}

TEST(TrainerErrors, CorruptCheckpointIsRefusedNamingTheTensor) {
  const std::string dir = TempDir("corrupt");
  const v1::JobSpec job = TrainOneStepWithCheckpoint(dir);
  const std::string model = dir + "/ckpt/step-00000001/model.safetensors";
  ASSERT_TRUE(fs::exists(model));

  // A checkpoint of another architecture: same names, other shapes.
  v1::JobSpec other = job;
  other.mutable_model()->set_intermediate_size(48);
  TrainOptions resume;
  resume.resume = dir + "/ckpt";
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(other, resume);
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()), HasSubstr("config"));

  // Truncated parameters.
  fs::resize_file(model, fs::file_size(model) / 2);
  trainer = Trainer::Create(job, resume);
  ASSERT_FALSE(trainer.ok());
  EXPECT_THAT(std::string(trainer.status().message()), HasSubstr("model.safetensors"));
}

TEST(TrainerErrors, NonFiniteValuesStopWithAClearErrorAndLeaveTheStateIntact) {
  const std::string dir = TempDir("nan");
  const v1::JobSpec job = TrainOneStepWithCheckpoint(dir);

  // Poison one weight of the checkpoint.
  const std::string model = dir + "/ckpt/step-00000001/model.safetensors";
  absl::StatusOr<SafetensorsFile> file = SafetensorsFile::Open(model);
  ASSERT_TRUE(file.ok()) << file.status();
  std::vector<std::vector<float>> data;
  std::vector<TensorRef> refs;
  for (const std::string& name : file->names()) {
    absl::StatusOr<std::vector<int64_t>> shape = file->shape(name);
    ASSERT_TRUE(shape.ok());
    int64_t n = 1;
    for (int64_t d : *shape) n *= d;
    data.emplace_back(n);
    ASSERT_TRUE(file->ReadInto(name, *shape, data.back().data()).ok());
    if (name == "lm_head.weight") data.back()[5] = std::nanf("");
    refs.push_back({name, *shape, nullptr});
  }
  for (size_t i = 0; i < refs.size(); ++i) refs[i].data = data[i].data();
  ASSERT_TRUE(WriteSafetensors(model, refs, file->metadata()).ok());

  TrainOptions resume;
  resume.resume = dir + "/ckpt";
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(job, resume);
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  const std::vector<float> before = (*trainer)->state().params;
  absl::StatusOr<StepReport> step = (*trainer)->Step();
  ASSERT_FALSE(step.ok());
  EXPECT_THAT(std::string(step.status().message()), HasSubstr("not finite"));
  EXPECT_EQ((*trainer)->step(), 1);
  // Bit-identical, NaN included.
  EXPECT_EQ(
      std::memcmp(before.data(), (*trainer)->state().params.data(), before.size() * sizeof(float)),
      0);
}

TEST(TrainerRun, StopRequestEndsAfterAStepWithACheckpoint) {
  const std::string dir = TempDir("stop");
  v1::JobSpec job = TinyJob(WriteCorpus(dir), "adamw");
  job.mutable_checkpoint()->set_dir(dir + "/ckpt");
  int steps = 0;
  TrainOptions options;
  options.on_step = [&](const StepReport&) { ++steps; };
  options.stop_requested = [&] { return steps >= 2; };
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(job, options);
  ASSERT_TRUE(trainer.ok());
  absl::StatusOr<TrainSummary> summary = (*trainer)->Run();
  ASSERT_TRUE(summary.ok()) << summary.status();
  EXPECT_TRUE(summary->interrupted);
  EXPECT_EQ(summary->final_step, 2);
  EXPECT_TRUE(fs::exists(dir + "/ckpt/step-00000002/trainer_state.json"));
}

// Runs the muonps binary; returns its exit status and stderr.
std::pair<int, std::string> RunCli(const std::string& args) {
  const std::string err = TempDir("cli") + "/stderr.txt";
  const int rc =
      std::system((std::string(MUONPS_BINARY) + " " + args + " > /dev/null 2> " + err).c_str());
  std::ifstream in(err);
  std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  return {WIFEXITED(rc) ? WEXITSTATUS(rc) : -1, text};
}

TEST(TrainerCli, BadJobsEndWithOneClearMessage) {
  const std::string dir = TempDir("cli_jobs");
  std::ofstream(dir + "/bad.json") << R"({"model": {"num_experts_per_tok": 99}})";
  auto [rc, err] = RunCli("train " + dir + "/bad.json");
  EXPECT_NE(rc, 0);
  EXPECT_THAT(err, HasSubstr("model.num_experts_per_tok"));
  EXPECT_EQ(std::count(err.begin(), err.end(), '\n'), 1) << err;

  std::ofstream(dir + "/nodata.json") << R"({"data": {"path": "/nonexistent/x"}})";
  std::tie(rc, err) = RunCli("train " + dir + "/nodata.json");
  EXPECT_NE(rc, 0);
  EXPECT_THAT(err, HasSubstr("/nonexistent/x"));

  std::tie(rc, err) = RunCli("train /nonexistent/job.json");
  EXPECT_NE(rc, 0);
  EXPECT_THAT(err, HasSubstr("/nonexistent/job.json"));
}

// transfer.dtype bf16: the model computes with the parameters rounded to
// bf16, as a worker pulls them. The first step's loss is recomputed here
// with a model of its own on the rounded initial values.
TEST(TrainerBf16, TheModelSeesTheParametersRoundedToBf16) {
  const std::string dir = TempDir("bf16");
  v1::JobSpec job = TinyJob(WriteCorpus(dir), "muon");
  v1::JobSpec f32 = job;
  job.mutable_transfer()->set_dtype("bf16");
  ASSERT_TRUE(ValidateJobSpec(job).ok());
  absl::StatusOr<std::unique_ptr<Trainer>> trainer = Trainer::Create(job, {});
  ASSERT_TRUE(trainer.ok()) << trainer.status();
  std::vector<float> rounded = (*trainer)->state().params;
  for (float& x : rounded) x = Bf16ToFloat(FloatToBf16(x));
  const v1::ModelConfig& mc = job.model();
  const int T = mc.max_position_embeddings(), slots = job.batch().slots();
  const int rows = job.batch().micro_batch();
  BatchSampler sampler(&(*trainer)->corpus().train, T, slots, rows, /*random=*/true, job.seed());
  MoeModel model(mc);
  std::vector<int32_t> inputs(static_cast<size_t>(rows) * T), targets(inputs.size());
  double loss_sum = 0.0;
  for (int s = 0; s < slots; ++s) {
    sampler.Fill(0, s, inputs.data(), targets.data());
    loss_sum += model.Forward(rounded.data(), inputs.data(), targets.data(), rows).loss_sum;
  }
  const double want = loss_sum / (static_cast<double>(slots) * rows * T);

  absl::StatusOr<StepReport> step = (*trainer)->Step();
  ASSERT_TRUE(step.ok()) << step.status();
  EXPECT_NEAR(step->loss, want, 1e-6 * want);
  absl::StatusOr<std::unique_ptr<Trainer>> plain = Trainer::Create(f32, {});
  ASSERT_TRUE(plain.ok()) << plain.status();
  absl::StatusOr<StepReport> plain_step = (*plain)->Step();
  ASSERT_TRUE(plain_step.ok()) << plain_step.status();
  EXPECT_GT(std::fabs(plain_step->loss - step->loss), 1e-5 * want)
      << "the rounding changed nothing";
  // The master values themselves are not rounded.
  int64_t unrounded = 0;
  for (float x : (*trainer)->state().params) unrounded += x != Bf16ToFloat(FloatToBf16(x));
  EXPECT_GT(unrounded, 0);
}

}  // namespace
}  // namespace muonps
