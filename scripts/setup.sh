#!/usr/bin/env bash
# Set up async-rl in ./.venv on a fresh CPU machine: bash scripts/setup.sh
# torch goes in first, pinned to the CPU build (an unpinned torch pulls a multi-GB CUDA wheel).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -d .venv ] || "$PY" -m venv .venv
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q "torch==${TORCH_VERSION:-2.13.0}"
python -m pip install -q -e ".[dev,megatron,ray]"  # megatron-core: ~2.6 MB, needs only numpy + packaging; ray ~244 MB
echo "async-rl installed in .venv (activate with: . .venv/bin/activate)"
