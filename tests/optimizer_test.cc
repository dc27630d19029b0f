// Tests for the optimizer math: Newton-Schulz, Muon, AdamW, the learning-rate
// schedule and the gradient-norm helpers.
//
// The golden cases in tests/data/muon_golden.json come from a float64 PyTorch
// reference. Error metric for every golden tensor (float32 ours vs float64 ref):
//   rel = ||ours - ref||_2 / ||ref||_2 <= kRelTol, and max_i |ours_i - ref_i| <= kAbsTol.
// The mutation tests show that this tolerance rejects plausible mistakes (a
// wrong coefficient, a missing step, a missing transpose, a wrong scale rule or
// bias correction) by a wide margin.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <fstream>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

#include "common/blas_runtime.h"
#include "common/parallel.h"
#include "common/philox.h"
#include "optim/adamw.h"
#include "optim/grad_norm.h"
#include "optim/lr_schedule.h"
#include "optim/muon.h"
#include "optim/newton_schulz.h"

namespace muonps {
namespace {

constexpr double kRelTol = 1e-5;
constexpr double kAbsTol = 1e-5;
constexpr double kUpdateRelTol = 1e-4;

const nlohmann::json& Golden() {
  static const nlohmann::json* golden = [] {
    std::ifstream file(std::string(MUONPS_TEST_DATA_DIR) + "/muon_golden.json");
    EXPECT_TRUE(file.good()) << "cannot open muon_golden.json";
    return new nlohmann::json(nlohmann::json::parse(file, nullptr, /*allow_exceptions=*/false));
  }();
  return *golden;
}

std::vector<float> ToFloat(const nlohmann::json& values) {
  std::vector<float> out;
  out.reserve(values.size());
  for (const auto& v : values) out.push_back(static_cast<float>(v.get<double>()));
  return out;
}

std::vector<double> ToDouble(const nlohmann::json& values) {
  return values.get<std::vector<double>>();
}

// ||ours - ref||_2 / ||ref||_2, in double.
double RelError(const std::vector<float>& ours, const std::vector<double>& ref) {
  EXPECT_EQ(ours.size(), ref.size());
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < std::min(ours.size(), ref.size()); ++i) {
    const double d = ours[i] - ref[i];
    diff += d * d;
    norm += ref[i] * ref[i];
  }
  return std::sqrt(diff) / std::sqrt(norm);
}

double MaxAbsError(const std::vector<float>& ours, const std::vector<double>& ref) {
  double worst = 0.0;
  for (size_t i = 0; i < std::min(ours.size(), ref.size()); ++i) {
    worst = std::max(worst, std::abs(ours[i] - ref[i]));
  }
  return worst;
}

void ExpectClose(const std::vector<float>& ours, const std::vector<double>& ref,
                 const std::string& what) {
  const double rel = RelError(ours, ref);
  const double max_abs = MaxAbsError(ours, ref);
  EXPECT_LE(rel, kRelTol) << what;
  EXPECT_LE(max_abs, kAbsTol) << what;
}

std::vector<float> Transposed(const std::vector<float>& x, int rows, int cols) {
  std::vector<float> t(x.size());
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < cols; ++j) t[static_cast<size_t>(j) * rows + i] = x[i * cols + j];
  }
  return t;
}

std::vector<float> RandomMatrix(int rows, int cols, uint64_t seed, const char* name) {
  std::vector<float> x(static_cast<size_t>(rows) * cols);
  FillNormal(x.data(), static_cast<int64_t>(x.size()), seed, name, 1.0);
  return x;
}

// Restores the thread count a test changes.
class ThreadCountGuard {
 public:
  ThreadCountGuard() : saved_(NumThreads()) {}
  ~ThreadCountGuard() { SetNumThreads(saved_); }

 private:
  int saved_;
};

// ---- Newton-Schulz ------------------------------------------------------------

std::vector<float> RunNs(const std::vector<float>& in, int rows, int cols, int steps) {
  std::vector<float> out(in.size());
  NewtonSchulz(out.data(), in.data(), rows, cols, steps);
  return out;
}

