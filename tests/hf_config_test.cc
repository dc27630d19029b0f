// config.json in the Hugging Face DeepSeek-V3 form (common/hf_config.h):
// what it holds for MHA and MLA models, and what a resume accepts.
#include "common/hf_config.h"

#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <string>

#include "common/job_spec.h"

namespace muonps {
namespace {

using testing::HasSubstr;

v1::ModelConfig Mla() {
  v1::JobSpec job;
  job.mutable_model()->set_attention("mla");
  FillJobDefaults(&job);
  return job.model();
}

TEST(HfConfigTest, MlaModelsNameTheDeepSeekV3ArchitectureAndTheirWidths) {
  const v1::ModelConfig m = Mla();
  const nlohmann::json c = HfConfig(m);
  EXPECT_EQ(c["architectures"], nlohmann::json({"DeepseekV3ForCausalLM"}));
  EXPECT_TRUE(c["q_lora_rank"].is_null());  // 0: a plain q_proj
  EXPECT_EQ(c["kv_lora_rank"], 128);        // 4 x the head dimension 32
  EXPECT_EQ(c["qk_nope_head_dim"], 32);
  EXPECT_EQ(c["qk_rope_head_dim"], 16);
  EXPECT_EQ(c["v_head_dim"], 32);
  EXPECT_EQ(c["num_key_value_heads"], m.num_attention_heads());
  EXPECT_EQ(c["topk_method"], "noaux_tc");
  EXPECT_FALSE(c.contains("muonps_attention"));
  v1::ModelConfig compressed = m;
  compressed.set_q_lora_rank(64);
  EXPECT_EQ(HfConfig(compressed)["q_lora_rank"], 64);
}

TEST(HfConfigTest, MhaModelsClaimNoHuggingFaceArchitecture) {
  const v1::ModelConfig m = DefaultJobSpec().model();
  const nlohmann::json c = HfConfig(m);
  EXPECT_FALSE(c.contains("architectures"));
  EXPECT_FALSE(c.contains("kv_lora_rank"));
  EXPECT_EQ(c["muonps_attention"], "mha");
  EXPECT_EQ(c["hidden_size"], 128);
}

TEST(HfConfigTest, AResumeAcceptsItsOwnConfigAndRefusesAnyOther) {
  for (const v1::ModelConfig& m : {DefaultJobSpec().model(), Mla()}) {
    SCOPED_TRACE(m.attention());
    EXPECT_TRUE(CheckHfConfig(HfConfigJson(m), m).ok());
    v1::ModelConfig wider = m;
    wider.set_hidden_size(256);
    const absl::Status differs = CheckHfConfig(HfConfigJson(wider), m);
    EXPECT_EQ(differs.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_THAT(std::string(differs.message()), HasSubstr("hidden_size"));
    nlohmann::json extra = HfConfig(m);
    extra[std::string(10000, 'k')] = 1;
    const absl::Status unknown = CheckHfConfig(extra.dump(), m);
    EXPECT_EQ(unknown.code(), absl::StatusCode::kFailedPrecondition);
    EXPECT_LT(unknown.message().size(), 200u) << "a hostile key is echoed whole";
    nlohmann::json missing = HfConfig(m);
    missing.erase("vocab_size");
    EXPECT_THAT(std::string(CheckHfConfig(missing.dump(), m).message()), HasSubstr("vocab_size"));
    EXPECT_EQ(CheckHfConfig("[1, 2]", m).code(), absl::StatusCode::kInvalidArgument);
    EXPECT_EQ(CheckHfConfig("{\"hidden_size\": ", m).code(), absl::StatusCode::kInvalidArgument);
  }
  // MHA and MLA of the same widths are told apart.
  v1::ModelConfig mha = Mla();
  mha.set_attention("mha");
  mha.clear_q_lora_rank();
  mha.clear_kv_lora_rank();
  mha.clear_qk_nope_head_dim();
  mha.clear_qk_rope_head_dim();
  mha.clear_v_head_dim();
  EXPECT_FALSE(CheckHfConfig(HfConfigJson(Mla()), mha).ok());
}

// Checkpoints written before config.json took the Hugging Face form hold
// the ModelConfig message; they still resume.
TEST(HfConfigTest, EarlierCheckpointsConfigStillResumes) {
  const v1::ModelConfig m = DefaultJobSpec().model();
  EXPECT_TRUE(CheckHfConfig(ToJson(m), m).ok());
  v1::ModelConfig other = m;
  other.set_num_hidden_layers(2);
  EXPECT_EQ(CheckHfConfig(ToJson(other), m).code(), absl::StatusCode::kFailedPrecondition);
}

}  // namespace
}  // namespace muonps
