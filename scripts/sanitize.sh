#!/usr/bin/env bash
# The checking legs of the test command (scripts/test.sh runs both), each in
# a build directory of its own (Release with line tables, no benchmarks, no
# CUDA):
#   asan     GCC with ASan + UBSan (MUONPS_SANITIZE=address,undefined, no
#            recovery): the unit and service suites
#   tsa      clang 14 with -Wthread-safety -Werror=thread-safety: every
#            ABSL_GUARDED_BY / ABSL_EXCLUSIVE_LOCKS_REQUIRED annotation
#            checked (compile only)
#
#   scripts/sanitize.sh [asan] [tsa]     (default: both)
set -euo pipefail
cd "$(dirname "$0")/.."
legs=("$@")
[[ ${#legs[@]} -eq 0 ]] && legs=(asan tsa)
common=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DMUONPS_BUILD_BENCH=OFF -DMUONPS_CUDA=OFF)
for leg in "${legs[@]}"; do
  start=$SECONDS
  case "$leg" in
    asan)
      cmake -S . -B build-asan "${common[@]}" -DMUONPS_WERROR=ON -DMUONPS_SANITIZE=address,undefined \
        -DCMAKE_CXX_FLAGS=-g1 > /dev/null
      cmake --build build-asan -j "$(nproc)"
      # Unit and service suites; the whole-cluster, learning-curve and
      # external-tool tests run in the main leg.
      ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
        ctest --test-dir build-asan --output-on-failure --timeout 1200 -j 1 \
        -E 'ClusterTest|ClusterLayoutTest|LearningTest|ModelReferenceTest|PythonClient|KubernetesManifests|PrometheusDashboard|ProtoLint|Format|Layering|BlasKernels'
      ;;
    tsa)
      cmake -S . -B build-tsa "${common[@]}" -DMUONPS_BUILD_TESTS=OFF \
        -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 \
        "-DCMAKE_CXX_FLAGS=-Wthread-safety -Werror=thread-safety" > /dev/null
      cmake --build build-tsa -j "$(nproc)"
      ;;
    *)
      echo "unknown leg '$leg' (asan, tsa)" >&2
      exit 2
      ;;
  esac
  echo "leg $leg: passed in $((SECONDS - start)) s"
done