TEST(OptimizerGolden, NewtonSchulzMatchesReference) {
  ASSERT_FALSE(Golden()["ns5"].empty());
  for (const auto& c : Golden()["ns5"]) {
    const int rows = c["rows"], cols = c["cols"];
    const std::string name = "ns5 " + std::to_string(rows) + "x" + std::to_string(cols);
    ExpectClose(RunNs(ToFloat(c["input"]), rows, cols, 5), ToDouble(c["output"]), name);
  }
}

TEST(OptimizerGolden, NewtonSchulzInPlaceMatchesReference) {
  for (const auto& c : Golden()["ns5"]) {
    const int rows = c["rows"], cols = c["cols"];
    std::vector<float> x = ToFloat(c["input"]);
    NewtonSchulz(x.data(), x.data(), rows, cols, 5);
    ExpectClose(x, ToDouble(c["output"]), "in place " + std::to_string(rows));
  }
}

// The tolerance is tight enough to catch near misses: each mutation below
// lands far outside it on every golden case.
TEST(OptimizerGolden, NewtonSchulzToleranceRejectsMistakes) {
  for (const auto& c : Golden()["ns5"]) {
    const int rows = c["rows"], cols = c["cols"];
    const std::vector<float> in = ToFloat(c["input"]);
    const std::vector<double> ref = ToDouble(c["output"]);
    // One iteration short or long.
    EXPECT_GT(RelError(RunNs(in, rows, cols, 4), ref), 100 * kRelTol);
    EXPECT_GT(RelError(RunNs(in, rows, cols, 6), ref), 100 * kRelTol);
    // Result left in the transposed layout (for a square matrix too).
    EXPECT_GT(RelError(Transposed(RunNs(in, rows, cols, 5), rows, cols), ref), 100 * kRelTol);
  }
}

// A float64 reference with configurable coefficients, to show that a wrong
// coefficient is caught: with the right ones it matches the golden output to
// float64 precision, with one coefficient off by 0.01 it does not.
std::vector<double> ReferenceNs(const std::vector<double>& g, int rows, int cols, int steps,
                                double ca, double cb, double cc) {
  const bool tall = rows > cols;
  const int m = std::min(rows, cols), n = std::max(rows, cols);
  std::vector<double> x(g.size());
  double norm = 0.0;
  for (double v : g) norm += v * v;
  norm = std::sqrt(norm) + 1e-7;
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) x[i * n + j] = (tall ? g[j * cols + i] : g[i * n + j]) / norm;
  }
  std::vector<double> a(m * m), b(m * m), y(m * n);
  for (int s = 0; s < steps; ++s) {
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < m; ++j) {
        double acc = 0.0;
        for (int k = 0; k < n; ++k) acc += x[i * n + k] * x[j * n + k];
        a[i * m + j] = acc;
      }
    }
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < m; ++j) {
        double acc = 0.0;
        for (int k = 0; k < m; ++k) acc += a[i * m + k] * a[k * m + j];
        b[i * m + j] = cb * a[i * m + j] + cc * acc;
      }
    }
    for (int i = 0; i < m; ++i) {
      for (int j = 0; j < n; ++j) {
        double acc = 0.0;
        for (int k = 0; k < m; ++k) acc += b[i * m + k] * x[k * n + j];
        y[i * n + j] = ca * x[i * n + j] + acc;
      }
    }
    x.swap(y);
  }
  std::vector<double> out(g.size());
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < n; ++j) (tall ? out[j * cols + i] : out[i * n + j]) = x[i * n + j];
  }
  return out;
}

double RelErrorDouble(const std::vector<double>& x, const std::vector<double>& ref) {
  double diff = 0.0, norm = 0.0;
  for (size_t i = 0; i < ref.size(); ++i) {
    diff += (x[i] - ref[i]) * (x[i] - ref[i]);
    norm += ref[i] * ref[i];
  }
  return std::sqrt(diff / norm);
}

