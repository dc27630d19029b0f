#!/usr/bin/env bash
# Installs the dependencies, builds, runs the whole test suite with ctest,
# then the sanitizer and thread-safety legs (scripts/sanitize.sh) and the
# fuzzing leg (scripts/fuzz.sh).
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
bash scripts/install_deps.sh
echo "install: $((SECONDS - start)) s"
bash scripts/build.sh
echo "build: $((SECONDS - start)) s"
ctest --test-dir build --output-on-failure --timeout 1200 -j 1
echo "main suite: $((SECONDS - start)) s"
# The checking legs: ASan + UBSan over the unit and service suites, the
# lock annotations checked by clang's -Wthread-safety, and ThreadSanitizer
# over the service and cluster suites.
bash scripts/sanitize.sh asan tsa tsan
echo "sanitizer legs: $((SECONDS - start)) s"
# libFuzzer (clang, ASan + UBSan) on the parsers and decoders that read
# hostile bytes, 60 s each from the committed corpus.
bash scripts/fuzz.sh
echo "test command: passed in $((SECONDS - start)) s"
