"""The Megatron learner's tests share tests/learners' synthetic batches; its CPU shim is test-only."""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # synthetic_groups
sys.path.insert(0, str(Path(__file__).resolve().parent))  # cpu_shim, mp_workers

