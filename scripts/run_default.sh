#!/usr/bin/env bash
# Installs the dependencies, builds, and trains the default job: the default
# MoE model on Debian's fortunes corpus on a local cluster (a coordinator, 2
# optimizer shards, 1 worker on loopback), with checkpoints in runs/default.
#   scripts/run_default.sh [extra muonps local flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
bash scripts/build.sh
exec build/cli/muonps local --shards 2 --workers 1 examples/default_job.json "$@"
