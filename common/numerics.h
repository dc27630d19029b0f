// The numerics of this process, and the check that keeps a cluster on one.
//
// Bit-identity across processes needs more than the same code: OpenBLAS picks
// a kernel family per CPU (Haswell, Zen, SkylakeX, Sandybridge, ...), each
// with its own instruction mix and blocking, and the C library picks
// FMA or non-FMA variants of exp, log, pow, sin and cos. Two processes whose
// choices differ give different last bits for the same product.
//
// Rather than list what could differ, every process runs one fixed probe
// computation at start-up (products of the shapes the models use through
// common/gemm.h, and the library functions the kernels call) and hashes the
// bits of its results: the fingerprint. Equal fingerprints mean the kernels
// round alike on every shape the probe covers; the coordinator refuses a
// member whose fingerprint is not its own, naming both kernels, before the
// member computes anything.
//
// Which kernel a process runs is settled at start-up by
// PrepareComputeRuntime (common/blas_runtime.h): by default every CPU with
// AVX2 and FMA runs OpenBLAS's Haswell kernels, so Intel and AMD machines of a
// node pool agree.
#ifndef MUONPS_COMMON_NUMERICS_H_
#define MUONPS_COMMON_NUMERICS_H_

#include <cstdint>
#include <string>

#include "absl/status/status.h"
#include "muonps/v1/job.pb.h"

namespace muonps {

// The version string muonps reports ("0.1.0").
const char* MuonpsVersion();

// 64-bit hash of the probe computation's result bits (about 30 ms; the
// products run on the calling thread's ParallelFor pool).
uint64_t ComputeNumericsFingerprint();

// This process's profile: kernel, library configuration, version and the
// fingerprint as 16 hex digits. Computed on first use, then cached.
// Thread-safe.
const v1::NumericsProfile& LocalNumerics();

// "BLAS kernel Haswell, fingerprint 0123456789abcdef" (the version too when
// it is not this build's).
std::string DescribeNumerics(const v1::NumericsProfile& profile);

// True when both have the same non-empty fingerprint and version.
bool SameNumerics(const v1::NumericsProfile& a, const v1::NumericsProfile& b);

// OK when `member` computes as `reference` does; otherwise
// FailedPrecondition: "<who> computes with <member>, but <reference_name>
// computes with <reference>: ..." with a hint on how to align them. An empty
// member profile (a client that sent none) is refused the same way.
absl::Status CheckSameNumerics(const v1::NumericsProfile& member, const std::string& who,
                               const v1::NumericsProfile& reference,
                               const std::string& reference_name);

// What a resume from a checkpoint computed with `saved` (possibly empty: an
// older checkpoint) says when this process computes otherwise: the
// continuation is valid but not bit-identical to an uninterrupted run.
std::string ResumeNumericsNote(const v1::NumericsProfile& saved);

}  // namespace muonps

#endif  // MUONPS_COMMON_NUMERICS_H_
