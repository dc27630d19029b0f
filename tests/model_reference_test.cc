// The whole model (MoeModel::ForwardBackward, float32) against an independent
// PyTorch implementation in float64 (tests/reference/moe_reference.py).
//
// For each configuration the test draws random parameters (initializer_range
// 0.3 so that activations and router scores spread out, RMSNorm gains
// 1 + 0.2 N(0,1), a nonzero e_score_correction_bias that changes some choices),
// random tokens, and writes everything to a safetensors file; the script
// returns the loss, every trainable tensor's gradient and the per-expert loads.
// Token ids travel as F32 values (exact for ids < 2^24) because muonps's
// writer only writes F32; the script converts them back to integers.
//
// Tolerances:
//   objective loss_scale * sum CE + aux_scale * sum aux, relative 1e-5
//   sum CE and sum aux separately, relative 1e-5
//   expert loads per MoE layer, exact
//   every gradient tensor, ||ours - ref|| / ||ref|| <= 1e-4
// Float32 arithmetic over this model leaves relative errors around 1e-6, so the
// bounds sit far above the noise, while a wrong sign, a missing term or a
// scaled gradient shows up as an error of order 1e-2 or more (the aux term's
// share of the router gradient is checked to exceed 1e-2 for that reason).
//
// When /usr/bin/python3 cannot import torch and numpy the tests are skipped.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <ostream>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "common/model_layout.h"
#include "common/safetensors.h"
#include "model/moe_model.h"
#include "tests/model_test_util.h"

namespace muonps {
namespace {

using testing_util::RandomParams;
using testing_util::RandomTokens;

constexpr char kPython[] = "/usr/bin/python3";
constexpr double kLossRtol = 1e-5;
constexpr double kGradRtol = 1e-4;
constexpr int kBatch = 2;
constexpr float kAuxScale = 0.05f;

std::string ReferenceScript() {
  return std::string(MUONPS_TEST_DATA_DIR) + "/../reference/moe_reference.py";
}

// Whether the reference can run at all (checked once).
bool TorchAvailable() {
  static const bool available =
      std::system(absl::StrCat(kPython, " -c 'import torch, numpy' >/dev/null 2>&1").c_str()) == 0;
  return available;
}

struct RefCase {
  std::string name;
  std::string scoring;
  std::string balancing;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  int first_k_dense_replace = 1;
  int n_shared_experts = 1;
  int num_experts_per_tok = 2;
  // "mla" with distinct nope, rope and value widths; q_lora_rank > 0 adds
  // the query compression.
  std::string attention = "mha";
  int q_lora_rank = 0;
};

v1::ModelConfig TinyConfig(const RefCase& c) {
  testing_util::TinyModelShape shape;
  shape.vocab_size = 32;
  shape.max_position_embeddings = 8;
  shape.intermediate_size = 24;
  shape.first_k_dense_replace = c.first_k_dense_replace;
  shape.num_experts_per_tok = c.num_experts_per_tok;
  shape.n_shared_experts = c.n_shared_experts;
  const v1::ModelConfig m = testing_util::TinyModelConfig(c.scoring, c.balancing, c.norm_topk_prob,
                                                          c.routed_scaling_factor, shape);
  return c.attention == "mla" ? testing_util::WithTinyMla(m, c.q_lora_rank) : m;
}

double Norm(const float* x, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) s += static_cast<double>(x[i]) * x[i];
  return std::sqrt(s);
}

double DiffNorm(const float* a, const float* b, int64_t n) {
  double s = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    const double d = static_cast<double>(a[i]) - b[i];
    s += d * d;
  }
  return std::sqrt(s);
}

void PrintTo(const RefCase& c, std::ostream* os) { *os << c.name; }

class ModelReferenceTest : public testing::TestWithParam<RefCase> {};