TEST(OptimizerGolden, NewtonSchulzToleranceRejectsWrongCoefficients) {
  for (const auto& c : Golden()["ns5"]) {
    const int rows = c["rows"], cols = c["cols"];
    const std::vector<double> in = ToDouble(c["input"]);
    const std::vector<double> ref = ToDouble(c["output"]);
    EXPECT_LE(RelErrorDouble(ReferenceNs(in, rows, cols, 5, 3.4445, -4.7750, 2.0315), ref), 1e-12);
    EXPECT_GT(RelErrorDouble(ReferenceNs(in, rows, cols, 5, 3.4545, -4.7750, 2.0315), ref),
              10 * kRelTol);
    EXPECT_GT(RelErrorDouble(ReferenceNs(in, rows, cols, 5, 3.4445, -4.7850, 2.0315), ref),
              10 * kRelTol);
    EXPECT_GT(RelErrorDouble(ReferenceNs(in, rows, cols, 5, 3.4445, -4.7750, 2.0415), ref),
              10 * kRelTol);
  }
}

// Eigenvalues of a symmetric (n, n) matrix by cyclic Jacobi rotations.
std::vector<double> SymmetricEigenvalues(std::vector<double> s, int n) {
  for (int sweep = 0; sweep < 50; ++sweep) {
    double off = 0.0;
    for (int p = 0; p < n; ++p) {
      for (int q = p + 1; q < n; ++q) off += s[p * n + q] * s[p * n + q];
    }
    if (off < 1e-22) break;
    for (int p = 0; p < n; ++p) {
      for (int q = p + 1; q < n; ++q) {
        const double apq = s[p * n + q];
        if (std::abs(apq) < 1e-300) continue;
        const double theta = (s[q * n + q] - s[p * n + p]) / (2.0 * apq);
        const double t =
            (theta >= 0 ? 1.0 : -1.0) / (std::abs(theta) + std::sqrt(theta * theta + 1.0));
        const double cs = 1.0 / std::sqrt(t * t + 1.0), sn = t * cs;
        for (int k = 0; k < n; ++k) {  // columns p, q
          const double kp = s[k * n + p], kq = s[k * n + q];
          s[k * n + p] = cs * kp - sn * kq;
          s[k * n + q] = sn * kp + cs * kq;
        }
        for (int k = 0; k < n; ++k) {  // rows p, q
          const double pk = s[p * n + k], qk = s[q * n + k];
          s[p * n + k] = cs * pk - sn * qk;
          s[q * n + k] = sn * pk + cs * qk;
        }
      }
    }
  }
  std::vector<double> eig(n);
  for (int i = 0; i < n; ++i) eig[i] = s[i * n + i];
  std::sort(eig.begin(), eig.end());
  return eig;
}

// Singular values of a (rows, cols) matrix with rows <= cols, via X X^T.
std::vector<double> SingularValues(const std::vector<float>& x, int rows, int cols) {
  std::vector<double> gram(static_cast<size_t>(rows) * rows);
  for (int i = 0; i < rows; ++i) {
    for (int j = 0; j < rows; ++j) {
      double acc = 0.0;
      for (int k = 0; k < cols; ++k) acc += double{x[i * cols + k]} * x[j * cols + k];
      gram[i * rows + j] = acc;
    }
  }
  std::vector<double> sv = SymmetricEigenvalues(gram, rows);
  for (double& v : sv) v = std::sqrt(std::max(0.0, v));
  return sv;
}

TEST(OptimizerNewtonSchulz, SingularValuesNearOne) {
  constexpr int kRows = 64, kCols = 128;
  const std::vector<float> g = RandomMatrix(kRows, kCols, 7, "ns_random");
  const std::vector<double> before = SingularValues(RunNs(g, kRows, kCols, 0), kRows, kCols);
  const std::vector<double> after = SingularValues(RunNs(g, kRows, kCols, 5), kRows, kCols);
  // After normalisation alone every singular value is far below 1 ...
  EXPECT_LT(before.back(), 0.5);
  // ... and five iterations bring all of them into the band NS5 is designed for.
  EXPECT_GT(after.front(), 0.6);
  EXPECT_LT(after.back(), 1.25);
  double mean = 0.0;
  for (double v : after) mean += v / kRows;
  EXPECT_NEAR(mean, 0.9, 0.15);
}

