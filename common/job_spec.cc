#include "common/job_spec.h"

#include <cmath>
#include <tuple>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/atomic_file.h"
#include "common/status_macros.h"
#include "google/protobuf/util/json_util.h"

namespace muonps {
namespace {

template <typename T>
absl::Status CheckRange(absl::string_view field, T value, T lo, T hi) {
  if (!(value >= lo && value <= hi)) {
    return absl::InvalidArgumentError(
        absl::StrCat(field, ": must be in [", lo, ", ", hi, "], got ", value));
  }
  return absl::OkStatus();
}

absl::Status CheckOneOf(absl::string_view field, const std::string& value,
                        std::initializer_list<absl::string_view> allowed) {
  std::string list;
  for (absl::string_view a : allowed) {
    if (value == a) return absl::OkStatus();
    absl::StrAppend(&list, list.empty() ? "" : ", ", "\"", a, "\"");
  }
  return absl::InvalidArgumentError(
      absl::StrCat(field, ": must be one of ", list, ", got \"", value, "\""));
}

void FillModelDefaults(v1::ModelConfig* m) {
  if (!m->has_vocab_size()) m->set_vocab_size(256);
  if (!m->has_hidden_size()) m->set_hidden_size(128);
  if (!m->has_num_hidden_layers()) m->set_num_hidden_layers(4);
  if (!m->has_num_attention_heads()) m->set_num_attention_heads(4);
  if (!m->has_max_position_embeddings()) m->set_max_position_embeddings(256);
  if (!m->has_rope_theta()) m->set_rope_theta(10000.0);
  if (!m->has_rms_norm_eps()) m->set_rms_norm_eps(1e-6);
  if (!m->has_first_k_dense_replace()) m->set_first_k_dense_replace(1);
  if (!m->has_intermediate_size()) m->set_intermediate_size(512);
  if (!m->has_n_routed_experts()) m->set_n_routed_experts(8);
  if (!m->has_num_experts_per_tok()) m->set_num_experts_per_tok(2);
  if (!m->has_n_shared_experts()) m->set_n_shared_experts(1);
  if (!m->has_moe_intermediate_size()) m->set_moe_intermediate_size(128);
  if (!m->has_scoring_func()) m->set_scoring_func("sigmoid");
  if (!m->has_norm_topk_prob()) m->set_norm_topk_prob(true);
  if (!m->has_routed_scaling_factor()) m->set_routed_scaling_factor(1.0);
  if (!m->has_balancing()) m->set_balancing("aux_free_bias");
  if (!m->has_bias_update_rate()) m->set_bias_update_rate(1e-3);
  if (!m->has_aux_loss_alpha()) m->set_aux_loss_alpha(1e-3);
  if (!m->has_initializer_range()) m->set_initializer_range(0.02);
  if (!m->has_model_type()) m->set_model_type("deepseek_v3");
  if (!m->has_attention()) m->set_attention("mha");
  if (m->attention() == "mla" && m->num_attention_heads() > 0) {
    // Moonlight-16B-A3B's ratios: r = 4 D, nope = v = D, rope = D / 2.
    const int D = m->hidden_size() / m->num_attention_heads();
    if (!m->has_q_lora_rank()) m->set_q_lora_rank(0);
    if (!m->has_kv_lora_rank()) m->set_kv_lora_rank(4 * D);
    if (!m->has_qk_nope_head_dim()) m->set_qk_nope_head_dim(D);
    if (!m->has_qk_rope_head_dim()) m->set_qk_rope_head_dim(D / 2);
    if (!m->has_v_head_dim()) m->set_v_head_dim(D);
  }
}

absl::Status ParseJson(absl::string_view json, google::protobuf::Message* message) {
  google::protobuf::util::JsonParseOptions options;
  options.ignore_unknown_fields = false;
  const auto status = google::protobuf::util::JsonStringToMessage(
      google::protobuf::StringPiece(json.data(), json.size()), message, options);
  if (!status.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("invalid ", message->GetDescriptor()->name(),
                                                   " JSON: ", std::string(status.message())));
  }
  return absl::OkStatus();
}

}  // namespace

