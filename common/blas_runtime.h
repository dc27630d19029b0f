// What the BLAS library is running, and a start-up fix for its kernel choice.
//
// OpenBLAS (built with DYNAMIC_ARCH) picks its kernels from the CPU model when
// the library is loaded. Version 0.3.21 does not recognise some current Intel
// Xeon models and then silently falls back to the generic SSE3 "Prescott"
// kernels, several times slower than the AVX-512 ones the CPU supports. The
// choice can only be overridden through OPENBLAS_CORETYPE, which is read when
// the library initialises, i.e. before main() runs.
#ifndef MUONPS_COMMON_BLAS_RUNTIME_H_
#define MUONPS_COMMON_BLAS_RUNTIME_H_

#include <string>
#include <string_view>

namespace muonps {

// The kernel family in use, e.g. "SkylakeX", "Haswell", "Prescott"
// (openblas_get_corename()).
std::string BlasCoreName();

// The library's build configuration (openblas_get_config()).
std::string BlasConfig();

// True when `core_name` (as BlasCoreName() reports it) is one of OpenBLAS's
// generic or pre-AVX x86 fallback kernels (Prescott, Core2, Nehalem, ...),
// compared case-insensitively.
bool IsGenericBlasCore(std::string_view core_name);

// The best OPENBLAS_CORETYPE value this CPU supports: "SkylakeX" when it has
// avx512f, avx512bw, avx512dq and avx512vl; else "Haswell" when it has avx2
// and fma; else "" (nothing better than the generic kernels).
std::string BestBlasCoreType();

// Settles, before any thread or state exists, the two settings that OpenBLAS
// and the OpenMP runtime only read at load time:
// - OPENBLAS_CORETYPE: if the BLAS is running a generic kernel, the variable
//   is unset and the CPU supports a better one (BestBlasCoreType()), it is set.
// - OMP_WAIT_POLICY: PASSIVE unless set. Idle OpenMP threads then sleep
//   instead of spinning; spinning threads make a shared or oversubscribed
//   machine (a local cluster, a CI box) up to 30x slower.
// When either changed, the process replaces itself with a fresh copy
// (/proc/self/exe, same argv); an environment marker prevents a second
// attempt, so this never loops. Returns normally when nothing needed changing
// or the re-exec failed (a warning is printed and the process continues).
// Call first thing in main(): on success nothing after the call runs in this
// process image.
void PrepareComputeRuntime(int argc, char** argv);

}  // namespace muonps

#endif  // MUONPS_COMMON_BLAS_RUNTIME_H_
