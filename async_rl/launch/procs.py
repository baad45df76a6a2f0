"""Local child processes of a run: each in its own session (so a signal to the launcher's terminal does not
race the launcher's own shutdown), logging to `run_dir/logs/NAME.log`, optionally pinned to CPU cores.

`ProcessGroup.stop_all` guarantees no orphans: SIGTERM, a grace period, then SIGKILL of each process group;
setting `hurry` (a second Ctrl-C, from a signal handler) cuts the grace period short, never the SIGKILL.
`ProcessGroup.respawn` starts a dead child again with the command line, cores and priority it first had (the
launcher's supervisor decides when; `RestartPolicy` how often and after what backoff).
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Child:
    name: str
    proc: subprocess.Popen
    log: Path
    critical: bool = True  # its unexpected exit fails the run
    argv: list[str] = field(default_factory=list)  # how it was started, so respawn can do it again
    cpus: list[int] = field(default_factory=list)
    threads: int = 1
    nice: int = 0
    restarts: int = 0
    env: dict = field(default_factory=dict)  # added to the launcher's environment (CUDA_VISIBLE_DEVICES)

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


class ProcessGroup:
    def __init__(self, log_dir: Path):
        self.log_dir = log_dir
        self.children: dict[str, Child] = {}
        self.env: dict[str, dict] = {}  # child name -> environment it gets on top of the launcher's
        self.hurry = False  # set from a signal handler: stop waiting out the grace period, SIGKILL now

    def start(self, name: str, module: str, args: list[str], cpus: list[int] | None = None,
              threads: int = 1, critical: bool = True, nice: int = 0) -> Child:
        return self.start_command(name, [sys.executable, "-m", module, *args], cpus, threads, critical, nice)

    def start_command(self, name: str, argv: list[str], cpus: list | None = None, threads: int = 1,
                      critical: bool = True, nice: int = 0) -> Child:
        """Start `argv` as child `name` (a full command line: an SGLang server runs under its own Python)."""
        child = Child(name, None, self.log_dir / f"{name}.log", critical, list(argv),  # type: ignore[arg-type]
                      [int(c) for c in cpus or []], threads, nice, env=dict(self.env.get(name, {})))
        child.proc = self._popen(child)
        self.children[name] = child
        return child

    def respawn(self, name: str, extra_args: list[str] = ()) -> Child:
        """Start the (dead) child `name` again the way it was first started, plus `extra_args`."""
        child = self.children[name]
        self._signal(child, signal.SIGKILL)  # whatever the dead leader left in its process group
        child.argv = child.argv + [a for a in extra_args if a not in child.argv]
        child.restarts += 1
        child.proc = self._popen(child)
        return child

    @staticmethod
    def _popen(child: Child) -> subprocess.Popen:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": str(child.threads),
               "MKL_NUM_THREADS": str(child.threads), "TOKENIZERS_PARALLELISM": "false", **child.env}
        cores, nice = child.cpus, child.nice

        def pin():
            if cores:
                os.sched_setaffinity(0, cores)
            if nice:
                try:
                    os.nice(nice)
                except PermissionError:  # raising priority needs privileges; run at normal priority
                    pass
        with open(child.log, "ab") as out:
            return subprocess.Popen(child.argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    env=env, start_new_session=True, preexec_fn=pin)

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
            while not self.hurry and child.proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
        for child in children:
            self._signal(child, signal.SIGKILL)  # also reaps grandchildren left in the group
            try:
                child.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass


@dataclass
class RestartPolicy:
    """How often a dead process is started again: at most `max_restarts` times over the run (-1 = always),
    the k-th restart `backoff * 2**(k-1)` seconds after the death is seen (capped at `backoff_max`)."""
    max_restarts: int
    backoff: float
    backoff_max: float = 30.0

    def allows(self, restarts_so_far: int) -> bool:
        return self.max_restarts < 0 or restarts_so_far < self.max_restarts

    def delay(self, restarts_so_far: int) -> float:
        return min(self.backoff_max, self.backoff * 2 ** restarts_so_far)


class Interrupts:
    """SIGINT/SIGTERM during a run: the first raises KeyboardInterrupt (out of whatever the launcher waits on);
    any later one, or one during the shutdown, only makes the shutdown kill at once (ProcessGroup.hurry)
    instead of raising inside it, which would orphan the children and leave run.json saying `running`."""

    def __init__(self, procs: ProcessGroup):
        self.procs, self.count, self.cleaning, self.signals = procs, 0, False, []

    def handle(self, signum, _frame) -> None:
        self.count += 1
        self.signals.append(signal.Signals(signum).name)
        if self.count == 1 and not self.cleaning:
            raise KeyboardInterrupt
        self.procs.hurry = True

    def why(self, status: str) -> str:
        """How the run ended, for run.json's `ended_by`."""
        if status != "interrupted":
            return {"completed": "num_rollout reached", "stopped": "async-rl stop"}.get(status, "a process failed")
        if self.count > 1:
            return f"{' then '.join(self.signals)}: the second killed every process without waiting"
        return f"{self.signals[0]}: every process stopped"
