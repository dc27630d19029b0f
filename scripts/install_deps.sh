#!/usr/bin/env bash
# Installs every package muonps needs to build, test and run, from Debian 12's
# archive only. Used by the README, .ci/run and deploy/docker/Dockerfile.cpu,
# so the three cannot drift apart.
#
#   scripts/install_deps.sh            build, run and test dependencies
#   scripts/install_deps.sh --runtime  only what building and running need
#                                      (the container images)
#
# Must run as root (or through sudo). Idempotent.
set -euo pipefail

if [[ $(id -u) -ne 0 ]]; then
  SUDO=sudo
else
  SUDO=
fi

RUNTIME_ONLY=0
if [[ "${1:-}" == "--runtime" ]]; then
  RUNTIME_ONLY=1
fi

PACKAGES=(
  # toolchain
  build-essential cmake ninja-build pkg-config git ca-certificates
  # RPC, serialization, utilities
  libgrpc++-dev protobuf-compiler-grpc libprotobuf-dev protobuf-compiler
  libabsl-dev nlohmann-json3-dev
  # the coordinator's durable job store (--state_dir)
  libsqlite3-dev
  # metrics: the /metrics endpoint of every service
  prometheus-cpp-dev
  # linear algebra: OpenBLAS's OpenMP build; common/gemm.h keeps every call
  # on its calling thread, muonps's own OpenMP loops do the parallel work
  libopenblas-openmp-dev libopenblas0-openmp
  # the default training corpus (plain-text fortune files)
  fortunes fortunes-min
)
TEST_PACKAGES=(
  googletest libgtest-dev libgmock-dev
  # the formatter the Format test enforces (.clang-format), and clang with
  # its OpenMP runtime for the -Wthread-safety leg (scripts/sanitize.sh)
  clang-format clang-14 libomp-14-dev
  # libFuzzer and the sanitizer runtimes for clang (scripts/fuzz.sh)
  libclang-rt-14-dev
  # a real Prometheus server and promtool (metrics and dashboard tests), and
  # a YAML parser for the provisioning files
  prometheus python3-yaml
  # the independent PyTorch reference model (tests) and baseline
  # (bench/train_step), run with /usr/bin/python3
  python3 python3-numpy python3-torch
  # the Python gRPC client test (tests/python). Its stubs come from protoc
  # and grpc_python_plugin (above), not python3-grpc-tools: that package's
  # bundled protoc (3.5.1 in Debian 12) rejects proto3 `optional`
  python3-grpcio
)
if [[ $RUNTIME_ONLY -eq 0 ]]; then
  PACKAGES+=("${TEST_PACKAGES[@]}")
  # Node.js for the proto linter; keep an existing installation.
  if ! command -v npm > /dev/null; then
    PACKAGES+=(nodejs npm)
  fi
fi

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends "${PACKAGES[@]}"

# buf (proto lint, STANDARD rules), pinned, from the npm registry.
if [[ $RUNTIME_ONLY -eq 0 ]]; then
  BUF_PREFIX=/opt/muonps-tools
  if [[ ! -x "$BUF_PREFIX/node_modules/.bin/buf" ]]; then
    $SUDO npm install --silent --no-audit --no-fund --prefix "$BUF_PREFIX" @bufbuild/buf@1.75.0
  fi
  # The Kubernetes manifest test (tests/k8s): API schemas and a YAML parser, pinned.
  if [[ ! -f "$BUF_PREFIX/node_modules/@kubernetes-models/prometheus-operator/package.json" ]]; then
    $SUDO npm install --silent --no-audit --no-fund --prefix "$BUF_PREFIX" \
      kubernetes-models@5.1.0 @kubernetes-models/prometheus-operator@6.0.0 yaml@2.9.1
  fi
  # cert-manager's Issuer and Certificate schemas (the TLS overlay).
  if [[ ! -f "$BUF_PREFIX/node_modules/@kubernetes-models/cert-manager/package.json" ]]; then
    $SUDO npm install --silent --no-audit --no-fund --prefix "$BUF_PREFIX" \
      @kubernetes-models/cert-manager@6.0.0
  fi
fi