TEST(OptimizerNewtonSchulz, TallEqualsTransposedWide) {
  constexpr int kRows = 96, kCols = 40;
  const std::vector<float> g = RandomMatrix(kRows, kCols, 3, "ns_tall");
  const std::vector<float> tall = RunNs(g, kRows, kCols, 5);
  const std::vector<float> wide = RunNs(Transposed(g, kRows, kCols), kCols, kRows, 5);
  std::vector<double> wide_back;
  for (float v : Transposed(wide, kCols, kRows)) wide_back.push_back(v);
  EXPECT_LE(RelError(tall, wide_back), 1e-5);
}

TEST(OptimizerNewtonSchulz, FlopCount) {
  // m = 2, n = 3: 5 * (4 * 4 * 3 + 2 * 8).
  EXPECT_DOUBLE_EQ(NewtonSchulzFlops(3, 2, 5), 5.0 * (48 + 16));
  EXPECT_DOUBLE_EQ(NewtonSchulzFlops(2, 3, 5), 5.0 * (48 + 16));
}

// ---- Muon ------------------------------------------------------------------

MuonHyper HyperFromCase(const nlohmann::json& c) {
  MuonHyper h;
  h.lr = c["lr"];
  h.weight_decay = c["weight_decay"];
  h.momentum = c["momentum"];
  h.nesterov = c["nesterov"];
  h.ns_steps = 5;
  const absl::StatusOr<MuonScaleRule> rule = ParseMuonScaleRule(c["scale_rule"].get<std::string>());
  EXPECT_TRUE(rule.ok()) << rule.status();
  h.scale_rule = rule.value_or(MuonScaleRule::kMatchRmsAdamW);
  return h;
}

struct MuonRun {
  std::vector<std::vector<float>> w, buf;  // after each step
};

MuonRun RunMuonCase(const nlohmann::json& c, const MuonHyper& h) {
  const int rows = c["rows"], cols = c["cols"];
  std::vector<float> w = ToFloat(c["w0"]), buf = ToFloat(c["buf0"]);
  MuonRun run;
  for (const auto& grad_json : c["grads"]) {
    const std::vector<float> grad = ToFloat(grad_json);
    MuonStep(w.data(), buf.data(), grad.data(), rows, cols, h);
    run.w.push_back(w);
    run.buf.push_back(buf);
  }
  return run;
}

// The step's own change, w_after - w_before, in double.
std::vector<double> Delta(const std::vector<double>& after, const std::vector<double>& before) {
  std::vector<double> d(after.size());
  for (size_t i = 0; i < d.size(); ++i) d[i] = after[i] - before[i];
  return d;
}

std::vector<double> Widen(const std::vector<float>& x) { return {x.begin(), x.end()}; }

TEST(OptimizerGolden, MuonStepMatchesReference) {
  ASSERT_FALSE(Golden()["muon_step"].empty());
  for (const auto& c : Golden()["muon_step"]) {
    const MuonRun run = RunMuonCase(c, HyperFromCase(c));
    ASSERT_EQ(run.w.size(), c["w_after"].size());
    std::vector<double> ours_before = ToDouble(c["w0"]), ref_before = ToDouble(c["w0"]);
    for (size_t s = 0; s < run.w.size(); ++s) {
      const std::string name =
          "muon " + c["rows"].dump() + "x" + c["cols"].dump() + " step " + std::to_string(s + 1);
      const std::vector<double> ref = ToDouble(c["w_after"][s]);
      ExpectClose(run.w[s], ref, name + " w");
      ExpectClose(run.buf[s], ToDouble(c["buf_after"][s]), name + " buf");
      // The update alone (about lr * scale per element, small next to w):
      // relative error <= kUpdateRelTol, looser than kRelTol because both
      // sides are differences of float32-rounded weights, but still tight
      // enough to see an error of 1e-3 in the Newton-Schulz output.
      const std::vector<double> ours_delta = Delta(Widen(run.w[s]), ours_before);
      const std::vector<double> ref_delta = Delta(ref, ref_before);
      EXPECT_LE(RelErrorDouble(ours_delta, ref_delta), kUpdateRelTol) << name << " update";
      ours_before = Widen(run.w[s]);
      ref_before = ref;
    }
  }
}

