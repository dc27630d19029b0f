// The moonlight-16b-a3b preset against what Moonshot AI published: every
// value of the checkpoint's config.json (a copy in tests/data, see
// tests/data/SOURCES.md), the parameter counts of the Moonlight paper, and
// the tensor names and shapes of the Hugging Face DeepSeek-V3 model as the
// independent Python model lists them; plus `validate` and `plan` on it, and
// the scaled-down moonlight-tiny keeping its ratios.
#include <gmock/gmock.h>
#include <gtest/gtest.h>

#include <cstdio>
#include <fstream>
#include <map>
#include <sstream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "common/hf_config.h"
#include "common/job_spec.h"
#include "common/model_layout.h"
#include "nlohmann/json.hpp"
#include "services/coordinator/cluster_plan.h"

namespace muonps {
namespace {

constexpr char kPython[] = "/usr/bin/python3";

nlohmann::json PublishedConfig() {
  std::ifstream in(std::string(MUONPS_TEST_DATA_DIR) + "/moonlight_16b_a3b_config.json");
  EXPECT_TRUE(in.good());
  return nlohmann::json::parse(in);
}

v1::ModelConfig Preset(const char* name) {
  absl::StatusOr<v1::JobSpec> job = PresetJobSpec(name);
  EXPECT_TRUE(job.ok()) << job.status();
  return job->model();
}

TEST(MoonlightPresetTest, EveryValueIsThePublishedOne) {
  const nlohmann::json hf = PublishedConfig();
  const v1::ModelConfig m = Preset("moonlight-16b-a3b");
  // The keys muonps keeps, under the same names.
  const std::map<std::string, double> ours = {
      {"vocab_size", m.vocab_size()},
      {"hidden_size", m.hidden_size()},
      {"num_hidden_layers", m.num_hidden_layers()},
      {"num_attention_heads", m.num_attention_heads()},
      {"max_position_embeddings", m.max_position_embeddings()},
      {"rope_theta", m.rope_theta()},
      {"rms_norm_eps", m.rms_norm_eps()},
      {"first_k_dense_replace", m.first_k_dense_replace()},
      {"intermediate_size", m.intermediate_size()},
      {"n_routed_experts", m.n_routed_experts()},
      {"num_experts_per_tok", m.num_experts_per_tok()},
      {"n_shared_experts", m.n_shared_experts()},
      {"moe_intermediate_size", m.moe_intermediate_size()},
      {"routed_scaling_factor", m.routed_scaling_factor()},
      {"aux_loss_alpha", m.aux_loss_alpha()},
      {"initializer_range", m.initializer_range()},
      {"kv_lora_rank", m.kv_lora_rank()},
      {"qk_nope_head_dim", m.qk_nope_head_dim()},
      {"qk_rope_head_dim", m.qk_rope_head_dim()},
      {"v_head_dim", m.v_head_dim()},
  };
  for (const auto& [key, value] : ours) {
    ASSERT_TRUE(hf.contains(key)) << key;
    EXPECT_EQ(value, hf[key].get<double>()) << key;
  }
  EXPECT_EQ(m.scoring_func(), hf["scoring_func"].get<std::string>());
  EXPECT_EQ(m.norm_topk_prob(), hf["norm_topk_prob"].get<bool>());
  EXPECT_EQ(m.model_type(), hf["model_type"].get<std::string>());
  EXPECT_EQ(m.attention(), "mla");
  EXPECT_TRUE(hf["q_lora_rank"].is_null());
  EXPECT_EQ(m.q_lora_rank(), 0);  // null: an uncompressed q_proj
  // The published values muonps has no key for are the ones its model is.
  EXPECT_EQ(hf["topk_method"], "noaux_tc");  // the bias-corrected choice
  EXPECT_EQ(m.balancing(), "aux_free_bias");
  EXPECT_EQ(hf["n_group"], 1);  // no group-limited routing
  EXPECT_EQ(hf["topk_group"], 1);
  EXPECT_EQ(hf["num_key_value_heads"], hf["num_attention_heads"]);
  EXPECT_EQ(hf["moe_layer_freq"], 1);
  EXPECT_EQ(hf["num_nextn_predict_layers"], 0);
  EXPECT_EQ(hf["tie_word_embeddings"], false);
  EXPECT_EQ(hf["hidden_act"], "silu");
  EXPECT_EQ(hf["attention_bias"], false);
  EXPECT_FALSE(hf.contains("rope_scaling"));
}

// The config.json a checkpoint of the preset carries has exactly the
// published keys, with the published values except the two that describe
// this writer: torch_dtype (muonps saves float32) and seq_aux (its auxiliary
// loss is over a slot's tokens).
TEST(MoonlightPresetTest, ConfigJsonHasThePublishedKeysAndValues) {
  const nlohmann::json hf = PublishedConfig();
  const v1::ModelConfig m = Preset("moonlight-16b-a3b");
  const nlohmann::json ours = HfConfig(m);
  std::vector<std::string> their_keys, our_keys;
  for (const auto& [key, value] : hf.items()) their_keys.push_back(key);
  for (const auto& [key, value] : ours.items()) our_keys.push_back(key);
  EXPECT_EQ(our_keys, their_keys);
  for (const auto& [key, value] : hf.items()) {
    if (key == "torch_dtype" || key == "seq_aux" || !ours.contains(key)) continue;
    if (value.is_number()) {
      EXPECT_EQ(ours[key].get<double>(), value.get<double>()) << key;
    } else {
      EXPECT_EQ(ours[key], value) << key;
    }
  }
  EXPECT_EQ(ours["torch_dtype"], "float32");
  // The published file itself passes the check a resume makes, but for
  // those two values.
  nlohmann::json published = hf;
  published["torch_dtype"] = "float32";
  published["seq_aux"] = false;
  EXPECT_TRUE(CheckHfConfig(published.dump(), m).ok()) << CheckHfConfig(published.dump(), m);
  published["kv_lora_rank"] = 256;
  EXPECT_THAT(std::string(CheckHfConfig(published.dump(), m).message()),
              testing::HasSubstr("kv_lora_rank"));
}

// Moonlight paper (arXiv:2502.16982): 15.29 B total and 2.24 B activated
// parameters, embedding and head excluded; 15.96 B with them.
TEST(MoonlightPresetTest, ParameterCountsMatchThePublishedFigures) {
  const v1::ModelConfig m = Preset("moonlight-16b-a3b");
  const ModelLayout layout(m);
  const double routed = static_cast<double>(m.num_experts_per_tok()) / m.n_routed_experts();
  int64_t total = 0, body = 0;
  double activated = 0.0;
  for (const TensorInfo& t : layout.tensors()) {
    total += t.numel;
    if (t.role == TensorRole::kEmbedding || t.role == TensorRole::kHead) continue;
    body += t.numel;
    activated += t.name.find(".mlp.experts.") != std::string::npos ? routed * t.numel : t.numel;
  }
  EXPECT_EQ(total, 15'960'110'208);
  EXPECT_NEAR(body / 1e9, 15.29, 0.005);
  EXPECT_NEAR(activated / 1e9, 2.24, 0.005);
}

// The names and shapes of every tensor against the Python model's, which
// follows the Hugging Face DeepseekV3 modules; with MLA the query and
// key/value projections are those of the published checkpoint.
TEST(MoonlightPresetTest, TensorNamesAndShapesAreTheHuggingFaceOnes) {
  if (std::system(absl::StrCat(kPython, " -c 'import torch, numpy' >/dev/null 2>&1").c_str()) !=
      0) {
    GTEST_SKIP() << kPython << " cannot import torch and numpy; the comparison is skipped";
  }
  for (const char* preset : {"moonlight-16b-a3b", "moonlight-tiny"}) {
    SCOPED_TRACE(preset);
    const v1::ModelConfig m = Preset(preset);
    const std::string config = absl::StrCat(testing::TempDir(), "/", preset, ".json");
    const std::string listing = config + ".txt";
    {
      std::ofstream out(config);
      out << ToJson(m);
    }
    const std::string command =
        absl::StrCat(kPython, " ", MUONPS_TEST_DATA_DIR, "/../reference/moe_reference.py shapes ",
                     config, " > ", listing);
    ASSERT_EQ(std::system(command.c_str()), 0) << command;
    std::ifstream in(listing);
    std::vector<std::string> theirs;
    for (std::string line; std::getline(in, line);) theirs.push_back(line);
    const ModelLayout layout(m);
    std::vector<std::string> ours;
    for (const TensorInfo& t : layout.tensors()) {
      ours.push_back(absl::StrCat(t.name, " ", absl::StrJoin(t.shape, " ")));
    }
    EXPECT_EQ(ours, theirs);
    if (std::string(preset) == "moonlight-16b-a3b") {
      // Spot checks against the shapes the published checkpoint's MLA has.
      auto shape = [&](const std::string& name) {
        const TensorInfo* t = layout.Find(name);
        return t == nullptr ? std::vector<int64_t>{} : t->shape;
      };
      const std::string a = "model.layers.5.self_attn.";
      EXPECT_EQ(shape(a + "q_proj.weight"), (std::vector<int64_t>{3072, 2048}));
      EXPECT_EQ(shape(a + "kv_a_proj_with_mqa.weight"), (std::vector<int64_t>{576, 2048}));
      EXPECT_EQ(shape(a + "kv_a_layernorm.weight"), (std::vector<int64_t>{512}));
      EXPECT_EQ(shape(a + "kv_b_proj.weight"), (std::vector<int64_t>{4096, 512}));
      EXPECT_EQ(shape(a + "o_proj.weight"), (std::vector<int64_t>{2048, 2048}));
      EXPECT_EQ(shape("model.layers.26.mlp.shared_experts.gate_proj.weight"),
                (std::vector<int64_t>{2816, 2048}));
      EXPECT_EQ(shape("model.layers.26.mlp.gate.e_score_correction_bias"),
                (std::vector<int64_t>{64}));
      EXPECT_EQ(shape("lm_head.weight"), (std::vector<int64_t>{163840, 2048}));
      EXPECT_EQ(layout.Find(a + "k_proj.weight"), nullptr);
    }
  }
}

TEST(MoonlightPresetTest, ValidatesAndPlansFrom8To512Workers) {
  absl::StatusOr<v1::JobSpec> job = PresetJobSpec("moonlight-16b-a3b");
  ASSERT_TRUE(job.ok()) << job.status();
  ASSERT_TRUE(ValidateJobSpec(*job).ok()) << ValidateJobSpec(*job);
  double previous = 0.0;
  for (int workers : {8, 64, 512}) {
    PlanOptions options;
    options.workers = workers;
    options.shards = workers / 8;
    absl::StatusOr<ClusterPlan> plan = PlanCluster(*job, options);
    ASSERT_TRUE(plan.ok()) << plan.status();
    EXPECT_EQ(plan->parameters, 15'960'110'208);
    // Fewer slots per worker as the cluster grows: the step gets shorter.
    if (previous > 0.0) {
      EXPECT_LT(plan->compute_seconds, previous);
    }
    previous = plan->compute_seconds;
  }
}

// moonlight-tiny keeps Moonlight's attention ratios and routing choices.
TEST(MoonlightPresetTest, TinyKeepsTheRatios) {
  const v1::ModelConfig big = Preset("moonlight-16b-a3b");
  const v1::ModelConfig tiny = Preset("moonlight-tiny");
  auto head_dim = [](const v1::ModelConfig& m) {
    return m.hidden_size() / m.num_attention_heads();
  };
  for (const v1::ModelConfig* m : {&big, &tiny}) {
    EXPECT_EQ(m->attention(), "mla");
    EXPECT_EQ(m->q_lora_rank(), 0);
    EXPECT_EQ(m->kv_lora_rank(), 4 * head_dim(*m));
    EXPECT_EQ(m->qk_nope_head_dim(), head_dim(*m));
    EXPECT_EQ(m->qk_rope_head_dim(), head_dim(*m) / 2);
    EXPECT_EQ(m->v_head_dim(), head_dim(*m));
    EXPECT_EQ(m->n_shared_experts(), 2);
    EXPECT_EQ(m->first_k_dense_replace(), 1);
    EXPECT_EQ(m->scoring_func(), "sigmoid");
    EXPECT_EQ(m->routed_scaling_factor(), 2.446);
  }
  EXPECT_EQ(big.hidden_size() / tiny.hidden_size(), 16);
  EXPECT_EQ(big.intermediate_size() / tiny.intermediate_size(), 16);
  EXPECT_EQ(big.moe_intermediate_size() / tiny.moe_intermediate_size(), 16);
  absl::StatusOr<v1::JobSpec> job = PresetJobSpec("moonlight-tiny");
  ASSERT_TRUE(job.ok());
  EXPECT_TRUE(ValidateJobSpec(*job).ok()) << ValidateJobSpec(*job);
}

}  // namespace
}  // namespace muonps
