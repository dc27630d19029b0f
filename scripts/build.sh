#!/usr/bin/env bash
# Configures and builds muonps (Release, Ninja) into ./build.
# The CUDA target is compiled too when nvcc is present (sm_90).
#   scripts/build.sh [extra cmake args...]
set -euo pipefail
cd "$(dirname "$0")/.."
cmake -S . -B build -G Ninja -DCMAKE_BUILD_TYPE=Release -DMUONPS_WERROR="${MUONPS_WERROR:-ON}" "$@"
cmake --build build -j "$(nproc)"
