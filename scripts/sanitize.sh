#!/usr/bin/env bash
# The checking legs (scripts/test.sh runs all three), each
# in a build directory of its own (Release with line tables, no benchmarks, no
# CUDA):
#   asan     GCC with ASan + UBSan (MUONPS_SANITIZE=address,undefined, no
#            recovery): the unit and service suites
#   tsa      clang 14 with -Wthread-safety -Werror=thread-safety: every
#            ABSL_GUARDED_BY / ABSL_EXCLUSIVE_LOCKS_REQUIRED annotation
#            checked (compile only, -O0: nothing runs, so nothing is
#            optimised)
#   tsan     GCC with ThreadSanitizer (MUONPS_SANITIZE=thread): the service
#            and cluster suites (but the cluster tests about bits alone), with
#            the muonps processes the cluster tests start instrumented too. Any report, in a test or in one of its
#            child processes, fails the leg. Debian's libgomp, gRPC,
#            protobuf and abseil are not instrumented: ParallelFor runs
#            serially in this build (common/parallel.h), absl::Mutex is
#            annotated at link time (common/absl_mutex_tsan.cc), callback
#            reactors annotate the order of their reactions
#            (rpc/reaction_order.h), and tests/tsan.supp names the reports
#            inside gRPC and abseil that TSan cannot judge.
#
#   scripts/sanitize.sh [asan] [tsa] [tsan]     (default: all three)
set -euo pipefail
cd "$(dirname "$0")/.."
legs=("$@")
[[ ${#legs[@]} -eq 0 ]] && legs=(asan tsa tsan)
common=(-G Ninja -DCMAKE_BUILD_TYPE=Release -DMUONPS_BUILD_BENCH=OFF -DMUONPS_CUDA=OFF)
for leg in "${legs[@]}"; do
  start=$SECONDS
  case "$leg" in
    asan)
      # Unit and service suites; the whole-cluster (process) tests, TLS
      # clusters included, the learning-curve and external-tool tests run in
      # the main leg. Only the test binaries that define a suite of the leg
      # are built (and muonps, which the command-line tests run).
      skip='ClusterTest|ClusterLayoutTest|ClusterChaosTest|TlsTest|LearningTest|ModelReferenceTest'
      binaries=()
      for f in tests/*_test.cc; do
        if grep -oE '^TEST(_F|_P)?\([A-Za-z0-9_]+,' "$f" | sed -E 's/^TEST(_F|_P)?\(//; s/,$//' |
          grep -qvxE "(${skip})"; then
          binaries+=("$(basename "$f" .cc)")
        fi
      done
      # -O1, as the ASan documentation advises: about half of -O3's compile
      # time, and the suites it runs take about a minute either way.
      cmake -S . -B build-asan "${common[@]}" -DMUONPS_WERROR=ON -DMUONPS_SANITIZE=address,undefined \
        -DCMAKE_CXX_FLAGS=-g1 "-DCMAKE_CXX_FLAGS_RELEASE=-O1 -DNDEBUG" > /dev/null
      cmake --build build-asan -j "$(nproc)" --target muonps "${binaries[@]}"
      ASAN_OPTIONS=detect_leaks=1:abort_on_error=0 UBSAN_OPTIONS=print_stacktrace=1 \
        ctest --test-dir build-asan --output-on-failure --timeout 1200 -j 1 \
        -E "${skip}|_NOT_BUILT|PythonClient|KubernetesManifests|PrometheusDashboard|ProtoLint|Format|Layering|BlasKernels"
      ;;
    tsa)
      cmake -S . -B build-tsa "${common[@]}" -DMUONPS_BUILD_TESTS=OFF \
        -DCMAKE_C_COMPILER=clang-14 -DCMAKE_CXX_COMPILER=clang++-14 -DCMAKE_CXX_FLAGS_RELEASE=-O0 \
        "-DCMAKE_CXX_FLAGS=-Wthread-safety -Werror=thread-safety" > /dev/null
      cmake --build build-tsa -j "$(nproc)"
      ;;
    tsan)
      # The suites by name (a suite may move between test files); the test
      # binaries to build are the files that define them.
      suites='ShardServiceTest|CoordinatorTest|CoordinatorStoreTest|GrpcServerTest|ClusterTest'
      # Cluster tests about bits rather than concurrency (resuming across
      # numerics and kernels, directory rules) run in the main leg only.
      unraced='ClusterTest\.(ResumeFromTrainCheckpoint|TrainResumesFromClusterCheckpoint|ShardOnAnotherBlasKernel|ResumeUnderOtherNumerics|CheckpointsNeverTouchDirectories)'
      mapfile -t binaries < <(grep -lE "^TEST(_F|_P)?\\((${suites})[A-Za-z0-9_]*," tests/*_test.cc |
        xargs -n 1 basename | sed 's/\.cc$//')
      [[ ${#binaries[@]} -gt 0 ]] || { echo "tsan: no test file defines $suites" >&2; exit 1; }
      cmake -S . -B build-tsan "${common[@]}" -DMUONPS_WERROR=ON -DMUONPS_SANITIZE=thread \
        -DCMAKE_CXX_FLAGS=-g1 > /dev/null
      cmake --build build-tsan -j "$(nproc)" --target muonps "${binaries[@]}"
      # Every instrumented process writes its reports to a file of its own
      # under $reports: the cluster tests SIGKILL their services at the end,
      # so a report in a coordinator, shard or worker would otherwise go
      # unnoticed. halt_on_error stops a process at its first report;
      # ignore_noninstrumented_modules leaves the memcpy, free, epoll and
      # other libc calls made inside the uninstrumented gRPC, protobuf,
      # abseil and libstdc++ libraries to those libraries; history_size=4
      # keeps both stacks of a report over longer runs (4 MiB per thread).
      reports="$PWD/build-tsan/tsan-reports"
      rm -rf "$reports"
      mkdir -p "$reports"
      status=0
      TSAN_OPTIONS="halt_on_error=1:exitcode=66:second_deadlock_stack=1:history_size=4:ignore_noninstrumented_modules=1:suppressions=$PWD/tests/tsan.supp:log_path=$reports/tsan" \
        ctest --test-dir build-tsan --output-on-failure --timeout 1200 -j 1 \
        -R "^([A-Za-z0-9_]+/)?(${suites})\\." -E "^${unraced}" || status=$?
      if compgen -G "$reports/tsan.*" > /dev/null; then
        for f in "$reports"/tsan.*; do
          echo "---- $f"
          cat "$f"
        done
        echo "tsan: ThreadSanitizer reports above (in $reports)" >&2
        exit 1
      fi
      [[ $status -eq 0 ]] || exit "$status"
      ;;
    *)
      echo "unknown leg '$leg' (asan, tsa, tsan)" >&2
      exit 2
      ;;
  esac
  echo "leg $leg: passed in $((SECONDS - start)) s"
done
