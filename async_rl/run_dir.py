"""The run directory contract (DESIGN.md): run.json manifest, config.yaml, metrics.jsonl, weights/, logs/.

run.json is always replaced atomically, so a reader (`async-rl status`) never sees it half-written.
One launcher at a time owns a run directory: it holds an exclusive flock on `run_dir/launch.lock` (the file
names its pid) for the run's whole life, taken before it writes anything there, so a second `launch` or
`--resume` of a live run is refused and touches nothing. The kernel drops the lock when the launcher dies,
however it dies, so a crashed run never stays locked.
"""
from __future__ import annotations

import fcntl
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


class RunDirBusy(RuntimeError):
    """Another live launcher holds the run directory."""


def lock_run_dir(run_dir: Path) -> int:
    """Take the run directory's lock (creating the directory); returns the fd, held until closed or exit.
    Raises RunDirBusy naming the launcher that holds it."""
    run_dir.mkdir(parents=True, exist_ok=True)
    fd = os.open(run_dir / "launch.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
        os.close(fd)
        if not holder.isdigit():  # it has the lock but has not written its pid yet
            try:
                holder = str(read_manifest(run_dir).get("launcher_pid", "?"))
            except (OSError, ValueError):
                holder = "?"
        raise RunDirBusy(f"--run-dir {run_dir}: a run is live there (launcher pid {holder}); nothing was changed. "
                         f"`async-rl stop --run-dir {run_dir}` ends it (then --resume continues it), or pick "
                         f"another --run-dir") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd
