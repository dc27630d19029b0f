#include "common/hf_config.h"

#include "absl/strings/str_cat.h"
#include "common/job_spec.h"
#include "google/protobuf/util/message_differencer.h"

namespace muonps {
namespace {

// A value for a message: at most 64 bytes of its JSON.
std::string Short(const nlohmann::json& value) {
  std::string text = value.dump();
  if (text.size() > 64) text = text.substr(0, 61) + "...";
  return text;
}

// A key for a message: at most 64 bytes.
std::string ShortKey(const std::string& key) {
  return key.size() > 64 ? key.substr(0, 61) + "..." : key;
}

}  // namespace

nlohmann::json HfConfig(const v1::ModelConfig& m) {
  nlohmann::json c;
  const bool mla = m.attention() == "mla";
  if (mla) {
    c["architectures"] = {"DeepseekV3ForCausalLM"};
    // The published checkpoints' remote code (modeling_deepseek.py).
    c["auto_map"] = {{"AutoConfig", "configuration_deepseek.DeepseekV3Config"},
                     {"AutoModel", "modeling_deepseek.DeepseekV3Model"},
                     {"AutoModelForCausalLM", "modeling_deepseek.DeepseekV3ForCausalLM"}};
    c["q_lora_rank"] = m.q_lora_rank() > 0 ? nlohmann::json(m.q_lora_rank()) : nlohmann::json();
    c["kv_lora_rank"] = m.kv_lora_rank();
    c["qk_nope_head_dim"] = m.qk_nope_head_dim();
    c["qk_rope_head_dim"] = m.qk_rope_head_dim();
    c["v_head_dim"] = m.v_head_dim();
  } else {
    c["muonps_attention"] = "mha";
  }
  c["model_type"] = m.model_type();
  c["vocab_size"] = m.vocab_size();
  c["hidden_size"] = m.hidden_size();
  c["intermediate_size"] = m.intermediate_size();
  c["moe_intermediate_size"] = m.moe_intermediate_size();
  c["num_hidden_layers"] = m.num_hidden_layers();
  c["num_attention_heads"] = m.num_attention_heads();
  c["num_key_value_heads"] = m.num_attention_heads();
  c["max_position_embeddings"] = m.max_position_embeddings();
  c["rope_theta"] = m.rope_theta();
  c["rms_norm_eps"] = m.rms_norm_eps();
  c["first_k_dense_replace"] = m.first_k_dense_replace();
  c["moe_layer_freq"] = 1;
  c["n_routed_experts"] = m.n_routed_experts();
  c["num_experts_per_tok"] = m.num_experts_per_tok();
  c["n_shared_experts"] = m.n_shared_experts();
  c["scoring_func"] = m.scoring_func();
  c["norm_topk_prob"] = m.norm_topk_prob();
  c["routed_scaling_factor"] = m.routed_scaling_factor();
  // The choice adds e_score_correction_bias (zero unless balancing is
  // aux_free_bias), without expert groups.
  c["topk_method"] = "noaux_tc";
  c["n_group"] = 1;
  c["topk_group"] = 1;
  c["aux_loss_alpha"] = m.aux_loss_alpha();
  // muonps's auxiliary loss is over a slot's tokens, not per sequence.
  c["seq_aux"] = false;
  c["ep_size"] = 1;
  c["hidden_act"] = "silu";
  c["attention_bias"] = false;
  c["attention_dropout"] = 0.0;
  c["initializer_range"] = m.initializer_range();
  c["tie_word_embeddings"] = false;
  c["num_nextn_predict_layers"] = 0;
  c["pretraining_tp"] = 1;
  c["use_cache"] = true;
  c["torch_dtype"] = "float32";  // the safetensors hold F32
  // The transformers release the published remote code was written for.
  c["transformers_version"] = "4.46.3";
  if (m.has_bos_token_id()) c["bos_token_id"] = m.bos_token_id();
  if (m.has_eos_token_id()) c["eos_token_id"] = m.eos_token_id();
  return c;
}

std::string HfConfigJson(const v1::ModelConfig& model) { return HfConfig(model).dump(2) + "\n"; }

absl::Status CheckHfConfig(absl::string_view json, const v1::ModelConfig& model) {
  const nlohmann::json file = nlohmann::json::parse(json, nullptr, /*allow_exceptions=*/false);
  if (file.is_discarded() || !file.is_object()) {
    return absl::InvalidArgumentError("not a JSON object");
  }
  if (file.contains("balancing")) {  // the ModelConfig message of earlier checkpoints
    absl::StatusOr<v1::ModelConfig> config = ParseModelConfigJson(json);
    if (!config.ok()) return config.status();
    if (!google::protobuf::util::MessageDifferencer::Equals(*config, model)) {
      return absl::FailedPreconditionError("the checkpoint's model config differs from the job's");
    }
    return absl::OkStatus();
  }
  const nlohmann::json want = HfConfig(model);
  for (const auto& [key, value] : want.items()) {
    const auto it = file.find(key);
    if (it == file.end()) {
      return absl::FailedPreconditionError(
          absl::StrCat("no \"", key, "\", the job's model has one"));
    }
    // Numbers compare as numbers (50000 and 50000.0 are one value).
    const bool same = (it->is_number() && value.is_number())
                          ? it->get<double>() == value.get<double>()
                          : *it == value;
    if (!same) {
      return absl::FailedPreconditionError(
          absl::StrCat("\"", key, "\" is ", Short(*it), ", the job's model has ", Short(value)));
    }
  }
  for (const auto& [key, value] : file.items()) {
    if (!want.contains(key)) {
      return absl::FailedPreconditionError(
          absl::StrCat("\"", ShortKey(key), "\": the job's model has no such key"));
    }
  }
  return absl::OkStatus();
}

}  // namespace muonps