// The weight changes by about lr * scale per step, far more than the
// tolerance, so a wrong scale rule or momentum flavour cannot pass.
TEST(OptimizerGolden, MuonToleranceRejectsMistakes) {
  for (const auto& c : Golden()["muon_step"]) {
    const MuonHyper h = HyperFromCase(c);
    const std::vector<double> ref = ToDouble(c["w_after"][1]);

    MuonHyper other_rule = h;
    other_rule.scale_rule = h.scale_rule == MuonScaleRule::kOriginal ? MuonScaleRule::kMatchRmsAdamW
                                                                     : MuonScaleRule::kOriginal;
    EXPECT_GT(RelError(RunMuonCase(c, other_rule).w[1], ref), 10 * kRelTol);

    MuonHyper other_nesterov = h;
    other_nesterov.nesterov = !h.nesterov;
    EXPECT_GT(RelError(RunMuonCase(c, other_nesterov).w[1], ref), 10 * kRelTol);

    MuonHyper no_decay = h;
    no_decay.weight_decay = 0.0;
    EXPECT_GT(RelError(RunMuonCase(c, no_decay).w[1], ref), 10 * kRelTol);
  }
}

TEST(OptimizerMuon, ScaleRules) {
  EXPECT_DOUBLE_EQ(MuonScale(1024, 4096, MuonScaleRule::kMatchRmsAdamW), 0.2 * 64.0);
  EXPECT_DOUBLE_EQ(MuonScale(4096, 1024, MuonScaleRule::kMatchRmsAdamW), 0.2 * 64.0);
  EXPECT_DOUBLE_EQ(MuonScale(4096, 1024, MuonScaleRule::kOriginal), 2.0);
  EXPECT_DOUBLE_EQ(MuonScale(1024, 4096, MuonScaleRule::kOriginal), 1.0);
  EXPECT_DOUBLE_EQ(MuonScale(3, 2, MuonScaleRule::kOriginal), std::sqrt(1.5));
}

TEST(OptimizerMuon, ParseScaleRule) {
  EXPECT_EQ(ParseMuonScaleRule("match_rms_adamw").value(), MuonScaleRule::kMatchRmsAdamW);
  EXPECT_EQ(ParseMuonScaleRule("original").value(), MuonScaleRule::kOriginal);
  const absl::StatusOr<MuonScaleRule> bad = ParseMuonScaleRule("Original");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  for (MuonScaleRule rule : {MuonScaleRule::kMatchRmsAdamW, MuonScaleRule::kOriginal}) {
    EXPECT_EQ(ParseMuonScaleRule(MuonScaleRuleName(rule)).value(), rule);
  }
}

// ---- AdamW -------------------------------------------------------------------

std::vector<std::vector<float>> RunAdamWCase(const nlohmann::json& c, int64_t first_step) {
  const AdamWHyper h{c["lr"], c["betas"][0], c["betas"][1], c["eps"], c["weight_decay"]};
  const int64_t n = c["size"];
  std::vector<float> p = ToFloat(c["p0"]), m(n, 0.0f), v(n, 0.0f);
  std::vector<std::vector<float>> after;
  int64_t step = first_step;
  for (const auto& grad_json : c["grads"]) {
    const std::vector<float> grad = ToFloat(grad_json);
    AdamWStep(p.data(), m.data(), v.data(), grad.data(), n, step++, h);
    after.push_back(p);
  }
  return after;
}

TEST(OptimizerGolden, AdamWStepMatchesReference) {
  ASSERT_FALSE(Golden()["adamw_step"].empty());
  for (const auto& c : Golden()["adamw_step"]) {
    const std::vector<std::vector<float>> after = RunAdamWCase(c, 1);
    ASSERT_EQ(after.size(), c["p_after"].size());
    for (size_t s = 0; s < after.size(); ++s) {
      ExpectClose(after[s], ToDouble(c["p_after"][s]),
                  "adamw size " + c["size"].dump() + " step " + std::to_string(s + 1));
    }
  }
}

TEST(OptimizerGolden, AdamWToleranceRejectsWrongBiasCorrection) {
  for (const auto& c : Golden()["adamw_step"]) {
    // Off-by-one step index: bias correction as if it were the second step.
    EXPECT_GT(RelError(RunAdamWCase(c, 2)[0], ToDouble(c["p_after"][0])), 10 * kRelTol);
  }
}

