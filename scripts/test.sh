#!/usr/bin/env bash
# Installs the dependencies, builds, and runs the whole test suite with ctest.
# This is the README's test command and what CI runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
bash scripts/build.sh
ctest --test-dir build --output-on-failure --timeout 1200 -j 1
