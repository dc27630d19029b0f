// Job files: protobuf JSON parsing, defaults, and field-named validation errors.
#include "common/job_spec.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <functional>
#include <string>
#include <vector>

namespace muonps {
namespace {

using ::testing::HasSubstr;

std::string Error(const std::string& json) {
  absl::StatusOr<v1::JobSpec> job = ParseJobSpecJson(json);
  EXPECT_FALSE(job.ok()) << json;
  return job.ok() ? "" : std::string(job.status().message());
}

TEST(JobSpecTest, EmptyObjectGivesTheDocumentedDefaults) {
  absl::StatusOr<v1::JobSpec> job = ParseJobSpecJson("{}");
  ASSERT_TRUE(job.ok()) << job.status();
  const v1::ModelConfig& m = job->model();
  EXPECT_EQ(m.vocab_size(), 256);
  EXPECT_EQ(m.hidden_size(), 128);
  EXPECT_EQ(m.num_hidden_layers(), 4);
  EXPECT_EQ(m.num_attention_heads(), 4);
  EXPECT_EQ(m.max_position_embeddings(), 256);
  EXPECT_EQ(m.first_k_dense_replace(), 1);
  EXPECT_EQ(m.intermediate_size(), 512);
  EXPECT_EQ(m.n_routed_experts(), 8);
  EXPECT_EQ(m.num_experts_per_tok(), 2);
  EXPECT_EQ(m.n_shared_experts(), 1);
  EXPECT_EQ(m.moe_intermediate_size(), 128);
  EXPECT_EQ(m.scoring_func(), "sigmoid");
  EXPECT_TRUE(m.norm_topk_prob());
  EXPECT_EQ(m.routed_scaling_factor(), 1.0);
  EXPECT_EQ(m.balancing(), "aux_free_bias");
  EXPECT_EQ(m.bias_update_rate(), 1e-3);
  EXPECT_EQ(m.rope_theta(), 10000.0);
  EXPECT_EQ(m.rms_norm_eps(), 1e-6);
  const v1::OptimizerConfig& o = job->optimizer();
  EXPECT_EQ(o.name(), "muon");
  EXPECT_EQ(o.momentum(), 0.95);
  EXPECT_TRUE(o.nesterov());
  EXPECT_EQ(o.ns_steps(), 5);
  EXPECT_EQ(o.weight_decay(), 0.1);
  EXPECT_EQ(o.scale_rule(), "match_rms_adamw");
  EXPECT_EQ(o.adam_beta1(), 0.9);
  EXPECT_EQ(o.adam_beta2(), 0.95);
  EXPECT_EQ(o.adam_eps(), 1e-8);
  EXPECT_EQ(job->data().path(), "/usr/share/games/fortunes");
  EXPECT_EQ(job->recovery().replicas(), 1);
}

TEST(JobSpecTest, ExplicitZerosAndFalseAreKept) {
  absl::StatusOr<v1::JobSpec> job = ParseJobSpecJson(R"({
    "model": {"first_k_dense_replace": 0, "norm_topk_prob": false, "n_shared_experts": 0},
    "optimizer": {"max_grad_norm": 0, "nesterov": false, "weight_decay": 0},
    "schedule": {"warmup_steps": 0}})");
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->model().first_k_dense_replace(), 0);
  EXPECT_FALSE(job->model().norm_topk_prob());
  EXPECT_EQ(job->model().n_shared_experts(), 0);
  EXPECT_EQ(job->optimizer().max_grad_norm(), 0.0);
  EXPECT_FALSE(job->optimizer().nesterov());
  EXPECT_EQ(job->optimizer().weight_decay(), 0.0);
  EXPECT_EQ(job->schedule().warmup_steps(), 0);
}

TEST(JobSpecTest, CamelCaseNamesAreAccepted) {
  absl::StatusOr<v1::JobSpec> job = ParseJobSpecJson(R"({"model": {"hiddenSize": 64}})");
  ASSERT_TRUE(job.ok()) << job.status();
  EXPECT_EQ(job->model().hidden_size(), 64);
}

TEST(JobSpecTest, UnknownFieldsAreRejectedByName) {
  EXPECT_THAT(Error(R"({"model": {"hiden_size": 64}})"), HasSubstr("hiden_size"));
  EXPECT_THAT(Error(R"({"learning_rate": 0.1})"), HasSubstr("learning_rate"));
}

TEST(JobSpecTest, WrongTypesAndMalformedJsonAreRejected) {
  EXPECT_THAT(Error(R"({"model": {"hidden_size": "big"}})"), HasSubstr("hidden_size"));
  EXPECT_FALSE(Error(R"({"model": )").empty());
  EXPECT_THAT(Error(R"({"model": {"hidden_size": 1e20}})"), HasSubstr("hidden_size"));
}