v1::JobSpec DefaultJobSpec() {
  v1::JobSpec job;
  FillJobDefaults(&job);
  return job;
}

absl::StatusOr<v1::JobSpec> PresetJobSpec(absl::string_view name) {
  v1::JobSpec job;
  if (name == "small") {
    // 8 layers of width 512, the first dense, the others 32 routed experts
    // (4 per token) and a shared one: 57 M parameters, 19 M of them in the
    // products of each token.
    job.set_name("small");
    v1::ModelConfig* m = job.mutable_model();
    m->set_hidden_size(512);
    m->set_num_hidden_layers(8);
    m->set_num_attention_heads(8);
    m->set_intermediate_size(2048);
    m->set_n_routed_experts(32);
    m->set_num_experts_per_tok(4);
    m->set_n_shared_experts(1);
    m->set_moe_intermediate_size(128);
  } else if (name == "moonlight-16b-a3b") {
    // Every value from the published config.json of moonshotai/Moonlight-16B-A3B,
    // https://huggingface.co/moonshotai/Moonlight-16B-A3B/blob/main/config.json
    // (DeepseekV3ForCausalLM; a copy is tests/data/moonlight_16b_a3b_config.json).
    // 15.96 B parameters, 15.29 B without the embedding and the head (the
    // Moonlight paper's total); 2.24 B of them in each token's products.
    // It validates and plans here; training it needs GPUs.
    job.set_name("moonlight-16b-a3b");
    v1::ModelConfig* m = job.mutable_model();
    m->set_vocab_size(163840);
    m->set_hidden_size(2048);
    m->set_num_hidden_layers(27);
    m->set_num_attention_heads(16);
    m->set_max_position_embeddings(8192);
    m->set_rope_theta(50000.0);
    m->set_rms_norm_eps(1e-5);
    m->set_first_k_dense_replace(1);
    m->set_intermediate_size(11264);
    m->set_n_routed_experts(64);
    m->set_num_experts_per_tok(6);
    m->set_n_shared_experts(2);
    m->set_moe_intermediate_size(1408);
    m->set_scoring_func("sigmoid");
    m->set_norm_topk_prob(true);
    m->set_routed_scaling_factor(2.446);
    m->set_balancing("aux_free_bias");  // topk_method "noaux_tc"
    m->set_aux_loss_alpha(0.001);
    m->set_initializer_range(0.02);
    m->set_attention("mla");
    m->set_q_lora_rank(0);  // null
    m->set_kv_lora_rank(512);
    m->set_qk_nope_head_dim(128);
    m->set_qk_rope_head_dim(64);
    m->set_v_head_dim(128);
    m->set_bos_token_id(163584);
    m->set_eos_token_id(163586);
    // The batch is not part of config.json: 512 slots of one 8192-token
    // sequence (4.2 M tokens per step) give every worker of a 512-worker
    // cluster a slot.
    job.mutable_batch()->set_slots(512);
    job.mutable_batch()->set_micro_batch(1);
  } else if (name == "moonlight-tiny") {
    // Moonlight-16B-A3B's shapes scaled down for a CPU: width and FFN widths
    // divided by 16, the attention's ratios kept (MLA without query
    // compression, r = 4 D, nope = v = D, rope = D / 2), one dense layer, then
    // MoE layers with 16 routed experts (4 chosen), 2 shared experts and
    // sigmoid scores scaled by 2.446.
    job.set_name("moonlight-tiny");
    v1::ModelConfig* m = job.mutable_model();
    m->set_hidden_size(128);
    m->set_num_hidden_layers(4);
    m->set_num_attention_heads(4);
    m->set_rms_norm_eps(1e-5);
    m->set_rope_theta(50000.0);
    m->set_first_k_dense_replace(1);
    m->set_intermediate_size(704);  // 11264 / 16
    m->set_n_routed_experts(16);
    m->set_num_experts_per_tok(4);
    m->set_n_shared_experts(2);
    m->set_moe_intermediate_size(88);  // 1408 / 16
    m->set_routed_scaling_factor(2.446);
    m->set_attention("mla");
    m->set_q_lora_rank(0);
    m->set_kv_lora_rank(128);
    m->set_qk_nope_head_dim(32);
    m->set_qk_rope_head_dim(16);
    m->set_v_head_dim(32);
  } else if (name != "default") {
    return absl::NotFoundError(absl::StrCat("preset: no preset named \"", name,
                                            "\" (default, small, moonlight-tiny, "
                                            "moonlight-16b-a3b)"));
  }
  FillJobDefaults(&job);
  return job;
}

