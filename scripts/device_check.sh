#!/usr/bin/env bash
# The GPU check, for a machine with an NVIDIA GPU (CUDA 13, the packages of
# scripts/install_deps.sh installed): builds the CUDA path, runs the GPU
# tests, and prints the table of bench/cuda_step (tokens/s and model FLOP
# utilisation of the default and small presets on one GPU, the same slot
# on the CPU, Newton-Schulz against a cuBLAS GEMM of the same FLOPs).
#   scripts/device_check.sh LOG_DIR
# Everything it prints is also kept under LOG_DIR. Exits non-zero when the
# build or a GPU test fails, or when a GPU test was skipped although a GPU
# is visible. Meant to finish in a few minutes on one H100/H200.
set -euo pipefail
cd "$(dirname "$0")/.."
log=${1:?usage: scripts/device_check.sh LOG_DIR}
mkdir -p "$log"
log=$(cd "$log" && pwd)
start=$SECONDS
{
  echo "== device"
  nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv || echo "nvidia-smi failed"
  nvcc --version | tail -1 || true
} 2>&1 | tee "$log/device.txt"

echo "== build (CUDA target, sm_${CUDA_ARCHITECTURES:-90})"
cmake -S . -B build-gpu -G Ninja -DCMAKE_BUILD_TYPE=Release -DMUONPS_CUDA=ON \
  -DCMAKE_CUDA_ARCHITECTURES="${CUDA_ARCHITECTURES:-90}" -DMUONPS_PCH=OFF > "$log/configure.txt" 2>&1
cmake --build build-gpu -j "$(nproc)" --target cuda_ops_test cuda_backend_test coordinator_job_test \
  bench_cuda_step muonps > "$log/build.txt" 2>&1 || { tail -40 "$log/build.txt"; exit 1; }
echo "build: $((SECONDS - start)) s"

echo "== GPU tests"
status=0
for gpu_test in cuda_ops_test cuda_backend_test; do
  ./build-gpu/tests/$gpu_test 2>&1 | tee "$log/$gpu_test.txt" || status=1
  if grep -q "SKIPPED \]" "$log/$gpu_test.txt"; then
    echo "device_check: GPU tests ($gpu_test) were skipped on a machine that should have a GPU"
    status=1
  fi
done
# The worker's backend wiring, end to end on the CPU path (no GPU needed).
./build-gpu/tests/coordinator_job_test --gtest_filter='*InjectedBackend*' 2>&1 |
  tee "$log/coordinator_job_test.txt" | tail -3 || status=1
echo "tests: $((SECONDS - start)) s"

echo "== table"
./build-gpu/bench/cuda_step 2>&1 | tee "$log/cuda_step.txt" || status=1
echo "device_check: $((SECONDS - start)) s, status $status"
exit $status
