#!/usr/bin/env bash
# Installs the dependencies, builds, and trains the default job: the default
# MoE model on Debian's fortunes corpus, with a checkpoint in runs/default.
#   scripts/run_default.sh [extra muonps train flags...]
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install_deps.sh
bash scripts/build.sh
exec build/cli/muonps train examples/default_job.json "$@"
