#!/usr/bin/env bash
# Reruns the determinism suites once per OpenBLAS kernel this CPU can execute
# (as `muonps numerics` lists them: Prescott, Sandybridge, Haswell, Zen, and
# SkylakeX where AVX-512 exists), each forced with OPENBLAS_CORETYPE: every
# BLAS entry point bit-equal at 1, 2 and 3 threads from any thread, the
# optimizer's golden and thread-count tests, and whole training runs at
# different thread counts. Then prints the fingerprint of every kernel, so a
# log shows which kernels agree with which.
#
#   tests/blas_kernels.sh MUONPS_BINARY TEST_BINARY_DIR
set -euo pipefail
muonps=$1
dir=$2
unset MUONPS_BLAS_CORE
cores=$("$muonps" numerics | awk '/^runnable kernels/ { for (i = 3; i <= NF; i++) print $i }')
if [[ -z "$cores" ]]; then
  echo "muonps numerics listed no runnable kernel" >&2
  exit 1
fi
for core in $cores; do
  echo "=== OPENBLAS_CORETYPE=$core"
  export OPENBLAS_CORETYPE=$core
  "$dir/blas_determinism_test" --gtest_brief=1
  "$dir/optimizer_test" --gtest_brief=1 --gtest_filter='OptimizerDeterminism.*:OptimizerGolden.*'
  "$dir/trainer_test" --gtest_brief=1 --gtest_filter='*ThreadCountDoesNotChangeTheResult*'
done
unset OPENBLAS_CORETYPE
echo "=== fingerprints"
for core in $cores; do
  "$muonps" numerics --blas_core="$core" | awk -v core="$core" '/^fingerprint/ { print core, $2 }'
done