void FillJobDefaults(v1::JobSpec* job) {
  if (!job->has_name()) job->set_name("muonps");
  if (!job->has_seed()) job->set_seed(1234);
  FillModelDefaults(job->mutable_model());

  v1::OptimizerConfig* o = job->mutable_optimizer();
  if (!o->has_name()) o->set_name("muon");
  if (!o->has_lr()) o->set_lr(o->name() == "adamw" ? 3e-3 : 2e-2);
  if (!o->has_weight_decay()) o->set_weight_decay(0.1);
  if (!o->has_momentum()) o->set_momentum(0.95);
  if (!o->has_nesterov()) o->set_nesterov(true);
  if (!o->has_ns_steps()) o->set_ns_steps(5);
  if (!o->has_scale_rule()) o->set_scale_rule("match_rms_adamw");
  if (!o->has_adam_beta1()) o->set_adam_beta1(0.9);
  if (!o->has_adam_beta2()) o->set_adam_beta2(0.95);
  if (!o->has_adam_eps()) o->set_adam_eps(1e-8);
  if (!o->has_max_grad_norm()) o->set_max_grad_norm(1.0);
  if (!o->has_qk_clip_tau()) o->set_qk_clip_tau(0.0);

  v1::ScheduleConfig* s = job->mutable_schedule();
  if (!s->has_total_steps()) s->set_total_steps(200);
  if (!s->has_warmup_steps()) s->set_warmup_steps(20);
  if (!s->has_min_lr_ratio()) s->set_min_lr_ratio(0.1);

  v1::DataConfig* d = job->mutable_data();
  if (!d->has_path()) d->set_path("/usr/share/games/fortunes");
  if (!d->has_format()) d->set_format("auto");
  if (!d->has_sampling()) d->set_sampling("sequential");
  if (!d->has_val_fraction()) d->set_val_fraction(0.05);
  if (!d->has_eval_every()) d->set_eval_every(50);
  if (!d->has_eval_windows()) d->set_eval_windows(32);

  v1::BatchConfig* b = job->mutable_batch();
  if (!b->has_slots()) b->set_slots(4);
  if (!b->has_micro_batch()) b->set_micro_batch(2);

  v1::CheckpointConfig* c = job->mutable_checkpoint();
  if (!c->has_dir()) c->set_dir("");
  if (!c->has_every_steps()) c->set_every_steps(0);
  if (!c->has_keep_last()) c->set_keep_last(0);
  if (!c->has_background()) c->set_background(true);

  v1::RecoveryConfig* r = job->mutable_recovery();
  if (!r->has_replicas()) r->set_replicas(1);

  v1::TransferConfig* x = job->mutable_transfer();
  if (!x->has_dtype()) x->set_dtype("f32");
}

