// The whole model's gradient (MoeModel::ForwardBackward) against central
// finite differences of MoeModel::Forward, for every trainable tensor, under
// every scoring function x balancing combination; plus thread-count
// independence and the router bias buffer's (absent) gradient.
//
// The objective is L = loss_scale * sum CE + aux_scale * sum aux, accumulated
// in double from the float32 forward. For each trainable tensor W and each of
// kDirections unit directions d (unit L2 norm over the tensor, see
// ProbeDirection):
//   analytic  <g_W, d>                    (g from ForwardBackward, in double)
//   numeric   (L(W + h d) - L(W - h d)) / (2h),   h = kStep = 3e-3
// and the check is |analytic - numeric| <= kAtol + kRtol |numeric| with
// kAtol = 5e-5, kRtol = 1e-2.
//
// Why these numbers: the float32 forward leaves ~1e-7 of noise in L, i.e.
// up to ~2e-5 in the difference quotient at h = 3e-3; the O(h^2) truncation
// term stays below 2e-4 relative. The directional derivatives range from
// ~7e-3 (expert tensors) to ~2, so the observed errors use at most ~40% of the
// tolerance, while a gradient 10% off (or a missing term of that size) is
// several times outside it: SensitiveToScaledGradient asserts, for every
// tensor and direction used here, that 0.9 g and 1.1 g would fail the same
// check, so no check passes vacuously. Removing the aux-loss backward, the
// shared experts' input gradient, the routing-weight backward, RMSNorm's
// normalisation term, the softmax Jacobian's cross term, or flipping a sign in
// the RoPE backward each makes this test fail.
//
// Routing is discontinuous; parameters, tokens and h are chosen so that no
// perturbation changes any expert's load (asserted), which with the smallness
// of h means the choices do not flip.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <ostream>
#include <random>
#include <string>
#include <vector>

#include "common/job_spec.h"
#include "common/model_layout.h"
#include "common/parallel.h"
#include "common/philox.h"
#include "model/moe_model.h"
#include "tests/model_test_util.h"

namespace muonps {
namespace {

using testing_util::RandomParams;
using testing_util::RandomTokens;
using testing_util::TinyModelConfig;

constexpr double kStep = 3e-3;
constexpr double kAtol = 5e-5;
constexpr double kRtol = 1e-2;
constexpr int kDirections = 3;
constexpr int kBatch = 2;
constexpr float kAuxScale = 0.05f;

struct GradCase {
  std::string name;
  std::string scoring;
  std::string balancing;
  bool norm_topk_prob = true;
  double routed_scaling_factor = 1.0;
  // Parameter seed: one whose routing margins exceed the perturbation.
  uint64_t seed = 3;
  // "mla": Multi-head Latent Attention with distinct nope, rope and value
  // widths, and query compression when q_lora_rank > 0.
  std::string attention = "mha";
  int q_lora_rank = 0;
};

// The tiny model, with MLA when the case asks for it.
v1::ModelConfig CaseConfig(const GradCase& c) {
  const v1::ModelConfig config =
      TinyModelConfig(c.scoring, c.balancing, c.norm_topk_prob, c.routed_scaling_factor);
  return c.attention == "mla" ? testing_util::WithTinyMla(config, c.q_lora_rank) : config;
}

void PrintTo(const GradCase& c, std::ostream* os) { *os << c.name; }

// A random unit direction biased towards the gradient: normalize(u + g/||g||)
// with u uniform on the unit sphere. A purely random direction in a tensor of
// n entries sees only ~||g||/sqrt(n) of the gradient, which for the small,
// sparsely used expert tensors sinks into the float32 noise of the difference
// quotient; this one keeps <g, d> near ||g||/sqrt(2), while its random half
// still probes the components orthogonal to g (where a missing term may hide).
std::vector<double> ProbeDirection(const float* g, int64_t n, std::mt19937* gen) {
  std::normal_distribution<double> dist(0.0, 1.0);
  std::vector<double> u(n);
  double uu = 0.0, gg = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    u[i] = dist(*gen);
    uu += u[i] * u[i];
    gg += static_cast<double>(g[i]) * g[i];
  }
  const double su = 1.0 / std::sqrt(uu), sg = gg > 0.0 ? 1.0 / std::sqrt(gg) : 0.0;
  double dd = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    u[i] = u[i] * su + g[i] * sg;
    dd += u[i] * u[i];
  }
  for (double& x : u) x /= std::sqrt(dd);
  return u;
}

