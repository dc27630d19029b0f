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
# The checking legs: ASan + UBSan over the unit and service suites and the
# lock annotations checked by clang's -Wthread-safety. (The ThreadSanitizer
# leg, scripts/sanitize.sh tsan, runs on its own: reports inside the
# uninstrumented gRPC still appear now and then, see tests/tsan.supp.)
bash scripts/sanitize.sh asan tsa
# libFuzzer (clang, ASan + UBSan) on the parsers and decoders that read
# hostile bytes, 60 s each from the committed corpus.
bash scripts/fuzz.sh
echo "test command: passed in $((SECONDS - start)) s"