absl::Status ValidateModelConfig(const v1::ModelConfig& m, absl::string_view p) {
  auto f = [&](absl::string_view name) { return absl::StrCat(p, name); };
  MUONPS_RETURN_IF_ERROR(CheckRange(f("vocab_size"), m.vocab_size(), 2, 1 << 20));
  MUONPS_RETURN_IF_ERROR(CheckRange(f("hidden_size"), m.hidden_size(), 2, 1 << 16));
  MUONPS_RETURN_IF_ERROR(CheckRange(f("num_hidden_layers"), m.num_hidden_layers(), 1, 1024));
  MUONPS_RETURN_IF_ERROR(
      CheckRange(f("num_attention_heads"), m.num_attention_heads(), 1, m.hidden_size()));
  if (m.hidden_size() % m.num_attention_heads() != 0 ||
      (m.hidden_size() / m.num_attention_heads()) % 2 != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: hidden_size %d must be num_attention_heads (%d) times an even head dimension",
        f("num_attention_heads"), m.hidden_size(), m.num_attention_heads()));
  }
  MUONPS_RETURN_IF_ERROR(
      CheckRange(f("max_position_embeddings"), m.max_position_embeddings(), 1, 1 << 16));
  MUONPS_RETURN_IF_ERROR(CheckRange(f("rope_theta"), m.rope_theta(), 1.0, 1e12));
  MUONPS_RETURN_IF_ERROR(CheckRange(f("rms_norm_eps"), m.rms_norm_eps(), 1e-12, 1.0));
  MUONPS_RETURN_IF_ERROR(
      CheckRange(f("first_k_dense_replace"), m.first_k_dense_replace(), 0, m.num_hidden_layers()));
  MUONPS_RETURN_IF_ERROR(CheckRange(f("intermediate_size"), m.intermediate_size(), 1, 1 << 20));
  MUONPS_RETURN_IF_ERROR(CheckRange(f("n_routed_experts"), m.n_routed_experts(), 1, 4096));
  MUONPS_RETURN_IF_ERROR(
      CheckRange(f("num_experts_per_tok"), m.num_experts_per_tok(), 1, m.n_routed_experts()));
  MUONPS_RETURN_IF_ERROR(CheckRange(f("n_shared_experts"), m.n_shared_experts(), 0, 64));
  MUONPS_RETURN_IF_ERROR(
      CheckRange(f("moe_intermediate_size"), m.moe_intermediate_size(), 1, 1 << 20));
  MUONPS_RETURN_IF_ERROR(CheckOneOf(f("scoring_func"), m.scoring_func(), {"sigmoid", "softmax"}));
  MUONPS_RETURN_IF_ERROR(
      CheckRange(f("routed_scaling_factor"), m.routed_scaling_factor(), 1e-6, 1e6));
  MUONPS_RETURN_IF_ERROR(CheckOneOf(f("balancing"), m.balancing(), {"aux_free_bias", "aux_loss"}));
  MUONPS_RETURN_IF_ERROR(CheckRange(f("bias_update_rate"), m.bias_update_rate(), 0.0, 1.0));
  MUONPS_RETURN_IF_ERROR(CheckRange(f("aux_loss_alpha"), m.aux_loss_alpha(), 0.0, 1e3));
  MUONPS_RETURN_IF_ERROR(CheckRange(f("initializer_range"), m.initializer_range(), 0.0, 10.0));
  for (const auto& [name, set, id] :
       {std::tuple<const char*, bool, int>{"bos_token_id", m.has_bos_token_id(), m.bos_token_id()},
        {"eos_token_id", m.has_eos_token_id(), m.eos_token_id()}}) {
    if (set) MUONPS_RETURN_IF_ERROR(CheckRange(f(name), id, 0, m.vocab_size() - 1));
  }
  MUONPS_RETURN_IF_ERROR(CheckOneOf(f("attention"), m.attention(), {"mha", "mla"}));
  if (m.attention() == "mha") {
    for (const auto& [name, set] :
         {std::pair<const char*, bool>{"q_lora_rank", m.has_q_lora_rank()},
          {"kv_lora_rank", m.has_kv_lora_rank()},
          {"qk_nope_head_dim", m.has_qk_nope_head_dim()},
          {"qk_rope_head_dim", m.has_qk_rope_head_dim()},
          {"v_head_dim", m.has_v_head_dim()}}) {
      if (set) {
        return absl::InvalidArgumentError(absl::StrCat(f(name), ": only with attention = \"mla\""));
      }
    }
    return absl::OkStatus();
  }
  MUONPS_RETURN_IF_ERROR(CheckRange(f("q_lora_rank"), m.q_lora_rank(), 0, 1 << 16));
  MUONPS_RETURN_IF_ERROR(CheckRange(f("kv_lora_rank"), m.kv_lora_rank(), 1, 1 << 16));
  MUONPS_RETURN_IF_ERROR(CheckRange(f("qk_nope_head_dim"), m.qk_nope_head_dim(), 0, 1 << 12));
  MUONPS_RETURN_IF_ERROR(CheckRange(f("qk_rope_head_dim"), m.qk_rope_head_dim(), 2, 1 << 12));
  if (m.qk_rope_head_dim() % 2 != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat(f("qk_rope_head_dim"), ": must be even, got ", m.qk_rope_head_dim()));
  }
  MUONPS_RETURN_IF_ERROR(CheckRange(f("v_head_dim"), m.v_head_dim(), 1, 1 << 12));
  return absl::OkStatus();
}