// One directional-derivative comparison.
struct Probe {
  std::string tensor;
  double analytic = 0.0;
  double numeric = 0.0;
  bool loads_unchanged = true;
};

bool WithinTolerance(double analytic, double numeric) {
  return std::abs(analytic - numeric) <= kAtol + kRtol * std::abs(numeric);
}

// Runs every probe of one configuration.
std::vector<Probe> ProbeModel(const GradCase& c) {
  const v1::ModelConfig config = CaseConfig(c);
  MoeModel model(config);
  const ModelLayout& layout = model.layout();
  const int N = kBatch * model.seq_len();
  std::vector<float> params = RandomParams(layout, c.seed);
  std::vector<int32_t> inputs, targets;
  RandomTokens(&inputs, &targets, N, config.vocab_size(), 5);
  const float loss_scale = 1.0f / static_cast<float>(N);

  std::vector<float> grads(layout.total_floats(), 0.0f);
  const SlotStats base = model.ForwardBackward(params.data(), inputs.data(), targets.data(), kBatch,
                                               loss_scale, kAuxScale, grads.data());
  // An expert no token chose has a zero gradient and would make its probes vacuous.
  for (const std::vector<int64_t>& load : base.expert_load) {
    for (int64_t count : load) EXPECT_GT(count, 0) << c.name << ": an expert received no tokens";
  }
  auto objective = [&](const SlotStats& s) {
    return static_cast<double>(loss_scale) * s.loss_sum +
           static_cast<double>(kAuxScale) * s.aux_sum;
  };

  std::vector<Probe> probes;
  std::mt19937 gen(17);
  for (const TensorInfo& t : layout.tensors()) {
    if (!t.trainable()) continue;
    float* w = params.data() + t.offset;
    const std::vector<float> saved(w, w + t.numel);
    for (int k = 0; k < kDirections; ++k) {
      const std::vector<double> d = ProbeDirection(grads.data() + t.offset, t.numel, &gen);
      Probe probe;
      probe.tensor = t.name;
      for (int64_t i = 0; i < t.numel; ++i) probe.analytic += grads[t.offset + i] * d[i];
      // The perturbation actually applied is the float-rounded one; use it.
      double lp = 0.0, lm = 0.0, applied = 0.0;
      for (int sign : {1, -1}) {
        for (int64_t i = 0; i < t.numel; ++i) {
          w[i] = static_cast<float>(saved[i] + sign * kStep * d[i]);
          applied += sign * (static_cast<double>(w[i]) - saved[i]) * d[i];
        }
        const SlotStats s = model.Forward(params.data(), inputs.data(), targets.data(), kBatch);
        (sign == 1 ? lp : lm) = objective(s);
        if (s.expert_load != base.expert_load) probe.loads_unchanged = false;
      }
      std::copy(saved.begin(), saved.end(), w);
      probe.numeric = (lp - lm) / applied;
      probes.push_back(probe);
    }
  }
  return probes;
}

// The tiny model runs hundreds of short parallel loops per forward; on one
// thread the probes take milliseconds whatever else the machine is doing.
// (Thread-count independence is tested separately below.)
class ModelGradientTest : public testing::TestWithParam<GradCase> {
 protected:
  void SetUp() override {
    saved_threads_ = NumThreads();
    SetNumThreads(1);
  }
  void TearDown() override { SetNumThreads(saved_threads_); }