// ---- Thread-count independence ---------------------------------------------

TEST(OptimizerDeterminism, NewtonSchulzBitIdenticalAcrossThreadCounts) {
  ThreadCountGuard guard;
  for (auto [rows, cols] : {std::pair{192, 320}, std::pair{320, 192}}) {
    const std::vector<float> g = RandomMatrix(rows, cols, 11, "ns_threads");
    SetNumThreads(1);
    const std::vector<float> one = RunNs(g, rows, cols, 5);
    for (int threads : {2, 3}) {
      SetNumThreads(threads);
      const std::vector<float> many = RunNs(g, rows, cols, 5);
      EXPECT_EQ(std::memcmp(one.data(), many.data(), one.size() * sizeof(float)), 0)
          << rows << "x" << cols << " with " << threads << " threads";
    }
  }
}

TEST(OptimizerDeterminism, MuonStepBitIdenticalAcrossThreadCounts) {
  ThreadCountGuard guard;
  constexpr int kRows = 192, kCols = 320;
  const MuonHyper h{0.02, 0.1, 0.95, true, 5, MuonScaleRule::kMatchRmsAdamW};
  auto run = [&](int threads) {
    SetNumThreads(threads);
    std::vector<float> w = RandomMatrix(kRows, kCols, 5, "muon_w");
    std::vector<float> buf(w.size(), 0.0f);
    for (int step = 0; step < 2; ++step) {
      const std::vector<float> g = RandomMatrix(kRows, kCols, 5 + step, "muon_g");
      MuonStep(w.data(), buf.data(), g.data(), kRows, kCols, h);
    }
    w.insert(w.end(), buf.begin(), buf.end());
    return w;
  };
  const std::vector<float> one = run(1);
  const std::vector<float> two = run(2);
  EXPECT_EQ(std::memcmp(one.data(), two.data(), one.size() * sizeof(float)), 0);
}

TEST(OptimizerDeterminism, AdamWAndSumOfSquaresBitIdenticalAcrossThreadCounts) {
  ThreadCountGuard guard;
  constexpr int64_t kN = 100003;
  std::vector<float> g(kN);
  FillNormal(g.data(), kN, 9, "adamw_g", 1.0);
  const AdamWHyper h{1e-3, 0.9, 0.95, 1e-8, 0.1};
  auto run = [&](int threads, double* sum_sq) {
    SetNumThreads(threads);
    std::vector<float> p(kN, 0.5f), m(kN, 0.0f), v(kN, 0.0f);
    for (int64_t step = 1; step <= 3; ++step) {
      AdamWStep(p.data(), m.data(), v.data(), g.data(), kN, step, h);
    }
    *sum_sq = SumOfSquares(p.data(), kN);
    return p;
  };
  double ss_one = 0.0, ss_two = 0.0;
  const std::vector<float> one = run(1, &ss_one);
  const std::vector<float> two = run(2, &ss_two);
  // NOLINTNEXTLINE(bugprone-suspicious-memory-comparison): the test wants bit-identical floats.
  EXPECT_EQ(std::memcmp(one.data(), two.data(), kN * sizeof(float)), 0);
  // NOLINTNEXTLINE(bugprone-suspicious-memory-comparison): the test wants a bit-identical double.
  EXPECT_EQ(std::memcmp(&ss_one, &ss_two, sizeof(double)), 0);
}

// ---- Learning-rate schedule -------------------------------------------------

TEST(OptimizerSchedule, WarmupThenCosine) {
  constexpr double kPeak = 1e-3;
  auto lr = [](int64_t step) { return ScheduledLr(kPeak, step, 1000, 100, 0.1); };
  EXPECT_DOUBLE_EQ(lr(0), kPeak / 100);
  EXPECT_DOUBLE_EQ(lr(49), kPeak * 50 / 100);
  EXPECT_DOUBLE_EQ(lr(99), kPeak);
  EXPECT_DOUBLE_EQ(lr(100), kPeak);
  EXPECT_NEAR(lr(550), 0.1 * kPeak + 0.9 * kPeak * 0.5, 1e-15);  // halfway: cos = 0
  EXPECT_DOUBLE_EQ(lr(1000), 0.1 * kPeak);
  EXPECT_DOUBLE_EQ(lr(5000), 0.1 * kPeak);  // clamped past the end
  EXPECT_LT(lr(300), lr(200));
}

