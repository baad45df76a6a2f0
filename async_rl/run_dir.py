"""The run directory contract (DESIGN.md): run.json manifest, config.yaml, metrics.jsonl, weights/, logs/.

run.json is always replaced atomically, so a reader (`async-rl status`) never sees it half-written.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from pathlib import Path

import yaml


def config_hash(cfg_dict: dict) -> str:
    return hashlib.sha256(yaml.safe_dump(cfg_dict, sort_keys=True).encode()).hexdigest()[:16]


class Manifest:
    def __init__(self, run_dir: Path, cfg_dict: dict):
        self.path = run_dir / "run.json"
        self.data = {"run_dir": str(run_dir.resolve()), "status": "starting", "config_hash": config_hash(cfg_dict),
                     "created": time.time(), "launcher_pid": os.getpid(), "endpoints": {}, "processes": {},
                     "exit_code": None}
        self.write()

    def update(self, **fields) -> None:
        self.data.update(fields)
        self.write()

    def write(self) -> None:
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2))
        os.replace(tmp, self.path)


def read_manifest(run_dir: str | Path) -> dict:
    path = Path(run_dir) / "run.json"
    if not path.exists():
        raise FileNotFoundError(f"--run-dir {run_dir}: no run.json there; is it a run directory?")
    return json.loads(path.read_text())


def pid_alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:  # an exited child nobody has reaped yet (a zombie) is not running
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return True
