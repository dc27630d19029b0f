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
#include <vector>

#include "absl/status/status.h"

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

// OpenBLAS's threading model (openblas_get_parallel()): 0 single-threaded,
// 1 pthreads, 2 OpenMP.
int BlasParallelMode();

// OK when the BLAS library is the OpenMP build whose threading common/gemm.h
// controls (one thread per call); FailedPrecondition naming the build in use
// otherwise (e.g. when LD_LIBRARY_PATH swapped in the pthreads build, whose
// threads Sgemm cannot pin, or the single-threaded one, which is not safe to
// call from several threads at once).
absl::Status CheckBlasRuntime();

// The OpenBLAS kernel families this CPU can execute, from the oldest:
// "Prescott" (SSE3), "Sandybridge" (AVX), "Haswell" and "Zen" (AVX2 + FMA),
// "SkylakeX" (AVX-512 F/BW/DQ/VL).
std::vector<std::string> RunnableBlasCores();

// The OPENBLAS_CORETYPE value that `request` (a --blas_core value) asks for
// on this CPU, "" for OpenBLAS's own choice:
//   "portable": "Haswell" when the CPU has AVX2 and FMA (every such x86-64
//               CPU, Intel or AMD, runs it with the same bits), else "";
//   "native":   "", i.e. the kernel OpenBLAS picks for this CPU;
//   otherwise:  the name itself (an OpenBLAS kernel family).
// InvalidArgument when the name needs instructions this CPU lacks.
absl::Status ResolveBlasCoreRequest(const std::string& request, std::string* core_type);

// The best OPENBLAS_CORETYPE value this CPU supports: "SkylakeX" when it has
// avx512f, avx512bw, avx512dq and avx512vl; else "Haswell" when it has avx2
// and fma; else "" (nothing better than the generic kernels).
std::string BestBlasCoreType();

// Settles, before any thread or state exists, the two settings that OpenBLAS
// and the OpenMP runtime only read at load time:
// - OPENBLAS_CORETYPE, the kernel family. The request is, in order, the
//   --blas_core flag on the command line, MUONPS_BLAS_CORE, an
//   OPENBLAS_CORETYPE already set, else "portable" (see
//   ResolveBlasCoreRequest). When the kernel in use is not the one asked
//   for, the variable is set. With "native", a generic fallback kernel on a
//   CPU that supports a better one is replaced by BestBlasCoreType(). A
//   request the CPU cannot run ends the process with status 2 and a message.
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