 private:
  int saved_threads_ = 1;
};

TEST_P(ModelGradientTest, MatchesFiniteDifferences) {
  const GradCase& c = GetParam();
  const std::vector<Probe> probes = ProbeModel(c);
  ASSERT_FALSE(probes.empty());
  double worst = 0.0;
  for (const Probe& p : probes) {
    ASSERT_TRUE(p.loads_unchanged) << p.tensor << ": a perturbation changed the routing";
    EXPECT_TRUE(WithinTolerance(p.analytic, p.numeric))
        << p.tensor << ": analytic " << p.analytic << " finite difference " << p.numeric;
    worst =
        std::max(worst, std::abs(p.analytic - p.numeric) / (kAtol + kRtol * std::abs(p.numeric)));
  }
  std::printf("%s: %zu directional derivatives, max error / tolerance = %.3f\n", c.name.c_str(),
              probes.size(), worst);
}

// The check above would catch a gradient 10% off on any tensor.
TEST_P(ModelGradientTest, SensitiveToScaledGradient) {
  const GradCase& c = GetParam();
  for (const Probe& p : ProbeModel(c)) {
    EXPECT_FALSE(WithinTolerance(0.9 * p.analytic, p.numeric))
        << p.tensor << ": |<g, d>| = " << std::abs(p.analytic) << " is too small to check";
    EXPECT_FALSE(WithinTolerance(1.1 * p.analytic, p.numeric)) << p.tensor;
  }
}

// With softmax scores and norm_topk_prob the softmax normaliser cancels from
// the routing weights, and with it the cross term of the softmax Jacobian;
// the unnormalised softmax cases keep that term under test.
INSTANTIATE_TEST_SUITE_P(
    ScoringAndBalancing, ModelGradientTest,
    testing::Values(GradCase{"sigmoid_aux_free_bias", "sigmoid", "aux_free_bias"},
                    GradCase{"sigmoid_aux_loss_unnormalized_scaled", "sigmoid", "aux_loss",
                             /*norm_topk_prob=*/false, /*routed_scaling_factor=*/2.5},
                    GradCase{"softmax_aux_free_bias_unnormalized", "softmax", "aux_free_bias",
                             /*norm_topk_prob=*/false},
                    GradCase{"softmax_aux_loss", "softmax", "aux_loss"},
                    GradCase{"softmax_aux_loss_unnormalized", "softmax", "aux_loss",
                             /*norm_topk_prob=*/false, /*routed_scaling_factor=*/1.0,
                             /*seed=*/4},
                    GradCase{"mla_sigmoid_aux_loss", "sigmoid", "aux_loss", true, 2.5, 3, "mla"},
                    GradCase{"mla_q_lora_softmax_aux_free_bias", "softmax", "aux_free_bias", true,
                             1.0, 4, "mla", /*q_lora_rank=*/5}),
    [](const testing::TestParamInfo<GradCase>& info) { return info.param.name; });

// Gradient and stats are bit-identical for 1 and 2 threads: on the default
// model (every parallel loop and every tiled product split) and on the tiny
// one of the finite-difference checks.
void ExpectSameForOneAndTwoThreads(const v1::ModelConfig& config, uint64_t seed) {
  MoeModel model(config);
  const ModelLayout& layout = model.layout();
  const int N = kBatch * model.seq_len();
  const std::vector<float> params = RandomParams(layout, seed);
  std::vector<int32_t> inputs, targets;
  RandomTokens(&inputs, &targets, N, config.vocab_size(), 13);
  const int saved_threads = NumThreads();

  std::vector<std::vector<float>> grads;
  std::vector<SlotStats> stats;
  for (int threads : {1, 2}) {
    SetNumThreads(threads);
    grads.emplace_back(layout.total_floats(), 0.0f);
    stats.push_back(model.ForwardBackward(params.data(), inputs.data(), targets.data(), kBatch,
                                          1.0f / N, kAuxScale, grads.back().data()));
  }
  SetNumThreads(saved_threads);
  EXPECT_EQ(std::memcmp(grads[0].data(), grads[1].data(), grads[0].size() * sizeof(float)), 0)
      << "gradient differs between 1 and 2 threads";
  for (const TensorInfo& t : layout.tensors()) {
    EXPECT_EQ(std::memcmp(grads[0].data() + t.offset, grads[1].data() + t.offset,
                          t.numel * sizeof(float)),
              0)
        << t.name << " differs between 1 and 2 threads";
  }
  EXPECT_EQ(stats[0].loss_sum, stats[1].loss_sum);
  EXPECT_EQ(stats[0].aux_sum, stats[1].aux_sum);
  EXPECT_EQ(stats[0].expert_load, stats[1].expert_load);
  EXPECT_EQ(stats[0].logit_max, stats[1].logit_max);
}