TEST(OptimizerSchedule, NoWarmup) {
  EXPECT_DOUBLE_EQ(ScheduledLr(0.02, 0, 10, 0, 0.0), 0.02);
  EXPECT_NEAR(ScheduledLr(0.02, 10, 10, 0, 0.0), 0.0, 1e-18);
  // total_steps <= warmup_steps: the decay span is one step.
  EXPECT_DOUBLE_EQ(ScheduledLr(0.02, 5, 5, 5, 0.5), 0.02);
  EXPECT_DOUBLE_EQ(ScheduledLr(0.02, 6, 5, 5, 0.5), 0.01);
}

// ---- Gradient norm ------------------------------------------------------------

TEST(OptimizerGradNorm, SumOfSquaresMatchesDoubleReference) {
  for (int64_t n : {0, 1, 7, 8191, 8192, 8193, 100003}) {
    std::vector<float> x(std::max<int64_t>(n, 1));
    FillNormal(x.data(), n, 13, "sum_sq", 3.0);
    long double ref = 0.0L;
    for (int64_t i = 0; i < n; ++i) ref += static_cast<long double>(x[i]) * x[i];
    const double ours = SumOfSquares(x.data(), n);
    if (n == 0) {
      EXPECT_EQ(ours, 0.0);
    } else {
      EXPECT_NEAR(ours, static_cast<double>(ref), 1e-13 * static_cast<double>(ref)) << n;
    }
  }
}

// Filled piece by piece, in pieces that cut its chunks anywhere, the stream
// ends with SumOfSquares' bits.
TEST(OptimizerGradNorm, SumOfSquaresStreamEqualsSumOfSquaresBitForBit) {
  for (int64_t n : {0, 1, 7, 8191, 8192, 8193, 100003, 262144 + 5}) {
    std::vector<float> x(std::max<int64_t>(n, 1));
    FillNormal(x.data(), n, 29, "sum_sq_stream", 2.0);
    const double whole = SumOfSquares(x.data(), n);
    for (int64_t piece : {int64_t{1} << 30, int64_t{1000}, int64_t{8192}, int64_t{65531}}) {
      SumOfSquaresStream stream(x.data(), n);
      for (int64_t filled = 0; filled < n;) {
        filled = std::min(n, filled + piece);
        stream.Filled(filled);
      }
      const double streamed = stream.Total();
      EXPECT_EQ(std::memcmp(&streamed, &whole, sizeof(double)), 0)
          << "n " << n << ", pieces of " << piece << ": " << streamed << " vs " << whole;
    }
  }
}

TEST(OptimizerGradNorm, ScaleMultiplies) {
  std::vector<float> x = {1.0f, -2.0f, 0.5f, 0.0f, 3.0f};
  Scale(x.data(), static_cast<int64_t>(x.size()), 0.25f);
  EXPECT_EQ(x, (std::vector<float>{0.25f, -0.5f, 0.125f, 0.0f, 0.75f}));
}

// ---- BLAS runtime --------------------------------------------------------------

TEST(OptimizerBlasRuntime, ReportsCoreAndRecognisesGenericKernels) {
  EXPECT_FALSE(BlasCoreName().empty());
  EXPECT_NE(BlasConfig().find("OpenBLAS"), std::string::npos);
  EXPECT_TRUE(IsGenericBlasCore("Prescott"));
  EXPECT_TRUE(IsGenericBlasCore("prescott"));
  EXPECT_TRUE(IsGenericBlasCore("Core2"));
  EXPECT_FALSE(IsGenericBlasCore("SkylakeX"));
  EXPECT_FALSE(IsGenericBlasCore("Haswell"));
  const std::string best = BestBlasCoreType();
  EXPECT_TRUE(best.empty() || best == "SkylakeX" || best == "Haswell") << best;
}

}  // namespace
}  // namespace muonps