absl::Status ValidateJobSpec(const v1::JobSpec& job) {
  // Strings a caller chooses are bounded: they are kept, listed and logged.
  if (job.name().size() > 128) {
    return absl::InvalidArgumentError("name: longer than 128 bytes");
  }
  if (job.data().path().size() > 4096) {
    return absl::InvalidArgumentError("data.path: longer than 4096 bytes");
  }
  if (job.checkpoint().dir().size() > 4096) {
    return absl::InvalidArgumentError("checkpoint.dir: longer than 4096 bytes");
  }
  MUONPS_RETURN_IF_ERROR(ValidateModelConfig(job.model()));
  const v1::OptimizerConfig& o = job.optimizer();
  MUONPS_RETURN_IF_ERROR(CheckOneOf("optimizer.name", o.name(), {"muon", "adamw"}));
  MUONPS_RETURN_IF_ERROR(CheckRange("optimizer.lr", o.lr(), 0.0, 10.0));
  MUONPS_RETURN_IF_ERROR(CheckRange("optimizer.weight_decay", o.weight_decay(), 0.0, 10.0));
  MUONPS_RETURN_IF_ERROR(CheckRange("optimizer.momentum", o.momentum(), 0.0, 0.9999));
  MUONPS_RETURN_IF_ERROR(CheckRange("optimizer.ns_steps", o.ns_steps(), 1, 100));
  MUONPS_RETURN_IF_ERROR(
      CheckOneOf("optimizer.scale_rule", o.scale_rule(), {"match_rms_adamw", "original"}));
  MUONPS_RETURN_IF_ERROR(CheckRange("optimizer.adam_beta1", o.adam_beta1(), 0.0, 0.9999));
  MUONPS_RETURN_IF_ERROR(CheckRange("optimizer.adam_beta2", o.adam_beta2(), 0.0, 0.99999));
  MUONPS_RETURN_IF_ERROR(CheckRange("optimizer.adam_eps", o.adam_eps(), 1e-30, 1.0));
  MUONPS_RETURN_IF_ERROR(CheckRange("optimizer.max_grad_norm", o.max_grad_norm(), 0.0, 1e9));
  MUONPS_RETURN_IF_ERROR(CheckRange("optimizer.qk_clip_tau", o.qk_clip_tau(), 0.0, 1e6));

  const v1::ScheduleConfig& s = job.schedule();
  MUONPS_RETURN_IF_ERROR(CheckRange("schedule.total_steps", s.total_steps(), 1, 100000000));
  MUONPS_RETURN_IF_ERROR(CheckRange("schedule.warmup_steps", s.warmup_steps(), 0, s.total_steps()));
  MUONPS_RETURN_IF_ERROR(CheckRange("schedule.min_lr_ratio", s.min_lr_ratio(), 0.0, 1.0));

  const v1::DataConfig& d = job.data();
  if (d.path().empty()) return absl::InvalidArgumentError("data.path: must not be empty");
  MUONPS_RETURN_IF_ERROR(CheckOneOf("data.format", d.format(), {"auto", "text", "bin"}));
  MUONPS_RETURN_IF_ERROR(CheckOneOf("data.sampling", d.sampling(), {"sequential", "random"}));
  MUONPS_RETURN_IF_ERROR(CheckRange("data.val_fraction", d.val_fraction(), 0.0, 0.5));
  MUONPS_RETURN_IF_ERROR(CheckRange("data.eval_every", d.eval_every(), 0, 100000000));
  MUONPS_RETURN_IF_ERROR(CheckRange("data.eval_windows", d.eval_windows(), 1, 1000000));

  const v1::BatchConfig& b = job.batch();
  MUONPS_RETURN_IF_ERROR(CheckRange("batch.slots", b.slots(), 1, 65536));
  MUONPS_RETURN_IF_ERROR(CheckRange("batch.micro_batch", b.micro_batch(), 1, 65536));

  const v1::CheckpointConfig& c = job.checkpoint();
  MUONPS_RETURN_IF_ERROR(CheckRange("checkpoint.every_steps", c.every_steps(), 0, 100000000));
  MUONPS_RETURN_IF_ERROR(CheckRange("checkpoint.keep_last", c.keep_last(), 0, 1000000));

  const v1::RecoveryConfig& r = job.recovery();
  MUONPS_RETURN_IF_ERROR(CheckRange("recovery.replicas", r.replicas(), 1, kMaxReplicas));
  if (r.replicas() > 1 && c.dir().empty()) {
    return absl::InvalidArgumentError(
        "recovery.replicas: more than 1 needs checkpoint.dir (the survivors of a lost shard "
        "hand its tensors over through a checkpoint)");
  }
  MUONPS_RETURN_IF_ERROR(CheckOneOf("transfer.dtype", job.transfer().dtype(), {"f32", "bf16"}));
  return absl::OkStatus();
}

