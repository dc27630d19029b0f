#include "common/numerics.h"

#include <cmath>
#include <cstring>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "common/blas_runtime.h"
#include "common/gemm.h"
#include "common/philox.h"

#ifndef MUONPS_VERSION
#define MUONPS_VERSION "0.0.0"
#endif

namespace muonps {
namespace {

// FNV-1a over raw bytes.
class Fnv64 {
 public:
  void Add(const void* data, size_t n) {
    const auto* p = static_cast<const unsigned char*>(data);
    for (size_t i = 0; i < n; ++i) h_ = (h_ ^ p[i]) * 0x100000001b3ULL;
  }
  template <typename T>
  void AddAll(const std::vector<T>& v) {
    Add(v.data(), v.size() * sizeof(T));
  }
  uint64_t value() const { return h_; }

 private:
  uint64_t h_ = 0xcbf29ce484222325ULL;
};

struct ProbeProduct {
  bool ta, tb;
  int M, N, K;
  bool tiled, upper_only;
};

// Shapes of the default model's products (C = 128, T = 256, F = 512, vocab
// 256, two sequences), shapes with edge tiles in both directions, and a
// symmetric product as Newton-Schulz makes it. The three shapes named in the
// OpenBLAS thread-count report are among them.
constexpr ProbeProduct kProducts[] = {
    {false, false, 517, 384, 128, true, false}, {true, false, 256, 128, 512, true, false},
    {false, true, 512, 128, 128, true, false},  {false, true, 130, 70, 33, true, false},
    {true, true, 33, 17, 100, false, false},    {false, false, 64, 64, 32, false, false},
    {false, true, 64, 192, 32, false, false},   {false, true, 300, 300, 200, true, true},
    {false, false, 128, 512, 384, true, false}, {true, false, 128, 256, 512, true, false},
};

}  // namespace

const char* MuonpsVersion() { return MUONPS_VERSION; }

uint64_t ComputeNumericsFingerprint() {
  Fnv64 hash;
  for (const ProbeProduct& p : kProducts) {
    const int64_t rows_a = p.ta ? p.K : p.M, cols_a = p.ta ? p.M : p.K;
    const int64_t rows_b = p.tb ? p.N : p.K, cols_b = p.tb ? p.K : p.N;
    std::vector<float> a(rows_a * cols_a), b(rows_b * cols_b), c(int64_t{p.M} * p.N);
    const std::string tag = absl::StrCat(p.M, "x", p.N, "x", p.K, p.ta, p.tb);
    FillNormal(a.data(), static_cast<int64_t>(a.size()), 7, "probe.a." + tag, 1.0);
    FillNormal(b.data(), static_cast<int64_t>(b.size()), 7, "probe.b." + tag, 1.0);
    FillNormal(c.data(), static_cast<int64_t>(c.size()), 7, "probe.c." + tag, 1.0);
    if (p.tiled) {
      TiledSgemm(p.ta, p.tb, p.M, p.N, p.K, 0.75f, a.data(), static_cast<int>(cols_a), b.data(),
                 static_cast<int>(cols_b), 0.5f, c.data(), p.N, GemmTiles{}, p.upper_only);
    } else {
      Sgemm(p.ta, p.tb, p.M, p.N, p.K, 0.75f, a.data(), cols_a, b.data(), cols_b, 0.5f, c.data(),
            p.N);
    }
    if (p.upper_only) {  // only the upper triangle is defined
      for (int i = 0; i < p.M; ++i) {
        for (int j = 0; j < i; ++j) c[int64_t{i} * p.N + j] = 0.0f;
      }
    }
    hash.AddAll(c);
  }
  // The C library's functions over a few thousand arguments of the ranges the
  // kernels use (softmax and sigmoid arguments, logits, RoPE angles).
  std::vector<float> xf(4096);
  std::vector<double> xd(4096);
  FillNormal(xf.data(), static_cast<int64_t>(xf.size()), 7, "probe.libm", 4.0);
  for (size_t i = 0; i < xf.size(); ++i) xd[i] = static_cast<double>(xf[i]) * 37.0;
  std::vector<float> of(xf.size());
  std::vector<double> od(xd.size());
  for (auto fn : {+[](float x) { return std::exp(x); }, +[](float x) { return std::log1p(x * x); },
                  +[](float x) { return std::tanh(x); }, +[](float x) { return std::sin(x * 100); },
                  +[](float x) { return std::cos(x * 100); },
                  +[](float x) { return std::pow(std::fabs(x) + 0.5f, 1.7f); },
                  +[](float x) { return std::sqrt(std::fabs(x)); },
                  +[](float x) { return std::log(std::fabs(x) + 1e-3f); }}) {
    for (size_t i = 0; i < xf.size(); ++i) of[i] = fn(xf[i]);
    hash.AddAll(of);
  }
  for (auto fn : {+[](double x) { return std::exp(x / 8); },
                  +[](double x) { return std::log(std::fabs(x) + 1e-9); },
                  +[](double x) { return std::sin(x); }, +[](double x) { return std::cos(x); },
                  +[](double x) { return std::pow(10000.0, -std::fabs(x) / 200); },
                  +[](double x) { return std::sqrt(std::fabs(x)); }}) {
    for (size_t i = 0; i < xd.size(); ++i) od[i] = fn(xd[i]);
    hash.AddAll(od);
  }
  return hash.value();
}

const v1::NumericsProfile& LocalNumerics() {
  static const v1::NumericsProfile* const profile = [] {
    auto* p = new v1::NumericsProfile;
    p->set_blas_core(BlasCoreName());
    p->set_blas_config(BlasConfig());
    p->set_version(MuonpsVersion());
    p->set_fingerprint(absl::StrFormat("%016x", ComputeNumericsFingerprint()));
    return p;
  }();
  return *profile;
}

std::string DescribeNumerics(const v1::NumericsProfile& profile) {
  if (profile.fingerprint().empty()) return "unknown numerics (no profile sent)";
  std::string out =
      absl::StrCat("BLAS kernel ", profile.blas_core().empty() ? "?" : profile.blas_core(),
                   ", fingerprint ", profile.fingerprint());
  if (profile.version() != MuonpsVersion()) absl::StrAppend(&out, ", muonps ", profile.version());
  return out;
}

bool SameNumerics(const v1::NumericsProfile& a, const v1::NumericsProfile& b) {
  return !a.fingerprint().empty() && a.fingerprint() == b.fingerprint() &&
         a.version() == b.version();
}

absl::Status CheckSameNumerics(const v1::NumericsProfile& member, const std::string& who,
                               const v1::NumericsProfile& reference,
                               const std::string& reference_name) {
  if (SameNumerics(member, reference)) return absl::OkStatus();
  std::string hint;
  if (member.blas_core() != reference.blas_core() && !reference.blas_core().empty()) {
    hint = absl::StrCat("; start it with --blas_core=", reference.blas_core(),
                        " (or MUONPS_BLAS_CORE) on a CPU that can run that kernel");
  } else {
    hint = "; run the same muonps build with the same OpenBLAS and C library";
  }
  return absl::FailedPreconditionError(
      absl::StrCat("numerics: ", who, " computes with ", DescribeNumerics(member), ", but ",
                   reference_name, " computes with ", DescribeNumerics(reference),
                   ": its results would not be bit-identical", hint));
}

std::string ResumeNumericsNote(const v1::NumericsProfile& saved) {
  if (saved.fingerprint().empty()) {
    return absl::StrCat("the checkpoint does not record its numerics; this run computes with ",
                        DescribeNumerics(LocalNumerics()),
                        ": the continuation may not be bit-identical to an uninterrupted run");
  }
  return absl::StrCat("the checkpoint was computed with ", DescribeNumerics(saved),
                      "; this run computes with ", DescribeNumerics(LocalNumerics()),
                      ": the continuation is not bit-identical to an uninterrupted run");
}

}  // namespace muonps