TEST(JobSpecTest, OutOfRangeValuesNameTheField) {
  EXPECT_THAT(Error(R"({"model": {"num_experts_per_tok": 9}})"),
              HasSubstr("model.num_experts_per_tok"));
  EXPECT_THAT(Error(R"({"model": {"hidden_size": 130}})"), HasSubstr("model.num_attention_heads"));
  EXPECT_THAT(Error(R"({"model": {"scoring_func": "relu"}})"), HasSubstr("model.scoring_func"));
  EXPECT_THAT(Error(R"({"model": {"balancing": "none"}})"), HasSubstr("model.balancing"));
  EXPECT_THAT(Error(R"({"model": {"first_k_dense_replace": 5}})"),
              HasSubstr("model.first_k_dense_replace"));
  EXPECT_THAT(Error(R"({"optimizer": {"name": "sgd"}})"), HasSubstr("optimizer.name"));
  EXPECT_THAT(Error(R"({"optimizer": {"lr": -1}})"), HasSubstr("optimizer.lr"));
  EXPECT_THAT(Error(R"({"optimizer": {"momentum": 1.5}})"), HasSubstr("optimizer.momentum"));
  EXPECT_THAT(Error(R"({"optimizer": {"scale_rule": "x"}})"), HasSubstr("optimizer.scale_rule"));
  EXPECT_THAT(Error(R"({"schedule": {"total_steps": 0}})"), HasSubstr("schedule.total_steps"));
  EXPECT_THAT(Error(R"({"schedule": {"total_steps": 10, "warmup_steps": 11}})"),
              HasSubstr("schedule.warmup_steps"));
  EXPECT_THAT(Error(R"({"batch": {"slots": 0}})"), HasSubstr("batch.slots"));
  EXPECT_THAT(Error(R"({"data": {"sampling": "shuffled"}})"), HasSubstr("data.sampling"));
  EXPECT_THAT(Error(R"({"data": {"path": ""}})"), HasSubstr("data.path"));
  EXPECT_THAT(Error(R"({"recovery": {"replicas": 0}})"), HasSubstr("recovery.replicas"));
  EXPECT_THAT(Error(R"({"recovery": {"replicas": 4}, "checkpoint": {"dir": "c"}})"),
              HasSubstr("recovery.replicas"));
  // The survivors of a lost shard hand its tensors over through a checkpoint.
  EXPECT_THAT(Error(R"({"recovery": {"replicas": 2}})"), HasSubstr("checkpoint.dir"));
  EXPECT_TRUE(
      ParseJobSpecJson(R"({"recovery": {"replicas": 3}, "checkpoint": {"dir": "c"}})").ok());
  EXPECT_THAT(Error(R"({"transfer": {"dtype": "fp16"}})"),
              HasSubstr(R"(transfer.dtype: must be one of "f32", "bf16", got "fp16")"));
  absl::StatusOr<v1::JobSpec> bf16 = ParseJobSpecJson(R"({"transfer": {"dtype": "bf16"}})");
  ASSERT_TRUE(bf16.ok()) << bf16.status();
  EXPECT_EQ(TransferDtypeOf(*bf16), TransferDtype::kBF16);
  EXPECT_EQ(TransferDtypeOf(DefaultJobSpec()), TransferDtype::kF32);
}

TEST(JobSpecTest, CallerChosenStringsAreBounded) {
  struct Case {
    std::function<void(v1::JobSpec*)> edit;
    const char* field;
  };
  for (const Case& c : std::vector<Case>{
           {[](v1::JobSpec* j) { j->set_name(std::string(129, 'n')); }, "name"},
           {[](v1::JobSpec* j) { j->mutable_data()->set_path(std::string(4097, 'p')); },
            "data.path"},
           {[](v1::JobSpec* j) { j->mutable_checkpoint()->set_dir(std::string(4097, 'd')); },
            "checkpoint.dir"}}) {
    v1::JobSpec job = DefaultJobSpec();
    c.edit(&job);
    const absl::Status st = ValidateJobSpec(job);
    EXPECT_EQ(st.code(), absl::StatusCode::kInvalidArgument) << c.field;
    EXPECT_THAT(std::string(st.message()), HasSubstr(c.field));
  }
  v1::JobSpec job = DefaultJobSpec();
  job.set_name(std::string(128, 'n'));
  EXPECT_TRUE(ValidateJobSpec(job).ok());
}

TEST(JobSpecTest, RoundTripsThroughJson) {
  v1::JobSpec job = DefaultJobSpec();
  job.mutable_model()->set_hidden_size(64);
  absl::StatusOr<v1::JobSpec> back = ParseJobSpecJson(ToJson(job));
  ASSERT_TRUE(back.ok()) << back.status();
  EXPECT_EQ(back->SerializeAsString(), job.SerializeAsString());
}

TEST(JobSpecTest, MissingFileNamesThePath) {
  absl::StatusOr<v1::JobSpec> job = LoadJobSpecFile("/nonexistent/job.json");
  ASSERT_FALSE(job.ok());
  EXPECT_THAT(std::string(job.status().message()), HasSubstr("/nonexistent/job.json"));
}

}  // namespace
}  // namespace muonps
