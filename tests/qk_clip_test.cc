// QK-Clip (Kimi K2's MuonClip, step/step.h): the per-head maxima, the
// rescaling on hand-computed cases for MHA and MLA, its effect on the
// model's logits (they come out at tau exactly), and the refusals.
#include <gtest/gtest.h>

#include <cmath>
#include <limits>
#include <vector>

#include "common/job_spec.h"
#include "common/model_layout.h"
#include "model/moe_model.h"
#include "step/step.h"
#include "tests/model_test_util.h"
#include "tests/test_util.h"
#include "tests/trainer_test_util.h"

namespace muonps {
namespace {

using testing_util::RandomParams;
using testing_util::RandomTokens;
using testing_util::TinyModelConfig;

v1::ModelConfig Mha() {
  v1::ModelConfig m = TinyModelConfig("sigmoid", "aux_free_bias");  // C 16, H 2, 3 layers
  return m;
}

v1::ModelConfig Mla() {
  v1::ModelConfig m = Mha();
  m.set_attention("mla");
  m.set_q_lora_rank(0);
  m.set_kv_lora_rank(6);
  m.set_qk_nope_head_dim(4);
  m.set_qk_rope_head_dim(2);
  m.set_v_head_dim(3);
  return m;
}

// Layer 1, head 0 at 8 and head 1 at 2; every other head at 1.
AttentionLogits Logits(const v1::ModelConfig& m) {
  AttentionLogits logits(m);
  std::vector<std::vector<float>> slot(m.num_hidden_layers(), std::vector<float>(2, 1.0f));
  slot[1] = {8.0f, 2.0f};
  EXPECT_TRUE(logits.Add(slot).ok());
  return logits;
}

// Values 1, 2, 3, ... so that every scaled row is visible.
std::vector<float> Counting(const TensorInfo& t) {
  std::vector<float> v(t.numel);
  for (int64_t i = 0; i < t.numel; ++i) v[i] = static_cast<float>(i + 1);
  return v;
}

TEST(QkClipTest, MhaScalesTheHeadsQueryAndKeyRowsBySqrtGamma) {
  const v1::ModelConfig m = Mha();
  const ModelLayout layout(m);
  const AttentionLogits logits = Logits(m);
  const double tau = 4.0;  // head 0 of layer 1: gamma = 4 / 8
  const float root = static_cast<float>(std::sqrt(0.5));
  const int D = 8, C = 16;
  for (const char* proj : {"q_proj", "k_proj", "v_proj", "o_proj"}) {
    const TensorInfo& t = *layout.Find(absl::StrCat("model.layers.1.self_attn.", proj, ".weight"));
    std::vector<float> v = Counting(t);
    const int clipped = ApplyQkClip(t, m, tau, logits, v.data());
    const bool qk = std::string(proj) == "q_proj" || std::string(proj) == "k_proj";
    EXPECT_EQ(clipped, qk ? 1 : 0) << proj;
    for (int r = 0; r < C; ++r) {
      for (int c = 0; c < C; ++c) {
        const float was = static_cast<float>(r * C + c + 1);
        EXPECT_EQ(v[r * C + c], qk && r < D ? was * root : was) << proj << " " << r << " " << c;
      }
    }
  }
  // Layer 0 is below tau everywhere: nothing moves.
  const TensorInfo& q0 = *layout.Find("model.layers.0.self_attn.q_proj.weight");
  std::vector<float> v = Counting(q0);
  EXPECT_EQ(ApplyQkClip(q0, m, tau, logits, v.data()), 0);
  EXPECT_EQ(v, Counting(q0));
  // tau = 0 is off.
  const TensorInfo& q1 = *layout.Find("model.layers.1.self_attn.q_proj.weight");
  v = Counting(q1);
  EXPECT_EQ(ApplyQkClip(q1, m, 0.0, logits, v.data()), 0);
  EXPECT_EQ(v, Counting(q1));
}

// MLA: per head the query rows are [nope (4) | rope (2)] and kv_b_proj's
// [k nope (4) | v (3)]: q^C and k^C by sqrt(gamma), q^R by gamma, v and the
// shared k^R (kv_a_proj_with_mqa) untouched.
TEST(QkClipTest, MlaScalesNopeBySqrtGammaRopeByGammaAndLeavesTheSharedKeyAlone) {
  const v1::ModelConfig m = Mla();
  const ModelLayout layout(m);
  const AttentionLogits logits = Logits(m);
  const double tau = 2.0;  // layer 1: head 0 gamma = 0.25, head 1 at tau: untouched
  const float root = 0.5f, gamma = 0.25f;
  const std::string a = "model.layers.1.self_attn.";
  {
    const TensorInfo& t = *layout.Find(a + "q_proj.weight");  // (2 * 6, 16)
    ASSERT_EQ(t.shape, (std::vector<int64_t>{12, 16}));
    std::vector<float> v = Counting(t);
    EXPECT_EQ(ApplyQkClip(t, m, tau, logits, v.data()), 1);
    for (int r = 0; r < 12; ++r) {
      const float f = r < 4 ? root : r < 6 ? gamma : 1.0f;
      for (int c = 0; c < 16; ++c) {
        EXPECT_EQ(v[r * 16 + c], static_cast<float>(r * 16 + c + 1) * f) << r << " " << c;
      }
    }
  }
  {
    const TensorInfo& t = *layout.Find(a + "kv_b_proj.weight");  // (2 * 7, 6)
    ASSERT_EQ(t.shape, (std::vector<int64_t>{14, 6}));
    std::vector<float> v = Counting(t);
    EXPECT_EQ(ApplyQkClip(t, m, tau, logits, v.data()), 1);
    for (int r = 0; r < 14; ++r) {
      const float f = r < 4 ? root : 1.0f;
      for (int c = 0; c < 6; ++c) {
        EXPECT_EQ(v[r * 6 + c], static_cast<float>(r * 6 + c + 1) * f) << r << " " << c;
      }
    }
  }
  for (const char* name : {"kv_a_proj_with_mqa.weight", "kv_a_layernorm.weight", "o_proj.weight"}) {
    const TensorInfo& t = *layout.Find(a + name);
    std::vector<float> v = Counting(t);
    EXPECT_EQ(ApplyQkClip(t, m, tau, logits, v.data()), 0) << name;
    EXPECT_EQ(v, Counting(t)) << name;
  }
}

// After the clip the model's largest logit of each clipped head is tau (the
// logits of a head scale by gamma exactly, up to float rounding), and the
// other heads keep theirs: checked through MoeModel's own forward, for MHA,
// MLA, and MLA with query compression.
TEST(QkClipTest, ClippedHeadsComeOutAtTauInTheModel) {
  for (int variant = 0; variant < 3; ++variant) {
    v1::ModelConfig m = variant == 0 ? Mha() : Mla();
    if (variant == 2) m.set_q_lora_rank(5);
    SCOPED_TRACE(m.attention() + (variant == 2 ? " q_lora" : ""));
    MoeModel model(m);
    const ModelLayout& layout = model.layout();
    std::vector<float> params = RandomParams(layout, 21);
    const int B = 2, N = B * model.seq_len();
    std::vector<int32_t> inputs, targets;
    RandomTokens(&inputs, &targets, N, m.vocab_size(), 5);
    const SlotStats before = model.Forward(params.data(), inputs.data(), targets.data(), B);
    AttentionLogits logits(m);
    ASSERT_TRUE(logits.Add(before.logit_max).ok());
    // tau halfway between the smallest and the largest head maximum.
    float lo = std::numeric_limits<float>::infinity(), hi = -lo;
    for (int l = 0; l < logits.layers(); ++l) {
      for (int h = 0; h < logits.heads(); ++h) {
        lo = std::min(lo, logits.max(l, h));
        hi = std::max(hi, logits.max(l, h));
      }
    }
    ASSERT_GT(hi, lo);
    const double tau = 0.5 * (lo + hi);
    // One layer at a time: a clipped layer changes the inputs of the later ones.
    int clipped = 0;
    for (int layer = 0; layer < logits.layers(); ++layer) {
      std::vector<float> clipped_params = params;
      for (const TensorInfo& t : layout.tensors()) {
        if (t.layer == layer) ApplyQkClip(t, m, tau, logits, clipped_params.data() + t.offset);
      }
      clipped += logits.ClippedHeads(layer, tau);
      const SlotStats after =
          model.Forward(clipped_params.data(), inputs.data(), targets.data(), B);
      for (int l = 0; l <= layer; ++l) {
        for (int h = 0; h < logits.heads(); ++h) {
          const double was = before.logit_max[l][h], now = after.logit_max[l][h];
          if (l == layer && was > tau) {
            EXPECT_NEAR(now, tau, 1e-5 * tau) << l << " " << h << " was " << was;
          } else {
            EXPECT_EQ(now, was) << l << " " << h;
          }
        }
      }
    }
    EXPECT_GT(clipped, 0);
  }
}

TEST(QkClipTest, MaximaOfAnotherShapeOrNotFiniteAreRefused) {
  const v1::ModelConfig m = Mha();  // 3 layers x 2 heads
  AttentionLogits logits(m);
  EXPECT_TRUE(logits.empty());
  google::protobuf::RepeatedField<float> flat;
  for (float x : {1.0f, 2.0f, 3.0f, 4.0f, 5.0f}) flat.Add(x);
  EXPECT_FALSE(logits.Add(flat).ok());
  flat.Add(std::numeric_limits<float>::quiet_NaN());
  EXPECT_FALSE(logits.Add(flat).ok());
  EXPECT_TRUE(logits.empty());  // nothing taken from a refusal
  flat.Set(5, 0.5f);
  ASSERT_TRUE(logits.Add(flat).ok());
  flat.Set(0, 7.0f);
  ASSERT_TRUE(logits.Add(flat).ok());
  EXPECT_EQ(logits.max(0, 0), 7.0f);
  EXPECT_EQ(logits.LayerMax(2), 5.0f);
  EXPECT_EQ(logits.ClippedHeads(1, 3.5), 1);
  EXPECT_EQ(QkClipGamma(100.0, 50.0), 1.0);
  EXPECT_EQ(QkClipGamma(100.0, 400.0), 0.25);
  EXPECT_EQ(QkClipGamma(0.0, 400.0), 1.0);
  EXPECT_FALSE(logits.Add(std::vector<std::vector<float>>(3, std::vector<float>(3, 1.0f))).ok());
}

// A learning rate 10 times the default makes the attention logits grow
// without bound (30 to 75 within 40 steps here, past 100 later); with QK-Clip
// at tau = 1 every step's largest logit, measured on its fresh batch before
// that step's clip, stays within a small factor of tau. Under MHA and MLA.
class QkClipTrainingTest : public testing_util::TempDirTest {};

double LargestLogit(v1::JobSpec job, double tau, int* clipped_heads) {
  job.mutable_optimizer()->set_qk_clip_tau(tau);
  double largest = 0.0;
  *clipped_heads = 0;
  TrainOptions options;
  options.on_step = [&](const StepReport& r) {
    if (r.step > 5) largest = std::max(largest, r.max_attention_logit);
    *clipped_heads += r.qk_clipped_heads;
  };
  testing_util::RunJob(job, options);
  return largest;
}

TEST_F(QkClipTrainingTest, GrowingLogitsStayNearTauWithTheClipOn) {
  const std::string corpus = testing_util::WriteCorpus(dir());
  for (const char* attention : {"mha", "mla"}) {
    SCOPED_TRACE(attention);
    v1::JobSpec job = testing_util::TinyJob(corpus, "muon");
    job.mutable_model()->set_hidden_size(64);
    job.mutable_model()->set_num_attention_heads(4);
    job.mutable_model()->set_attention(attention);
    FillJobDefaults(&job);  // the MLA widths
    job.mutable_optimizer()->set_lr(0.2);
    job.mutable_schedule()->set_total_steps(40);
    job.mutable_schedule()->set_warmup_steps(4);
    ASSERT_TRUE(ValidateJobSpec(job).ok()) << ValidateJobSpec(job);
    int clipped_off = 0, clipped_on = 0;
    const double off = LargestLogit(job, 0.0, &clipped_off);
    const double on = LargestLogit(job, 1.0, &clipped_on);
    std::printf(
        "%s: largest attention logit after step 5: %.2f without QK-Clip, %.2f with "
        "tau = 1 (%d head-steps clipped)\n",
        attention, off, on, clipped_on);
    EXPECT_EQ(clipped_off, 0);
    EXPECT_GT(clipped_on, 0);
    EXPECT_GT(off, 20.0) << "the learning rate no longer provokes growing logits";
    // Each step clips with the maxima its own forward measured, before its
    // update moved the weights: the next batch may see a few times tau.
    EXPECT_LT(on, 5.0);
    EXPECT_LT(5.0 * on, off);
  }
}

}  // namespace
}  // namespace muonps
