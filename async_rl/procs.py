"""Local child processes of a run: each in its own session (so a signal to the launcher's terminal does not
race the launcher's own shutdown), logging to `run_dir/logs/NAME.log`, optionally pinned to CPU cores.

`ProcessGroup.stop_all` guarantees no orphans: SIGTERM, a grace period, then SIGKILL of each process group.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    critical: bool = True  # its unexpected exit fails the run

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class ProcessGroup:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.children: dict[str, Child] = {}

    def start(self, name: str, module: str, args: list[str], cpus: list[int] | None = None,
              threads: int = 1, critical: bool = True, nice: int = 0) -> Child:
        log = self.log_dir / f"{name}.log"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(threads),
               "MKL_NUM_THREADS": str(threads), "TOKENIZERS_PARALLELISM": "false"}
        cores = [int(c) for c in cpus or []]

        def pin():
            if cores:
                os.sched_setaffinity(0, cores)
            if nice:
                try:
                    os.nice(nice)
                except PermissionError:  # raising priority needs privileges; run at normal priority
                    pass
        with open(log, "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", module, *args], stdout=out, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, env=env, start_new_session=True, preexec_fn=pin)
        child = Child(name, proc, log, critical)
        self.children[name] = child
        return child

    def failed(self) -> Child | None:
        """The first critical child that exited with a non-zero code (or was killed)."""
        for child in self.children.values():
            code = child.proc.poll()
            if child.critical and code is not None and code != 0:
                return child
        return None

    def stop(self, name: str, grace: float = 10.0) -> None:
        self._stop([self.children[name]], grace)

    def stop_all(self, grace: float = 10.0) -> None:
        self._stop(list(self.children.values()), grace)

    @staticmethod
    def _signal(child: Child, sig: int) -> None:
        try:
            os.killpg(child.proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass

    def _stop(self, children: list[Child], grace: float) -> None:
        for child in children:
            if child.proc.poll() is None:
                self._signal(child, signal.SIGTERM)
        deadline = time.monotonic() + grace
        for child in children:
            try:
                child.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for child in children:
            self._signal(child, signal.SIGKILL)  # also reaps grandchildren left in the group
            try:
                child.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