TEST_P(ModelReferenceTest, MatchesPyTorchFloat64) {
  if (!TorchAvailable()) {
    GTEST_SKIP() << kPython << " cannot import torch and numpy (install python3-torch and "
                 << "python3-numpy); the PyTorch reference comparison is skipped";
  }
  const RefCase& c = GetParam();
  const v1::ModelConfig config = TinyConfig(c);
  ASSERT_TRUE(ValidateModelConfig(config).ok()) << ValidateModelConfig(config);
  MoeModel model(config);
  const ModelLayout& layout = model.layout();
  const int T = model.seq_len(), N = kBatch * T;
  const std::vector<float> params = RandomParams(layout, 7);
  std::vector<int32_t> inputs, targets;
  RandomTokens(&inputs, &targets, N, config.vocab_size(), 11);
  const float loss_scale = 1.0f / static_cast<float>(N);

  std::vector<float> grads(layout.total_floats(), 0.0f);
  const SlotStats stats = model.ForwardBackward(params.data(), inputs.data(), targets.data(),
                                                kBatch, loss_scale, kAuxScale, grads.data());
  const double ours_loss = static_cast<double>(loss_scale) * stats.loss_sum +
                           static_cast<double>(kAuxScale) * stats.aux_sum;

  // The bias must matter for the choices under aux_free_bias (and be ignored
  // otherwise, which the reference checks by ignoring it too).
  if (c.balancing == "aux_free_bias") {
    std::vector<float> unbiased = params;
    for (int index : model.bias_tensors()) {
      const TensorInfo& t = layout.tensors()[index];
      std::fill(unbiased.begin() + t.offset, unbiased.begin() + t.offset + t.numel, 0.0f);
    }
    MoeModel plain(config);
    const SlotStats s = plain.Forward(unbiased.data(), inputs.data(), targets.data(), kBatch);
    EXPECT_NE(s.loss_sum, stats.loss_sum)
        << "the router bias changed no choice; pick larger biases";
  }

  // Write the reference's input.
  const std::string dir = testing::TempDir();
  const std::string in_path = absl::StrCat(dir, "/moe_ref_in_", c.name, ".safetensors");
  const std::string out_path = absl::StrCat(dir, "/moe_ref_out_", c.name, ".safetensors");
  const std::string err_path = absl::StrCat(dir, "/moe_ref_err_", c.name, ".txt");
  std::vector<float> inputs_f(inputs.begin(), inputs.end());
  std::vector<float> targets_f(targets.begin(), targets.end());
  std::vector<TensorRef> refs;
  for (const TensorInfo& t : layout.tensors()) {
    refs.push_back({t.name, t.shape, params.data() + t.offset});
  }
  refs.push_back({"inputs", {kBatch, T}, inputs_f.data()});
  refs.push_back({"targets", {kBatch, T}, targets_f.data()});
  const std::map<std::string, std::string> metadata = {
      {"config", ToJson(config)},
      {"loss_scale", absl::StrCat(static_cast<double>(loss_scale))},
      {"aux_scale", absl::StrCat(static_cast<double>(kAuxScale))},
  };
  ASSERT_TRUE(WriteSafetensors(in_path, refs, metadata).ok());
  std::remove(out_path.c_str());

  const std::string command = absl::StrCat(kPython, " ", ReferenceScript(), " grad ", in_path, " ",
                                           out_path, " 2>", err_path);
  const int rc = std::system(command.c_str());
  if (rc != 0) {
    std::string err;
    if (FILE* f = std::fopen(err_path.c_str(), "r")) {
      char buf[4096];
      size_t got;
      while ((got = std::fread(buf, 1, sizeof(buf), f)) > 0) err.append(buf, got);
      std::fclose(f);
    }
    FAIL() << "reference failed (" << rc << "): " << command << "\n" << err;
  }
  absl::StatusOr<SafetensorsFile> ref = SafetensorsFile::Open(out_path);
  ASSERT_TRUE(ref.ok()) << ref.status();

  // Loss: the exact double from the metadata, and its two parts.
  ASSERT_EQ(ref->metadata().count("loss"), 1u);
  const double ref_loss = std::stod(ref->metadata().at("loss"));
  EXPECT_LE(std::abs(ours_loss - ref_loss), kLossRtol * std::abs(ref_loss))
      << "loss ours " << ours_loss << " reference " << ref_loss;
  float ref_ce = 0.0f, ref_aux = 0.0f;
  ASSERT_TRUE(ref->ReadInto("loss_sum", {1}, &ref_ce).ok());
  ASSERT_TRUE(ref->ReadInto("aux_sum", {1}, &ref_aux).ok());
  EXPECT_LE(std::abs(stats.loss_sum - ref_ce), kLossRtol * std::abs(ref_ce));
  if (c.balancing == "aux_loss") {
    EXPECT_GT(ref_aux, 0.1f);
    EXPECT_LE(std::abs(stats.aux_sum - ref_aux), kLossRtol * std::abs(ref_aux));
  } else {
    EXPECT_EQ(stats.aux_sum, 0.0);
    EXPECT_EQ(ref_aux, 0.0f);
  }

  // Routing: the same experts chose the same number of tokens.
  const int E = config.n_routed_experts();
  ASSERT_EQ(stats.expert_load.size(),
            static_cast<size_t>(config.num_hidden_layers() - config.first_k_dense_replace()));
  for (size_t i = 0; i < stats.expert_load.size(); ++i) {
    const int layer = config.first_k_dense_replace() + static_cast<int>(i);
    std::vector<float> load(E);
    ASSERT_TRUE(ref->ReadInto(absl::StrCat("load.", layer), {E}, load.data()).ok());
    for (int e = 0; e < E; ++e) {
      EXPECT_EQ(stats.expert_load[i][e], static_cast<int64_t>(load[e]))
          << "layer " << layer << " expert " << e;
    }
  }

  // Experts that no token chose get no gradient, in either implementation.
  std::vector<std::string> idle_experts;
  for (size_t i = 0; i < stats.expert_load.size(); ++i) {
    for (int e = 0; e < E; ++e) {
      if (stats.expert_load[i][e] != 0) continue;
      idle_experts.push_back(absl::StrCat("model.layers.", config.first_k_dense_replace() + i,
                                          ".mlp.experts.", e, "."));
    }
  }
  auto idle = [&](const std::string& name) {
    for (const std::string& prefix : idle_experts) {
      if (name.rfind(prefix, 0) == 0) return true;
    }
    return false;
  };

  // Gradients, tensor by tensor.
  int compared = 0;
  double worst = 0.0;
  for (const TensorInfo& t : layout.tensors()) {
    const float* ours = grads.data() + t.offset;
    if (!t.trainable()) {
      EXPECT_EQ(Norm(ours, t.numel), 0.0) << t.name << ": a buffer got a gradient";
      EXPECT_FALSE(ref->contains("grad." + t.name));
      continue;
    }
    std::vector<float> expect(t.numel);
    const absl::Status read = ref->ReadInto("grad." + t.name, t.shape, expect.data());
    ASSERT_TRUE(read.ok()) << read;
    const double ref_norm = Norm(expect.data(), t.numel);
    if (idle(t.name)) {
      EXPECT_EQ(ref_norm, 0.0) << t.name;
      EXPECT_EQ(Norm(ours, t.numel), 0.0) << t.name << ": an idle expert got a gradient";
      continue;
    }
    ASSERT_GT(ref_norm, 0.0) << t.name << ": zero reference gradient, the check is empty";
    const double rel = DiffNorm(ours, expect.data(), t.numel) / ref_norm;
    EXPECT_LE(rel, kGradRtol) << t.name << ": ||ours - ref|| / ||ref|| = " << rel
                              << " (||ref|| = " << ref_norm << ")";
    worst = std::max(worst, rel);
    ++compared;
  }
  EXPECT_GT(compared, 0);
  std::printf(
      "%s: %d gradient tensors, max ||ours - ref|| / ||ref|| = %.3g (bound %.0e); "
      "loss %.9g vs %.9g\n",
      c.name.c_str(), compared, worst, kGradRtol, ours_loss, ref_loss);

  // The aux term must carry weight in the router gradient, or its check is empty.
  if (c.balancing == "aux_loss") {
    std::vector<float> no_aux(layout.total_floats(), 0.0f);
    MoeModel again(config);
    again.ForwardBackward(params.data(), inputs.data(), targets.data(), kBatch, loss_scale, 0.0f,
                          no_aux.data());
    for (const TensorInfo& t : layout.tensors()) {
      if (t.name.find("mlp.gate.weight") == std::string::npos) continue;
      const double share = DiffNorm(grads.data() + t.offset, no_aux.data() + t.offset, t.numel) /
                           Norm(grads.data() + t.offset, t.numel);
      EXPECT_GT(share, 1e-2) << t.name << ": the aux term barely moves the router gradient";
    }
  }
  std::remove(in_path.c_str());
  std::remove(out_path.c_str());
  std::remove(err_path.c_str());
}

