#!/usr/bin/env bash
# Installs every package muonps needs to build, test and run, from Debian 12's
# archive only. Used by the README, .ci/run and deploy/docker/Dockerfile.cpu,
# so the three cannot drift apart.
#
#   scripts/install_deps.sh          build + run + test dependencies
#
# Must run as root (or through sudo). Idempotent.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  SUDO=sudo
else
  SUDO=
fi

PACKAGES=(
  # toolchain
  build-essential cmake ninja-build pkg-config git ca-certificates
  # RPC, serialization, utilities
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev nlohmann-json3-dev
  # linear algebra: OpenBLAS built on OpenMP, so BLAS and our own kernels share one thread pool
  libopenblas-openmp-dev libopenblas0-openmp
  # tests and benchmarks
  googletest libgtest-dev libgmock-dev
  # the default training corpus (plain-text fortune files)
  fortunes fortunes-min
  # the independent PyTorch reference model (tests) and baseline (bench/train_step),
  # run with /usr/bin/python3
  python3 python3-numpy python3-torch
)

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"
