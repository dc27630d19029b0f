#include "common/blas_runtime.h"

#include <cblas.h>
#include <malloc.h>
#include <unistd.h>

#include <array>
#include <cctype>
#include <cerrno>
#include <cstdio>
#include <cstdlib>
#include <cstring>

#include "absl/strings/str_cat.h"

namespace muonps {
namespace {

// Set just before the re-exec, to the kernel asked for ("-" for none).
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

bool CpuHas(const char* feature) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  // __builtin_cpu_supports needs a string literal: dispatch on the few we use.
  if (std::strcmp(feature, "avx") == 0) return __builtin_cpu_supports("avx");
  if (std::strcmp(feature, "avx2") == 0) return __builtin_cpu_supports("avx2");
  if (std::strcmp(feature, "fma") == 0) return __builtin_cpu_supports("fma");
  if (std::strcmp(feature, "sse3") == 0) return __builtin_cpu_supports("sse3");
  if (std::strcmp(feature, "avx512") == 0) {
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
  }
#endif
  return false;
}

// The value of --blas_core on the command line ("--blas_core=X" or
// "--blas_core X"), or "" when absent. Flags are parsed later by abseil;
// this runs before, because the kernel must be chosen before the library
// initialises.
std::string BlasCoreFlag(int argc, char** argv) {
  std::string value;
  for (int i = 1; i < argc; ++i) {
    const std::string_view arg = argv[i];
    if (arg == "--") break;
    for (std::string_view prefix : {"--blas_core=", "-blas_core="}) {
      if (arg.substr(0, prefix.size()) == prefix) value = std::string(arg.substr(prefix.size()));
    }
    if ((arg == "--blas_core" || arg == "-blas_core") && i + 1 < argc) value = argv[i + 1];
  }
  return value;
}

}  // namespace

int BlasParallelMode() { return openblas_get_parallel(); }

absl::Status CheckBlasRuntime() {
  const int mode = BlasParallelMode();
  if (mode == 2) return absl::OkStatus();
  return absl::FailedPreconditionError(absl::StrCat(
      "the BLAS library in use is OpenBLAS's ", mode == 0 ? "single-threaded" : "pthreads",
      " build (", BlasConfig(),
      "); muonps needs the OpenMP build (Debian: libopenblas0-openmp), which it keeps on one "
      "thread per call so that results do not depend on the thread count. Is LD_LIBRARY_PATH "
      "pointing at another libopenblas?"));
}

std::vector<std::string> RunnableBlasCores() {
  std::vector<std::string> cores;
  if (CpuHas("sse3")) cores.emplace_back("Prescott");
  if (CpuHas("avx")) cores.emplace_back("Sandybridge");
  if (CpuHas("avx2") && CpuHas("fma")) {
    cores.emplace_back("Haswell");
    cores.emplace_back("Zen");
  }
  if (CpuHas("avx512")) cores.emplace_back("SkylakeX");
  return cores;
}

absl::Status ResolveBlasCoreRequest(const std::string& request, std::string* core_type) {
  core_type->clear();
  if (request.empty() || EqualsIgnoreCase(request, "native")) return absl::OkStatus();
  if (EqualsIgnoreCase(request, "portable")) {
    if (CpuHas("avx2") && CpuHas("fma")) *core_type = "Haswell";
    return absl::OkStatus();
  }
  // Kernels that need more than SSE3, by the instructions they use.
  struct Need {
    std::string_view core;
    const char* feature;
    const char* name;
  };
  constexpr Need kNeeds[] = {{"Sandybridge", "avx", "AVX"},
                             {"Haswell", "avx2", "AVX2"},
                             {"Zen", "avx2", "AVX2"},
                             {"SkylakeX", "avx512", "AVX-512"},
                             {"Cooperlake", "avx512", "AVX-512"},
                             {"SapphireRapids", "avx512", "AVX-512"}};
  for (const Need& need : kNeeds) {
    if (EqualsIgnoreCase(request, need.core) && !CpuHas(need.feature)) {
      return absl::InvalidArgumentError(absl::StrCat("blas_core: kernel ", request, " needs ",
                                                     need.name, ", which this CPU lacks"));
    }
  }
  *core_type = request;
  return absl::OkStatus();
}

std::string BlasCoreName() { return OrEmpty(openblas_get_corename()); }

std::string BlasConfig() { return OrEmpty(openblas_get_config()); }

bool IsGenericBlasCore(std::string_view core_name) {
  for (std::string_view generic : kGenericCores) {
    if (EqualsIgnoreCase(core_name, generic)) return true;
  }
  return false;
}

std::string BestBlasCoreType() {
  if (CpuHas("avx512")) return "SkylakeX";
  if (CpuHas("avx2") && CpuHas("fma")) return "Haswell";
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
  bool changed = false;
  std::string core_note;
  std::string request = BlasCoreFlag(argc, argv);
  if (request.empty()) request = OrEmpty(std::getenv("MUONPS_BLAS_CORE"));
  if (request.empty()) request = OrEmpty(std::getenv("OPENBLAS_CORETYPE"));
  if (request.empty()) request = "portable";
  std::string want;
  if (absl::Status st = ResolveBlasCoreRequest(request, &want); !st.ok()) {
    std::fprintf(stderr, "muonps: error: %s\n", std::string(st.message()).c_str());
    std::exit(2);
  }
  const std::string core = BlasCoreName();
  if (want.empty() && IsGenericBlasCore(core)) want = BestBlasCoreType();
  // The marker holds the kernel the last re-exec asked for. Seeing it with
  // the same request means this process is that re-executed copy (or a child
  // of one) and must not loop; a child asked for another kernel may re-exec.
  const std::string marker_value = want.empty() ? "-" : want;
  const char* marker = std::getenv(kReexecMarker);
  const bool tried = marker != nullptr && marker_value == marker;
  if (!want.empty() && !EqualsIgnoreCase(core, want) &&
      setenv("OPENBLAS_CORETYPE", want.c_str(), /*overwrite=*/1) == 0) {
    changed = true;
    core_note = core + " -> " + want;
  }
  if (std::getenv("OMP_WAIT_POLICY") == nullptr &&
      setenv("OMP_WAIT_POLICY", "PASSIVE", /*overwrite=*/1) == 0) {
    changed = true;
  }
  if (changed && tried) {
    if (!core_note.empty()) {
      std::fprintf(stderr, "warning: OpenBLAS runs its %s kernel, not the requested %s\n",
                   core.c_str(), want.c_str());
    }
    return;
  }
  if (!changed || setenv(kReexecMarker, marker_value.c_str(), /*overwrite=*/1) != 0) return;
  std::fflush(nullptr);
  execv("/proc/self/exe", argv);
  // Only reached when execv failed: carry on with the current settings.
  const int err = errno;
  std::fprintf(stderr, "warning: re-running with a tuned compute environment failed (%s)%s%s\n",
               std::strerror(err), core_note.empty() ? "" : "; BLAS stays on ",
               core_note.empty() ? "" : BlasCoreName().c_str());
}

}  // namespace muonps
