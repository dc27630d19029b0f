#include "common/blas_runtime.h"

#include <unistd.h>

#include <array>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <malloc.h>

#include <cblas.h>

namespace muonps {
namespace {

// Set (to "1") just before the re-exec; seeing it means we already tried.
constexpr char kReexecMarker[] = "MUONPS_BLAS_REEXEC";

// OpenBLAS x86 kernel names without AVX kernels, which it falls back to for
// CPUs it does not recognise.
constexpr std::array<std::string_view, 13> kGenericCores = {
    "Prescott", "Katmai",     "Coppermine", "Northwood", "Banias",    "Atom",   "Core2",
    "Penryn",   "Dunnington", "Nehalem",    "Opteron",   "Barcelona", "Generic"};

std::string OrEmpty(const char* s) { return s == nullptr ? std::string() : std::string(s); }

bool EqualsIgnoreCase(std::string_view x, std::string_view y) {
  if (x.size() != y.size()) return false;
  for (size_t i = 0; i < x.size(); ++i) {
    if (std::tolower(static_cast<unsigned char>(x[i])) !=
        std::tolower(static_cast<unsigned char>(y[i]))) {
      return false;
    }
  }
  return true;
}

}  // namespace

std::string BlasCoreName() { return OrEmpty(openblas_get_corename()); }

std::string BlasConfig() { return OrEmpty(openblas_get_config()); }

bool IsGenericBlasCore(std::string_view core_name) {
  for (std::string_view generic : kGenericCores) {
    if (EqualsIgnoreCase(core_name, generic)) return true;
  }
  return false;
}

std::string BestBlasCoreType() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl")) {
    return "SkylakeX";
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return "Haswell";
#endif
  return "";
}

void PrepareComputeRuntime(int argc, char** argv) {
  // Tensors and wire buffers of several MiB are allocated and freed every
  // step. By default glibc maps such blocks afresh and returns freed memory
  // to the kernel, so every reuse page-faults again (measured: ~28,700 faults
  // per 64 MiB gradient push). Keep them in the heap instead.
  mallopt(M_MMAP_THRESHOLD, 32 << 20);
  mallopt(M_TRIM_THRESHOLD, 1 << 30);
  if (argc < 1 || argv == nullptr || argv[0] == nullptr) return;
  if (std::getenv(kReexecMarker) != nullptr) return;
  bool changed = false;
  std::string core_note;
  if (std::getenv("OPENBLAS_CORETYPE") == nullptr) {
    const std::string core = BlasCoreName();
    const std::string best = BestBlasCoreType();
    if (IsGenericBlasCore(core) && !best.empty() &&
        setenv("OPENBLAS_CORETYPE", best.c_str(), /*overwrite=*/1) == 0) {
      changed = true;
      core_note = core + " -> " + best;
    }
  }
  if (std::getenv("OMP_WAIT_POLICY") == nullptr &&
      setenv("OMP_WAIT_POLICY", "PASSIVE", /*overwrite=*/1) == 0) {
    changed = true;
  }
  if (!changed || setenv(kReexecMarker, "1", /*overwrite=*/1) != 0) return;
  std::fflush(nullptr);
  execv("/proc/self/exe", argv);
  // Only reached when execv failed: carry on with the current settings.
  const int err = errno;
  std::fprintf(stderr, "warning: re-running with a tuned compute environment failed (%s)%s%s\n",
               std::strerror(err), core_note.empty() ? "" : "; BLAS stays on ",
               core_note.empty() ? "" : BlasCoreName().c_str());
}

}  // namespace muonps
