#!/usr/bin/env bash
# The CPU quickstart: build the tiny model + addition task (SFT warm start), then train it with async GRPO.
#   bash scripts/quickstart.sh [key=value overrides ...]
set -euo pipefail
cd "$(dirname "$0")/.."
. .venv/bin/activate
python scripts/build_tiny.py --out runs/tiny
async-rl launch configs/quickstart.yaml "$@" --run-dir "runs/quickstart-$(date +%Y%m%d-%H%M%S)"
