"""Weight publication: version v is written as a complete HF checkpoint (safetensors + config + tokenizer)
to `run_dir/weights/v{v}`, atomically (written to a temp dir, then renamed), so a reader never sees a
half-written version. Only the newest `keep` versions stay on disk.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path


def publish(model, tokenizer, run_dir: str | Path, version: int, keep: int) -> Path:
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # one "Writing model shards" bar per version floods the learner's log
    root = Path(run_dir) / "weights"
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"v{version}"
    tmp = root / f".v{version}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    prune(root, keep)
    return final


def prune(root: Path, keep: int) -> None:
    versions = sorted((int(p.name[1:]), p) for p in root.glob("v*") if p.name[1:].isdigit())
    for _, path in versions[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