TEST(ModelGradientThreadsTest, MoonlightTinyIndependentOfThreadCount) {
  absl::StatusOr<v1::JobSpec> job = PresetJobSpec("moonlight-tiny");
  ASSERT_TRUE(job.ok()) << job.status();
  ExpectSameForOneAndTwoThreads(job->model(), 9);
}

TEST(ModelGradientThreadsTest, DefaultModelIndependentOfThreadCount) {
  v1::ModelConfig config = DefaultJobSpec().model();
  config.set_balancing("aux_loss");
  ExpectSameForOneAndTwoThreads(config, 9);
}

TEST(ModelGradientThreadsTest, TinyModelIndependentOfThreadCount) {
  ExpectSameForOneAndTwoThreads(TinyModelConfig("softmax", "aux_loss", false, 1.0), 3);
}

// The bias buffer steers the choice but is not trained by gradients: its
// slots in the gradient buffer are left exactly as they were, while it does
// change the loss. Forward and ForwardBackward report the same loss.
TEST(ModelGradientBufferTest, BiasGetsNoGradient) {
  for (const char* balancing : {"aux_free_bias", "aux_loss"}) {
    const v1::ModelConfig config = TinyModelConfig("sigmoid", balancing);
    MoeModel model(config);
    const ModelLayout& layout = model.layout();
    const int N = kBatch * model.seq_len();
    const std::vector<float> params = RandomParams(layout, 3);
    std::vector<int32_t> inputs, targets;
    RandomTokens(&inputs, &targets, N, config.vocab_size(), 5);

    std::vector<float> grads(layout.total_floats());
    FillNormal(grads.data(), layout.total_floats(), 1, "grad_base", 1.0);
    const std::vector<float> before = grads;
    const SlotStats fb = model.ForwardBackward(params.data(), inputs.data(), targets.data(), kBatch,
                                               1.0f / N, kAuxScale, grads.data());
    const SlotStats f = model.Forward(params.data(), inputs.data(), targets.data(), kBatch);
    EXPECT_EQ(fb.loss_sum, f.loss_sum) << balancing;
    EXPECT_EQ(fb.aux_sum, f.aux_sum) << balancing;
    ASSERT_EQ(model.bias_tensors().size(), 2u);
    for (int index : model.bias_tensors()) {
      const TensorInfo& t = layout.tensors()[index];
      EXPECT_EQ(t.role, TensorRole::kBuffer);
      EXPECT_EQ(
          std::memcmp(grads.data() + t.offset, before.data() + t.offset, t.numel * sizeof(float)),
          0)
          << balancing << ": " << t.name << " received a gradient";
    }
    // Every trainable tensor did receive one.
    for (const TensorInfo& t : layout.tensors()) {
      if (!t.trainable()) continue;
      EXPECT_NE(
          std::memcmp(grads.data() + t.offset, before.data() + t.offset, t.numel * sizeof(float)),
          0)
          << balancing << ": " << t.name << " received no gradient";
    }
  }
}

}  // namespace
}  // namespace muonps