INSTANTIATE_TEST_SUITE_P(
    ScoringAndBalancing, ModelReferenceTest,
    testing::Values(RefCase{"sigmoid_aux_free_bias", "sigmoid", "aux_free_bias"},
                    RefCase{"sigmoid_aux_loss", "sigmoid", "aux_loss"},
                    RefCase{"softmax_aux_free_bias", "softmax", "aux_free_bias"},
                    RefCase{"softmax_aux_loss", "softmax", "aux_loss"},
                    // Unnormalised weights with a scale, as in DeepSeek-V3.
                    RefCase{"sigmoid_unnormalized_scaled", "sigmoid", "aux_free_bias",
                            /*norm_topk_prob=*/false, /*routed_scaling_factor=*/2.5},
                    // With softmax, normalising the chosen scores cancels the
                    // softmax normaliser; without it the full Jacobian is used.
                    RefCase{"softmax_unnormalized_scaled", "softmax", "aux_free_bias",
                            /*norm_topk_prob=*/false, /*routed_scaling_factor=*/2.5},
                    // Every layer MoE, no shared expert, one expert per token.
                    RefCase{"softmax_all_moe_k1_unshared", "softmax", "aux_loss",
                            /*norm_topk_prob=*/false, /*routed_scaling_factor=*/1.0,
                            /*first_k_dense_replace=*/0, /*n_shared_experts=*/0,
                            /*num_experts_per_tok=*/1},
                    // Multi-head Latent Attention, without and with query compression.
                    RefCase{"mla_sigmoid_scaled", "sigmoid", "aux_free_bias", true, 2.446, 1, 1, 2,
                            "mla"},
                    RefCase{"mla_q_lora_softmax_aux_loss", "softmax", "aux_loss", true, 1.0, 1, 1,
                            2, "mla", /*q_lora_rank=*/5}),
    [](const testing::TestParamInfo<RefCase>& info) { return info.param.name; });

}  // namespace
}  // namespace muonps