TransferDtype TransferDtypeOf(const v1::JobSpec& job) {
  return job.transfer().dtype() == "bf16" ? TransferDtype::kBF16 : TransferDtype::kF32;
}

absl::StatusOr<v1::JobSpec> ParseJobSpecJson(absl::string_view json) {
  v1::JobSpec job;
  MUONPS_RETURN_IF_ERROR(ParseJson(json, &job));
  FillJobDefaults(&job);
  MUONPS_RETURN_IF_ERROR(ValidateJobSpec(job));
  return job;
}

absl::StatusOr<v1::JobSpec> LoadJobSpecFile(const std::string& path) {
  absl::StatusOr<std::string> text = ReadFileToString(path);
  if (!text.ok()) return text.status();
  absl::StatusOr<v1::JobSpec> job = ParseJobSpecJson(*text);
  if (!job.ok()) {
    return absl::Status(job.status().code(), absl::StrCat(path, ": ", job.status().message()));
  }
  return job;
}

absl::StatusOr<v1::ModelConfig> ParseModelConfigJson(absl::string_view json) {
  v1::ModelConfig model;
  MUONPS_RETURN_IF_ERROR(ParseJson(json, &model));
  FillModelDefaults(&model);
  MUONPS_RETURN_IF_ERROR(ValidateModelConfig(model, ""));
  return model;
}

std::string ToJson(const google::protobuf::Message& message) {
  google::protobuf::util::JsonPrintOptions options;
  options.add_whitespace = true;
  options.preserve_proto_field_names = true;
  options.always_print_primitive_fields = true;
  std::string out;
  (void)google::protobuf::util::MessageToJsonString(message, &out, options);
  return out;
}

}  // namespace muonps
