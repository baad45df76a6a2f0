#!/usr/bin/env bash
# TEST HARNESS, not a product path: install SGLang into ./.venv-sglang so that it runs on this CPU-only
# machine, for the engine contract tests (tests/actors/test_engine_contract.py). Production SGLang runs on
# GPUs with its own pinned torch/CUDA stack (`pip install .[sglang]`).
#
#   bash scripts/sglang_cpu/setup.sh            # ~2-3 min on a fresh machine, ~3.4 GB; a no-op when present
#
# How (../shared/ENVIRONMENT.md, "SGLang on CPU"): sglang with --no-deps, then its requirements minus the
# CUDA-only ones, with torch pinned to the CPU build; torchvision without deps and its CUDA-only meta
# registrations neutralised; a stub `sgl_kernel` (scripts/sglang_cpu/stubs) that only satisfies imports.
# scripts/sglang_cpu/launch.sh sets SGLANG_USE_CPU_ENGINE=1 and the stub path at server start.
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV=${SGLANG_VENV:-.venv-sglang}
SGLANG_VERSION=${SGLANG_VERSION:-0.5.23}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}
MARKER="$VENV/.async-rl-harness-$SGLANG_VERSION"
if [ -f "$MARKER" ]; then echo "sglang harness already in $VENV"; exit 0; fi
PY=${PYTHON:-python3}
[ -d "$VENV" ] || "$PY" -m venv "$VENV"
PIP="$VENV/bin/python -m pip"
$PIP install -q --upgrade pip packaging
$PIP install -q "torch==$TORCH_VERSION"
$PIP install -q --no-deps "sglang==$SGLANG_VERSION"
# its requirements, less the CUDA-only packages (they cannot install or import here)
"$VENV/bin/python" - > /tmp/sglang-reqs-$$.txt <<'PYEOF'
import re
from importlib.metadata import requires
from packaging.requirements import Requirement
CUDA_ONLY = re.compile(r"^(torch|torchaudio|torchvision|torchcodec|sglang-kernel|flashinfer.*|flash-attn-4|cuda-python|"
                       r"nvidia-.*|nvshmem4py.*|sgl-deep-ep|sgl-deep-gemm|sgl-flash-mla|tilelang|quack-kernels|"
                       r"humming-kernels|apache-tvm-ffi|torch-memory-saver|torch_memory_saver)$", re.I)
for line in requires("sglang") or []:
    req = Requirement(line)
    if req.marker is not None and not req.marker.evaluate({"extra": ""}):
        continue
    if CUDA_ONLY.match(req.name.replace("_", "-")) or CUDA_ONLY.match(req.name):
        continue
    req.marker = None
    print(req)
PYEOF
echo "torch==$TORCH_VERSION" > /tmp/sglang-constraints-$$.txt
$PIP install -q -r /tmp/sglang-reqs-$$.txt -c /tmp/sglang-constraints-$$.txt
rm -f /tmp/sglang-reqs-$$.txt /tmp/sglang-constraints-$$.txt
# sglang imports torchvision.transforms at start; PyPI's torchvision registers CUDA-build meta ops that fail
# beside CPU torch, so install it without deps and empty that module.
$PIP install -q --no-deps torchvision
META=$("$VENV/bin/python" -c "import importlib.util as u, os; print(os.path.join(os.path.dirname(u.find_spec('torchvision').origin), '_meta_registrations.py'))")
echo "# neutralised by scripts/sglang_cpu/setup.sh (CUDA-build meta registrations fail beside CPU torch)" > "$META"
touch "$MARKER"
echo "sglang $SGLANG_VERSION harness installed in $VENV"
